"""`serve(engine, ...)`: the engine loop in this process, the HTTP front-end (uvicorn, FastAPI, JSON and SSE) in a
process of its own, as vLLM separates its API server from the engine core. In one process the two shared one GIL,
and at hundreds of streams the front-end's work starved the engine (moonlight-16b on an H100, 256 streams: about
1,000 tokens/s through the server against 10,600 for the engine alone).

The front-end process is spawned; it gets the tokenizer and a few values (context length, model name, API key)
and talks to the engine loop through two pipes (serve/messages.py). It never loads the model nor touches a GPU.
One front-end process turns each step's updates into JSON and server-sent events for every stream; at hundreds of
streams that one process is the bottleneck (moonlight-16b on an H200, 256 streams: it fell behind the engine,
sending 0.44 chunks a token). `api_servers=N` starts N of them (vLLM's --api-server-count), each on the same port
with SO_REUSEPORT, so the kernel spreads connections over them; the engine loop answers each through its own pipes,
and each /metrics adds the others' counters, which they report every REPORT_EVERY seconds.
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
import socket
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
REPORT_EVERY = 0.5  # seconds between a front-end's reports of its counters, when there are several
# Seconds an idle keep-alive connection stays open. uvicorn's default, 5, equals httpx's (and so the openai client's)
# own expiry: a client can then send a request on a connection the server is closing that instant, and gets a
# ReadError. Longer than the clients' expiry, the client always lets go first.
KEEP_ALIVE = 65.0


class Frontend:
    """The front-end processes (started here) and the engine loop that answers them. app_options: openai_api._app's."""

    def __init__(self, engine: LLMEngine, model_name: str | list[str], host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, shutdown_timeout: float = 30.0, log_level: str = "info",
                 api_servers: int = 1, **app_options):
        if engine.tokenizer is None:
            raise ValueError("the server needs an engine with a tokenizer (chat templates, text prompts)")
        if api_servers < 1:
            raise ValueError(f"api_servers must be at least 1; got {api_servers}")
        if api_servers > 1:
            app_options = {**app_options, "report_every": REPORT_EVERY}
        context = multiprocessing.get_context("spawn")  # a fork would copy CUDA state and the engine's threads
        self.processes, loop_ends = [], []
        for index in range(api_servers):
            engine_ends, frontend_ends = open_pipes()
            process = context.Process(
                target=_frontend_main, name=f"dsv3-frontend-{index}", daemon=True,
                args=(frontend_ends, engine.tokenizer, engine.max_model_len, model_name, host, port, api_key,
                      shutdown_timeout, log_level, api_servers > 1, app_options))
            process.start()
            for end in frontend_ends:  # they now live in the front-end alone, and close when it exits
                end.close()
            self.processes.append(process)
            loop_ends.append(engine_ends)
        self.process = self.processes[0]
        self.engine_loop = EngineLoop(engine, loop_ends)

    def run(self) -> int:
        """Step the engine in this thread until every front-end has stopped; returns their exit status (the first
        that is not 0)."""
        try:
            self.engine_loop.run()
        finally:
            for process in self.processes:
                process.join()
        codes = [p.exitcode if p.exitcode >= 0 else 128 - p.exitcode for p in self.processes]  # killed: by a signal
        return next((code for code in codes if code), 0)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Shut the front-ends down as that signal asks (SIGTERM: gracefully; a second SIGINT: at once)."""
        for process in self.processes:
            if process.exitcode is None:
                os.kill(process.pid, signum)


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
                   port: int, api_key: str | None, shutdown_timeout: float, log_level: str, shared_port: bool,
                   app_options: dict) -> None:
    """A front-end process; shared_port: one of several on the same port."""
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again to die of it; end with status 0 instead.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    os.setsid()  # out of the terminal's process group: signals come from the engine's process only
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # torch is imported (dsv3 imports it): let nothing here use a GPU
    from dsv3.serve.openai_api import frontend_app

    app = frontend_app(pipes, tokenizer, max_model_len, model_name, api_key,
                       on_engine_lost=lambda: setattr(server, "should_exit", True), **app_options)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=KEEP_ALIVE,
                            timeout_graceful_shutdown=shutdown_timeout + STREAM_END_GRACE)
    server = _Server(config, shutdown_timeout, stop_engine=app.state.server.client.stop)
    try:
        server.run(sockets=[_shared_socket(host, port)] if shared_port else None)
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


def _shared_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port that other processes may bind too (SO_REUSEPORT: the kernel spreads the
    connections over them)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)
