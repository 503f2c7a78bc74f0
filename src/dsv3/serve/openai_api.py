"""The OpenAI-compatible HTTP API over one engine loop: `create_app(llm_or_engine, model_name, api_key)` in this
process, or `frontend_app` over the pipes of an engine loop elsewhere (serve/frontend.py: `dsv3 serve`).

POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics. Every error a
client can cause is a 4xx with OpenAI's body {"error": {"message", "type", "param", "code"}}; a failure of
the engine fails only the requests it was running (500, or an error event in a stream). With an API key, every
route but /health needs it (/metrics and the docs too, unless public_metrics_and_docs).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from dsv3.serve import MAX_REQUEST_BYTES
from dsv3.serve.client import EngineClient
from dsv3.serve.completions import OpenAIServer
from dsv3.serve.engine_loop import EngineLoop
from dsv3.serve.messages import Pipes, open_pipes
from dsv3.serve.metrics import Metrics
from dsv3.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from dsv3.tokenizer import Tokenizer

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from dsv3.engine.llm import LLMEngine

log = logging.getLogger("dsv3.serve")
ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}
KEYLESS_PATHS = {"/health"}  # a load balancer's probe carries no key
METRICS_AND_DOCS = {"/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def create_app(llm_or_engine, model_name: str | list[str], api_key: str | None = None, **options) -> FastAPI:
    """An app serving `llm_or_engine` (a dsv3.LLM or an LLMEngine with a tokenizer) as `model_name` (or under each of
    a list of names), with the engine loop in a thread of this process (for tests and embedding). That thread is then
    the only one to step the engine. options: _app's."""
    engine = getattr(llm_or_engine, "engine", llm_or_engine)
    if engine.tokenizer is None:
        raise ValueError("the server needs an engine with a tokenizer (chat templates, text prompts)")
    return _app(lambda: _engine_thread(engine), engine.tokenizer, engine.max_model_len, model_name, api_key, **options)


def frontend_app(pipes: Pipes, tokenizer: Tokenizer, max_model_len: int, model_name: str | list[str],
                 api_key: str | None = None, on_engine_lost: Callable[[], None] | None = None, **options) -> FastAPI:
    """An app over the front-end's ends of an engine loop's pipes (commands, events), the loop being in another
    process; on_engine_lost: that loop is gone. options: _app's."""
    return _app(lambda: nullcontext(pipes), tokenizer, max_model_len, model_name, api_key, on_engine_lost, **options)


@contextmanager
def _engine_thread(engine: LLMEngine) -> Iterator[Pipes]:
    """The engine loop in a thread of this process; yields the front-end's ends of its pipes. On exit, once the
    front-end has stopped the loop, the thread is joined."""
    engine_ends, frontend_ends = open_pipes()
    # The engine thread gives up the GIL at every blocking CUDA call and then waits for the event loop to hand
    # it back, by default up to 5 ms a time. A short interval bounds each wait: with the event loop in this
    # process, moonlight-16b at 256 streams went from 735 to 1,011 tok/s (284 -> 198 ms between tokens).
    # (`dsv3 serve` runs the event loop in another process instead.)
    sys.setswitchinterval(min(sys.getswitchinterval(), 2e-4))
    thread = threading.Thread(target=EngineLoop(engine, [engine_ends]).run, name="dsv3-engine", daemon=True)
    thread.start()
    try:
        yield frontend_ends
    finally:
        frontend_ends[0].close()  # ends the loop's reader of commands
        thread.join(30)
        for end in (*engine_ends, frontend_ends[1]):
            end.close()


