"""The engine loop: one thread owns the LLMEngine (which is not thread-safe) and steps it while there is work.

Requests reach it through a thread-safe queue of commands (add, abort, stop), run between steps; each step's
new tokens go back to the waiting request's asyncio queue through `loop.call_soon_threadsafe`. All requests
share the engine's continuous batching. If a step raises, the requests of that step fail (their clients get an
error) and the loop goes on with the others.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from dsv3.engine.llm import LLMEngine
from dsv3.engine.sampling import SamplingParams
from dsv3.engine.sequence import Sequence, TokenLogprob

log = logging.getLogger("dsv3.serve")


@dataclass
class SequenceUpdate:
    index: int                                  # which sequence of its request
    text: str                                   # all the text so far that is safe to show (engine.stable_text)
    token_ids: list[int] = field(default_factory=list)          # new since the last update
    logprobs: list[TokenLogprob] = field(default_factory=list)  # new since the last update
    finish_reason: str | None = None            # stop, length, abort or error
    error: str | None = None

    def merge(self, later: SequenceUpdate) -> None:
        self.text = later.text
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        self.finish_reason, self.error = later.finish_reason, later.error


class Generation:
    """One HTTP request's sequences (n choices, or one per prompt) as the event loop sees them."""

    def __init__(self, loop_owner: EngineLoop, request_ids: list[str]):
        self.engine_loop, self.request_ids = loop_owner, request_ids
        self.event_loop = asyncio.get_running_loop()
        self.updates: asyncio.Queue[SequenceUpdate] = asyncio.Queue()
        self.unfinished = set(range(len(request_ids)))
        self.arrival, self.first_token_at, self.finished_at = time.monotonic(), None, None
        self.num_tokens = 0

    async def stream(self) -> AsyncIterator[list[SequenceUpdate]]:
        """Batches of updates, one per sequence that changed (several engine steps merged if we fell behind)."""
        while self.unfinished:
            merged: dict[int, SequenceUpdate] = {}
            update = await self.updates.get()
            while True:
                if update.index in merged:
                    merged[update.index].merge(update)
                else:
                    merged[update.index] = update
                if self.updates.empty():
                    break
                update = self.updates.get_nowait()
            now = time.monotonic()
            for u in merged.values():
                if u.token_ids and self.first_token_at is None:
                    self.first_token_at = now
                self.num_tokens += len(u.token_ids)
                if u.finish_reason is not None:
                    self.unfinished.discard(u.index)
            if not self.unfinished:
                self.finished_at = now
            yield list(merged.values())

    def abort(self) -> None:
        """Drop what has not finished (the client went away); idempotent."""
        if self.unfinished:
            self.engine_loop.abort([self.request_ids[i] for i in self.unfinished])
            self.unfinished.clear()


@dataclass
class _Tracked:
    generation: Generation
    index: int
    seq: Sequence
    num_sent: int = 0


