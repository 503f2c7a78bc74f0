"""`serve(engine, ...)`: the engine loop in this process, the HTTP front-end (uvicorn, FastAPI, JSON and SSE) in a
process of its own, as vLLM separates its API server from the engine core. In one process the two shared one GIL,
and at hundreds of streams the front-end's work starved the engine (moonlight-16b on an H100, 256 streams: about
1,000 tokens/s through the server against 10,600 for the engine alone).

The front-end process is spawned; it gets the tokenizer and a few values (context length, model name, API key)
and talks to the engine loop through two pipes (serve/messages.py). It never loads the model nor touches a GPU.
(Spawning re-imports the main script, if one runs, in the new process: a script that calls `serve` should import
torch and the model inside its functions, as bench/serve.py does.) The engine loop runs in the calling thread:
under torchrun, rank 0's main thread, which the other ranks follow.

Signals: the front-end runs in a session of its own, so a terminal's Ctrl-C reaches only this process, which
forwards SIGINT and SIGTERM to it. uvicorn then stops accepting connections and lets running requests finish for up
to shutdown_timeout seconds; then the engine loop stops, failing the rest (a stream ends with an error event and
[DONE]); the front-end exits 0 (130 after SIGINT), and so does `serve`. If either process dies, the other sees its
pipe close and stops too.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import uvicorn

from dsv3.serve.engine_loop import EngineLoop
from dsv3.serve.messages import Pipes, open_pipes

if TYPE_CHECKING:
    from dsv3.engine.llm import LLMEngine
    from dsv3.tokenizer import Tokenizer


# Seconds uvicorn waits, once the engine loop has failed what still ran at the shutdown timeout, before it cancels the
# requests' tasks itself (which cuts a stream mid-body): for clients that have stopped reading.
STREAM_END_GRACE = 2.0


class Frontend:
    """The front-end process (started here) and the engine loop that answers it. app_options: openai_api._app's."""

    def __init__(self, engine: LLMEngine, model_name: str | list[str], host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, shutdown_timeout: float = 30.0, log_level: str = "info",
                 **app_options):
        if engine.tokenizer is None:
            raise ValueError("the server needs an engine with a tokenizer (chat templates, text prompts)")
        engine_ends, frontend_ends = open_pipes()
        context = multiprocessing.get_context("spawn")  # a fork would copy CUDA state and the engine's threads
        self.process = context.Process(
            target=_frontend_main, name="dsv3-frontend", daemon=True,
            args=(frontend_ends, engine.tokenizer, engine.max_model_len, model_name, host, port, api_key,
                  shutdown_timeout, log_level, app_options))
        self.process.start()
        for end in frontend_ends:  # they now live in the front-end alone, and close when it exits
            end.close()
        self.engine_loop = EngineLoop(engine, *engine_ends)

    def run(self) -> int:
        """Step the engine in this thread until the front-end has stopped; returns its exit status."""
        try:
            self.engine_loop.run()
        finally:
            self.process.join()
        code = self.process.exitcode
        return code if code >= 0 else 128 - code  # killed by a signal: the shell's way of saying which

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Shut the front-end down as that signal asks (SIGTERM: gracefully; a second SIGINT: at once)."""
        if self.process.exitcode is None:
            os.kill(self.process.pid, signum)


def serve(engine: LLMEngine, model_name: str | list[str], **options) -> int:
    """`dsv3 serve`: serve `engine` until SIGTERM or Ctrl-C (from the main thread); options: Frontend's. Returns
    the exit status."""
    frontend = Frontend(engine, model_name, **options)
    forwarded = {sig: signal.signal(sig, lambda signum, frame: frontend.stop(signum))
                 for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return frontend.run()
    finally:
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)


def _frontend_main(pipes: Pipes, tokenizer: Tokenizer, max_model_len: int, model_name: str | list[str], host: str,
                   port: int, api_key: str | None, shutdown_timeout: float, log_level: str, app_options: dict) -> None:
    """The front-end process."""
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again to die of it; end with status 0 instead.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    os.setsid()  # out of the terminal's process group: signals come from the engine's process only
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # torch is imported (dsv3 imports it): let nothing here use a GPU
    from dsv3.serve.openai_api import frontend_app

    app = frontend_app(pipes, tokenizer, max_model_len, model_name, api_key,
                       on_engine_lost=lambda: setattr(server, "should_exit", True), **app_options)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout + STREAM_END_GRACE)
    server = _Server(config, shutdown_timeout, stop_engine=app.state.server.client.stop)
    try:
        server.run()
    except KeyboardInterrupt:  # SIGINT, re-raised the same way after the graceful shutdown
        sys.exit(130)
    if not server.started:  # e.g. the port is taken; uvicorn said so
        sys.exit(1)


class _Server(uvicorn.Server):
    """uvicorn's server, except that shutdown_timeout after a shutdown begins, the engine loop is stopped: it fails
    each request still running, whose stream then ends with an error event and [DONE] (a whole answer: a 500),
    rather than being cut short when uvicorn's own timeout, STREAM_END_GRACE later, cancels the request's task."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout: float, stop_engine: Callable[[], Awaitable[None]]):
        super().__init__(config)
        self.shutdown_timeout, self.stop_engine = shutdown_timeout, stop_engine

    async def shutdown(self, sockets=None) -> None:
        loop, stopping = asyncio.get_running_loop(), []  # (keeps the task referenced while it runs)
        timer = loop.call_later(self.shutdown_timeout, lambda: stopping.append(loop.create_task(self.stop_engine())))
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)