def _app(connect: Callable[[], AbstractContextManager[Pipes]], tokenizer: Tokenizer, max_model_len: int,
         model_name: str | list[str], api_key: str | None, on_engine_lost: Callable[[], None] | None = None, *,
         public_metrics_and_docs: bool = False, max_request_bytes: int = MAX_REQUEST_BYTES,
         default_max_tokens: int | None = None, report_every: float | None = None) -> FastAPI:
    """public_metrics_and_docs: with an API key, /metrics, /docs, /redoc and /openapi.json answer without it;
    max_request_bytes: larger bodies get 413; default_max_tokens: the cap of a request that sets none (None: the
    rest of the context); report_every: one of several front-ends, which sends its counters to the engine loop
    this often (seconds) for the others' /metrics."""
    if max_request_bytes < 1:  # (middleware is made at the first request: checked here to fail at once)
        raise ValueError(f"max_request_bytes must be at least 1, got {max_request_bytes}")
    metrics = Metrics(ENDPOINTS)
    client = EngineClient(on_engine_lost)
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    server = OpenAIServer(client, tokenizer, max_model_len, names, metrics, default_max_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        with connect() as (commands, events):
            client.start(commands, events)
            reporting = asyncio.create_task(_report(client, metrics, report_every)) if report_every else None
            yield
            if reporting is not None:
                reporting.cancel()
                client.report(metrics.snapshot())  # the last word: what this front-end answered
            await client.stop()  # cancels what uvicorn's graceful shutdown left running

    app = FastAPI(title="dsv3", lifespan=lifespan)
    app.state.server = server
    _install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await server.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await server.complete(body, request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [server.model_card(name) for name in server.model_names]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        server.check_model(model)
        return server.model_card(model)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        stats = await client.stats()
        return PlainTextResponse(metrics.render(stats.values, stats.frontends), media_type="text/plain; version=0.0.4")

    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    if api_key:  # outside the body limit: a request without the key is refused before its body is read
        app.add_middleware(ApiKeyGuard, api_key=api_key,
                           keyless_paths=KEYLESS_PATHS | (METRICS_AND_DOCS if public_metrics_and_docs else set()))
    app.add_middleware(CountResponses, metrics=metrics)  # outermost: counts the 401s and 413s too
    return app


async def _report(client: EngineClient, metrics: Metrics, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        client.report(metrics.snapshot())


class CountResponses:
    """Counts every response by endpoint and status (500s that escape as exceptions included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counting_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.count_response(scope["path"], message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:
                self.metrics.count_response(scope["path"], 500)
            raise


class ApiKeyGuard:
    """With --api-key, every route but keyless_paths needs `Authorization: Bearer KEY`, checked before the body is
    read."""

    def __init__(self, app, api_key: str, keyless_paths: set[str]):
        self.app, self.api_key, self.keyless_paths = app, api_key.encode(), keyless_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.keyless_paths:
            scheme, _, key = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.api_key):
                error = APIError(401, "missing or wrong API key (send the header 'Authorization: Bearer KEY')",
                                 code="invalid_api_key")
                return await _error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """A request body over max_bytes gets 413: at once if its Content-Length says so, else (a chunked body) as soon
    as that many bytes have come, so that no more are read, parsed or tokenized."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes
        self.message = f"the request body is over this server's limit of {max_bytes:,} bytes (--max-request-bytes)"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _error_response(APIError(413, self.message))(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # raised where the route reads its body; the handler answers it
                raise HTTPException(413, self.message)
            return message

        await self.app(scope, counting_receive, send)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), error.status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        return _error_response(_validation_error(e.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error_response(APIError(e.status_code, str(e.detail), kind=kind))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(APIError(500, f"internal error: {type(e).__name__}", kind="server_error"))


def _validation_error(errors) -> APIError:
    """FastAPI's 422 as OpenAI's 400: the first few problems, each named by its parameter."""
    if errors and errors[0].get("type") == "json_invalid":
        detail = (errors[0].get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON: {detail}".rstrip(": "))
    params, messages = [], []
    for err in errors[:3]:  # a problem of the whole body may name its parameter in ctx (protocol.py)
        param = _param_of(err.get("loc", ())) or (err.get("ctx") or {}).get("param", "")
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if not param and err.get("type") == "missing":
            message = "the request body is empty; send a JSON object"
        params.append(param)
        messages.append(f"{param}: {message}" if param else message)
    more = f" (and {len(errors) - 3} more problems)" if len(errors) > 3 else ""
    return APIError(400, "; ".join(messages) + more, params[0] if params and params[0] else None)


_FIELD = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_TAGS = {"body", "str", "int", "float", "bool", "none"}


def _param_of(loc: tuple) -> str:
    """A pydantic error location as OpenAI names a parameter ('messages.0.role'), without the union member tags
    pydantic adds ('str', "literal['none','auto']", 'TextPart')."""
    return ".".join(str(x) for x in loc if isinstance(x, int) or (_FIELD.fullmatch(str(x)) and x not in _TYPE_TAGS))