class EngineLoop:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()  # None: stop
        self.tracked: dict[str, _Tracked] = {}
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    # ---- called from the event loop ----------------------------------------------------------------------------
    def start(self) -> None:
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                # The engine thread gives up the GIL at every blocking CUDA call and then waits for the
                # event loop to hand it back, by default up to 5 ms a time: with hundreds of streams
                # busy formatting chunks, that wait came to dominate a step (moonlight-16b, 256 streams:
                # 284 ms between tokens for 26 ms of GPU work). A short interval bounds each wait.
                sys.setswitchinterval(min(sys.getswitchinterval(), 2e-4))
                self.thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
                self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel whatever is still in flight and end the thread."""
        with self.lock:
            thread, self.thread = self.thread, None
        if thread is not None and thread.is_alive():
            self.commands.put(None)
            thread.join(timeout)

    async def submit(self, requests: list[tuple[list[int], SamplingParams]], request_id: str) -> Generation:
        """Add the sequences together (all or none); raises ValueError when the engine refuses one."""
        self.start()
        ids = [request_id] if len(requests) == 1 else [f"{request_id}-{i}" for i in range(len(requests))]
        generation = Generation(self, ids)
        accepted: asyncio.Future[Exception | None] = generation.event_loop.create_future()
        self.commands.put(lambda: self._add(generation, requests, accepted))
        try:
            error = await accepted
        except BaseException:  # cancelled while waiting: the client left
            self.abort(ids)
            raise
        if error is not None:
            raise error
        return generation

    def abort(self, request_ids: list[str]) -> None:
        self.commands.put(lambda: self._abort(request_ids))

    # ---- the engine thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.engine.device.type == "cuda":  # the current device is per thread
            torch.cuda.set_device(self.engine.device)
        while True:
            for command in self._pending_commands():
                if command is None:
                    return self._cancel_all("the server is shutting down")
                try:
                    command()
                except Exception:
                    log.exception("engine loop command failed")
            if self.engine.has_unfinished():
                self._step()

    def _pending_commands(self):
        """The commands queued since the last step; waits for one while the engine has nothing to do."""
        try:
            yield self.commands.get(block=not self.engine.has_unfinished())
            while True:
                yield self.commands.get_nowait()
        except queue.Empty:
            return

    def _add(self, generation: Generation, requests: list[tuple[list[int], SamplingParams]],
             accepted: asyncio.Future) -> None:
        added: list[str] = []
        try:
            for index, (prompt_ids, params) in enumerate(requests):
                seq = self.engine.add_request(prompt_ids, params, generation.request_ids[index])
                self.tracked[seq.request_id] = _Tracked(generation, index, seq)
                added.append(seq.request_id)
            error = None
        except Exception as e:  # ValueError for a request the engine cannot take; anything else is ours
            if not isinstance(e, ValueError):
                log.exception("adding request %s failed", generation.request_ids[0])
            self._abort(added)
            error = e
        generation.event_loop.call_soon_threadsafe(_settle, accepted, error)

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.tracked.pop(request_id, None)
            self.engine.abort(request_id)

    def _step(self) -> None:
        try:
            done = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing the requests it was running")
            scheduler = self.engine.scheduler
            for seq in list(scheduler.running) or list(scheduler.waiting):
                self._fail(seq.request_id, f"generation failed: {type(e).__name__}: {e}")
            done = [t.seq for t in self.tracked.values() if t.seq.finished]  # finished in the failed step
        updates = []
        for seq in done:
            tracked = self.tracked.get(seq.request_id)
            if tracked is None:
                continue
            try:
                updates.append((tracked, self._update(tracked)))
            except Exception as e:  # e.g. detokenizing: fail this request, not the loop
                log.exception("publishing request %s failed", seq.request_id)
                self._fail(seq.request_id, f"generation failed: {type(e).__name__}: {e}")
        self._deliver(updates)

    def _update(self, t: _Tracked) -> SequenceUpdate:
        """What is new in a sequence since its last update; a finished one is released."""
        seq, engine = t.seq, self.engine
        new_ids = seq.all_token_ids[seq.num_prompt_tokens + t.num_sent:]
        update = SequenceUpdate(t.index, engine.stable_text(seq), new_ids, seq.logprobs[t.num_sent:],
                                seq.finish_reason)
        t.num_sent += len(new_ids)
        if seq.finished:
            engine.release(seq)
            del self.tracked[seq.request_id]
        return update

    def _deliver(self, updates: list[tuple[_Tracked, SequenceUpdate]]) -> None:
        """Hand updates to their requests' event loops: one wake-up per loop and step, not one per sequence."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Tracked, SequenceUpdate]]] = {}
        for tracked, update in updates:
            by_loop.setdefault(tracked.generation.event_loop, []).append((tracked, update))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody will read these
                self._abort([tracked.seq.request_id for tracked, _ in items])

    def _fail(self, request_id: str, message: str) -> None:
        tracked = self.tracked.get(request_id)
        self._abort([request_id])
        if tracked is not None:
            self._deliver([(tracked, SequenceUpdate(tracked.index, "", finish_reason="error", error=message))])

    def _cancel_all(self, message: str) -> None:
        for request_id in list(self.tracked):
            self._fail(request_id, message)


def _put_all(items: list[tuple[_Tracked, SequenceUpdate]]) -> None:
    for tracked, update in items:
        tracked.generation.updates.put_nowait(update)


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if not future.done():
        future.set_result(error)
