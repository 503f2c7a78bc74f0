"""The engine loop: one thread owns the LLMEngine (which is not thread-safe) and steps it while there is work.

Commands come from the HTTP front-ends (one or several processes, `dsv3 serve --api-servers N`), each through a
pipe of its own (serve/messages.py); a reader thread per front-end queues them as they arrive, and they run between
steps. Each step's updates go back as one message to each front-end that has requests in it. All requests share the
engine's continuous batching. If a step raises, the requests of that step fail (their clients get an error) and the
loop goes on with the others. A front-end's Stop, or the close of its end of the pipe, fails whatever it still has
running and closes the loop's end of its events pipe, which tells it; the loop ends when every front-end has.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import torch

from dsv3.serve.messages import Abort, Add, Added, GetStats, Pipes, Report, Stats, Stop, Update

if TYPE_CHECKING:  # only a type here: the front-end process imports this module and must not load the engine
    from dsv3.engine.llm import LLMEngine
    from dsv3.engine.sequence import Sequence

log = logging.getLogger("dsv3.serve")


@dataclass
class _Tracked:
    seq: Sequence
    num_sent: int = 0   # tokens already sent
    text_sent: int = 0  # characters of stable text already sent


class EngineLoop:
    def __init__(self, engine: LLMEngine, frontends: list[Pipes]):
        """frontends: the loop's ends (commands to read, events to write) of each front-end's pipes."""
        self.engine, self.frontends = engine, frontends
        self.open = set(range(len(frontends)))
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()   # (front-end index, command)
        self.tracked: dict[str, _Tracked] = {}
        self.owner: dict[str, int] = {}                        # request id -> the front-end that sent it
        self.outboxes: list[list] = [[] for _ in frontends]
        self.reports: dict[int, dict] = {}                     # each front-end's latest counters (Report)
        self.seconds = {"step": 0.0, "publish": 0.0}  # the loop's wall time: in engine.step, and making updates

    def run(self) -> None:
        if self.engine.device.type == "cuda":  # the current device is per thread
            torch.cuda.set_device(self.engine.device)
        for index, (commands, _) in enumerate(self.frontends):
            threading.Thread(target=_read_commands, args=(commands, self.inbox, index), name="dsv3-engine-commands",
                             daemon=True).start()
        try:
            while self.open:
                for index, command in self._pending_commands():
                    if isinstance(command, Stop):
                        self._close(index)
                        continue
                    try:
                        self._handle(index, command)
                    except Exception:
                        log.exception("engine loop command failed")
                self._flush()
                if self.engine.has_unfinished():
                    self._step()
                    self._flush()
        finally:
            for index in list(self.open):
                self._close(index, "the engine loop stopped")

    def _close(self, index: int, message: str = "the server is shutting down") -> None:
        """A front-end stopped: fail what it still has running, then close its events pipe."""
        if index not in self.open:
            return
        for request_id in [r for r, owner in self.owner.items() if owner == index]:
            self._fail(request_id, message)
        self._flush()
        self.open.discard(index)
        self.frontends[index][1].close()

    def _pending_commands(self):
        """The commands queued since the last step; waits for one while the engine has nothing to do."""
        try:
            yield self.inbox.get(block=not self.engine.has_unfinished())
            while True:
                yield self.inbox.get_nowait()
        except queue.Empty:
            return

    def _handle(self, index: int, command) -> None:
        if isinstance(command, Add):
            self._add(index, command)
        elif isinstance(command, Abort):
            self._abort(command.request_ids)
        elif isinstance(command, GetStats):
            others = [r for i, r in self.reports.items() if i != index]
            self.outboxes[index].append(Stats({**engine_stats(self.engine), "loop_step_seconds": self.seconds["step"],
                                               "loop_publish_seconds": self.seconds["publish"]}, others))
        elif isinstance(command, Report):
            self.reports[index] = command.counters
        else:
            raise TypeError(f"unknown command {command!r}")

    def _flush(self) -> None:
        for index, outbox in enumerate(self.outboxes):
            if outbox and index in self.open:
                self.outboxes[index] = []
                try:
                    self.frontends[index][1].send(outbox)
                except OSError:  # that front-end is gone; the end of its commands closes it here
                    pass

    def _add(self, index: int, command: Add) -> None:
        added: list[str] = []
        try:
            for request_id, (prompt_ids, params) in zip(command.request_ids, command.requests):
                seq = self.engine.add_request(prompt_ids, params, request_id)
                self.tracked[request_id] = _Tracked(seq)
                self.owner[request_id] = index
                added.append(request_id)
            answer = Added(command.request_ids[0])
        except Exception as e:  # ValueError for a request the engine cannot take; anything else is ours
            if not isinstance(e, ValueError):
                log.exception("adding request %s failed", command.request_ids[0])
            self._abort(added)
            answer = Added(command.request_ids[0], str(e) or type(e).__name__, isinstance(e, ValueError))
        self.outboxes[index].append(answer)

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.tracked.pop(request_id, None)
            self.owner.pop(request_id, None)
            self.engine.abort(request_id)

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            done = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing the requests it was running")
            scheduler = self.engine.scheduler
            for seq in list(scheduler.running) or list(scheduler.waiting):
                self._fail(seq.request_id, f"generation failed: {type(e).__name__}: {e}")
            done = [t.seq for t in self.tracked.values() if t.seq.finished]  # finished in the failed step
        stepped = time.perf_counter()
        self.seconds["step"] += stepped - start
        for seq in done:
            tracked = self.tracked.get(seq.request_id)
            if tracked is None:
                continue
            try:
                self.outboxes[self.owner[seq.request_id]].append(self._update(tracked))
            except Exception as e:  # e.g. detokenizing: fail this request, not the loop
                log.exception("publishing request %s failed", seq.request_id)
                self._fail(seq.request_id, f"generation failed: {type(e).__name__}: {e}")
        self.seconds["publish"] += time.perf_counter() - stepped

    def _update(self, t: _Tracked) -> Update:
        """What is new in a sequence since its last update; a finished one is released."""
        seq, engine = t.seq, self.engine
        new_ids = seq.all_token_ids[seq.num_prompt_tokens + t.num_sent:]
        text = engine.stable_text(seq)  # grows only: what was sent is its prefix
        update = Update(seq.request_id, text[t.text_sent:], new_ids, seq.logprobs[t.num_sent:], seq.finish_reason,
                        None)
        t.num_sent += len(new_ids)
        t.text_sent = max(t.text_sent, len(text))
        if seq.finished:
            engine.release(seq)
            del self.tracked[seq.request_id]
            del self.owner[seq.request_id]
        return update

    def _fail(self, request_id: str, message: str) -> None:
        if request_id in self.tracked:
            self.outboxes[self.owner[request_id]].append(Update(request_id, "", [], [], "error", message))
        self._abort([request_id])

def _read_commands(commands: Connection, inbox: queue.SimpleQueue, index: int) -> None:
    """Queue the front-end's commands as they come, so that its sends never wait for a step to end. (A function,
    not a method: this daemon thread may outlive the loop, and must not be the last to hold the engine, whose
    tensors cannot be freed from a daemon thread while the interpreter exits.)"""
    try:
        while True:
            inbox.put((index, commands.recv()))
    except (EOFError, OSError):  # the front-end closed its end: stopped, or its process is gone
        pass
    finally:
        inbox.put((index, Stop()))


def engine_stats(engine: LLMEngine) -> dict[str, float]:
    """What GET /metrics shows of the engine (serve/metrics.py names and explains each)."""
    blocks, scheduler, stats = engine.blocks, engine.scheduler, engine.stats
    return {"prompt_tokens": stats["prompt_tokens"], "generation_tokens": stats["generation_tokens"],
            "running": len(scheduler.running), "waiting": len(scheduler.waiting), "cache_usage": blocks.usage,
            "blocks_free": blocks.num_free, "blocks_total": blocks.num_blocks,
            "preemptions": scheduler.num_preemptions, "spec_drafted": stats["spec_drafted"],
            "spec_accepted": stats["spec_accepted"], "spec_off_steps": stats["spec_off_steps"],
            "spec_off_sequences": stats["spec_off_sequences"], "steps": stats["steps"],
            "prefill_steps": stats["prefill_steps"], "gpu_wait_seconds": stats["gpu_wait_seconds"]}
