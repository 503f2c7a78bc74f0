"""What the HTTP front-end and the engine loop say to each other, pickled through two one-way pipes (the same
whether the front-end is another process or a thread beside the engine).

front-end -> engine: Add, Abort, GetStats, Report, Stop.
engine -> front-end: one list per send: the Added and Stats answers to the commands of a round, or the
Updates of one engine step (one message per step, however many sequences it advanced).
"""

from __future__ import annotations

import contextlib
import fcntl
from dataclasses import dataclass, field
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from dsv3.engine.sampling import SamplingParams
    from dsv3.engine.sequence import TokenLogprob

Pipes = tuple[Connection, Connection]  # one side's ends of the two pipes


@dataclass
class Add:
    """One HTTP request's sequences, added together: all or none."""
    request_ids: list[str]
    requests: list[tuple[list[int], SamplingParams]]  # prompt token ids, sampling parameters


@dataclass
class Abort:
    request_ids: list[str]


@dataclass
class GetStats:
    """Ask for a Stats answer."""


@dataclass
class Report:
    """A front-end's own counters (Metrics.snapshot), sent now and then when there are several front-ends, so that
    each one's /metrics can show the totals of all."""
    counters: dict


@dataclass
class Stop:
    """Fail what is still running and end the engine loop."""


@dataclass
class Added:
    request_id: str                  # the Add's first id
    error: str | None = None         # why the engine refused the request
    bad_request: bool = True         # the engine's ValueError (the client's fault: 400), else a failure (500)


class Update(NamedTuple):
    """What one engine step did to one sequence. A tuple: a step sends hundreds, and tuples pickle several times
    faster than dataclasses."""
    request_id: str
    text: str                        # the stable text added since the last update (engine.stable_text)
    token_ids: list[int]             # new since the last update
    logprobs: list[TokenLogprob]     # new since the last update
    finish_reason: str | None        # stop, length or error
    error: str | None


@dataclass
class Stats:
    """The engine's gauges and counters that GET /metrics shows, and the other front-ends' latest Reports."""
    values: dict[str, float]
    frontends: list[dict] = field(default_factory=list)


def open_pipes() -> tuple[Pipes, Pipes]:
    """The engine loop's ends (commands to read, events to write) and the front-end's (commands to write, events
    to read). On Linux the events pipe holds 1 MiB instead of 64 KiB, tens of steps of hundreds of updates, so that a
    front-end busy writing chunks seldom keeps the engine waiting to send."""
    commands_r, commands_w = Pipe(duplex=False)
    events_r, events_w = Pipe(duplex=False)
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or over the system's limit: the default size
        fcntl.fcntl(events_w.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    return (commands_r, events_w), (commands_w, events_r)
