"""The front-end's handle on the engine loop (serve/engine_loop.py), in whatever process or thread that runs.

Commands go out through one pipe. The engine's messages come back through the other, read by the event loop
itself when the pipe is readable (no thread: nothing to wait for the GIL), and each step's updates go to the
asyncio queues of the requests waiting for them. If the engine's pipe closes, every request still waiting fails.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from dsv3.serve.messages import Abort, Add, Added, GetStats, Report, Stats, Stop, Update

if TYPE_CHECKING:
    from dsv3.engine.sampling import SamplingParams
    from dsv3.engine.sequence import TokenLogprob

log = logging.getLogger("dsv3.serve")


@dataclass
class SequenceUpdate:
    index: int                                  # which sequence of its request
    text: str                                   # all the text so far that is safe to show (engine.stable_text)
    token_ids: list[int] = field(default_factory=list)          # new since the last update
    logprobs: list[TokenLogprob] = field(default_factory=list)  # new since the last update
    finish_reason: str | None = None            # stop, length or error
    error: str | None = None

    def merge(self, later: SequenceUpdate) -> None:
        self.text = later.text
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        self.finish_reason, self.error = later.finish_reason, later.error


class Generation:
    """One HTTP request's sequences (n choices, or one per prompt) as the event loop sees them."""

    def __init__(self, client: EngineClient, request_ids: list[str]):
        self.client, self.request_ids = client, request_ids
        self.updates: asyncio.Queue[SequenceUpdate] = asyncio.Queue()
        self.texts = [""] * len(request_ids)
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
            self.client.abort([self.request_ids[i] for i in self.unfinished])
            self.unfinished.clear()

    def receive(self, index: int, update: Update) -> None:
        self.texts[index] += update.text
        self.updates.put_nowait(SequenceUpdate(index, self.texts[index], update.token_ids, update.logprobs,
                                               update.finish_reason, update.error))


class EngineClient:
    """on_lost: called if the engine loop's pipe closes without having been asked to stop."""

    def __init__(self, on_lost: Callable[[], None] | None = None):
        self.on_lost = on_lost
        self.sequences: dict[str, tuple[Generation, int]] = {}  # request id -> its Generation and index there
        self.adding: dict[str, asyncio.Future[Added]] = {}
        self.stats_waiting: collections.deque[asyncio.Future[Stats]] = collections.deque()
        self.gone: str | None = None  # why the engine loop can no longer be reached
        self.stopping = False

    # ---- on the event loop --------------------------------------------------------------------------------------
    def start(self, commands: Connection, events: Connection) -> None:
        self.commands, self.events, self.gone, self.stopping = commands, events, None, False
        self.loop = asyncio.get_running_loop()
        self.ended = self.loop.create_future()
        self.loop.add_reader(events.fileno(), self._read)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop the engine loop (it fails what is still running) and wait until it has."""
        self.stopping = True
        self._send(Stop())
        try:
            await asyncio.wait_for(asyncio.shield(self.ended), timeout)
        except asyncio.TimeoutError:
            log.error("the engine loop did not stop within %.0f s", timeout)

    async def submit(self, requests: list[tuple[list[int], SamplingParams]], request_id: str) -> Generation:
        """Add the sequences together (all or none); raises ValueError when the engine refuses one."""
        if self.gone is not None:
            raise RuntimeError(self.gone)
        ids = [request_id] if len(requests) == 1 else [f"{request_id}-{i}" for i in range(len(requests))]
        generation = Generation(self, ids)
        self.sequences.update((sequence_id, (generation, index)) for index, sequence_id in enumerate(ids))
        self.adding[ids[0]] = added = self.loop.create_future()
        self._send(Add(ids, requests))
        try:
            answer = await added
        except BaseException:  # cancelled while waiting: the client left
            self.adding.pop(ids[0], None)
            generation.abort()
            raise
        if answer.error is not None:  # the engine took none of them
            for sequence_id in ids:
                self.sequences.pop(sequence_id, None)
            raise (ValueError if answer.bad_request else RuntimeError)(answer.error)
        return generation

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.sequences.pop(request_id, None)
        self._send(Abort(request_ids))

    async def stats(self) -> Stats:
        """The engine's counters and gauges (engine_loop.engine_stats), read by the engine loop between steps, and
        the other front-ends' latest counters."""
        if self.gone is not None:
            raise RuntimeError(self.gone)
        future = self.loop.create_future()
        self.stats_waiting.append(future)
        self._send(GetStats())
        return await future

    def report(self, counters: dict) -> None:
        """This front-end's counters, for the others' /metrics."""
        self._send(Report(counters))

    def _send(self, command) -> None:
        if self.gone is None:
            try:
                self.commands.send(command)
            except OSError:
                self._lost("the engine loop is gone")

    def _read(self) -> None:
        try:
            while self.events.poll():
                self._receive(self.events.recv())
        except (EOFError, OSError):
            self._lost("the server is shutting down" if self.stopping else "the engine loop stopped")

    def _receive(self, messages: list) -> None:
        for m in messages:
            if isinstance(m, Update):
                entry = self.sequences.get(m.request_id)
                if entry is None:  # aborted since
                    continue
                if m.finish_reason is not None:
                    del self.sequences[m.request_id]
                entry[0].receive(entry[1], m)
            elif isinstance(m, Added):
                future = self.adding.pop(m.request_id, None)
                if future is not None and not future.done():
                    future.set_result(m)
            elif isinstance(m, Stats):
                future = self.stats_waiting.popleft()
                if not future.done():
                    future.set_result(m)

    def _lost(self, reason: str) -> None:
        """The engine loop can no longer be reached: fail everything that waits for it."""
        if self.gone is not None:
            return
        self.gone = reason
        self.loop.remove_reader(self.events.fileno())
        for request_id, future in self.adding.items():
            if not future.done():
                future.set_result(Added(request_id, reason, bad_request=False))
        while self.stats_waiting:
            future = self.stats_waiting.popleft()
            if not future.done():
                future.set_exception(RuntimeError(reason))
        for request_id, (generation, index) in self.sequences.items():
            generation.receive(index, Update(request_id, "", [], [], "error", reason))
        self.adding.clear()
        self.sequences.clear()
        if not self.ended.done():
            self.ended.set_result(None)
        if self.on_lost is not None and not self.stopping:
            self.on_lost()
