"""Chat completions and completions: an OpenAI request becomes engine sequences (one per choice and prompt), and
what the engine writes becomes an OpenAI answer, whole or as server-sent events."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from dsv3.engine.sampling import SamplingParams
from dsv3.engine.sequence import TokenLogprob
from dsv3.serve.client import EngineClient, Generation, SequenceUpdate
from dsv3.serve.metrics import Metrics
from dsv3.serve.parsers import ControlTokens, OutputParser, ParsedOutput, StreamingParser, starts_in_reasoning
from dsv3.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, GenerationRequest
from dsv3.tokenizer import Tokenizer

log = logging.getLogger("dsv3.serve")
MAX_SEQUENCES_PER_REQUEST = 256
# apply_chat_template's own arguments: a request's chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "add_generation_prompt", "tokenize"}
MIN_LOGPROB = -9999.0  # JSON has no -inf
DONE = "data: [DONE]\n\n"
# A streamed update of one sequence -> (its delta choice or None, its closing choice or None).
ChoicePieces = Callable[[SequenceUpdate], tuple[dict[str, Any] | None, dict[str, Any] | None]]


class OpenAIServer:
    """model_names: the names a request may give (one model under each); default_max_tokens: the cap of a request
    that sets none (None: the rest of the context)."""

    def __init__(self, client: EngineClient, tokenizer: Tokenizer, max_model_len: int, model_names: list[str],
                 metrics: Metrics, default_max_tokens: int | None = None):
        if not model_names:
            raise ValueError("the server needs at least one model name")
        if default_max_tokens is not None and default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be at least 1, got {default_max_tokens}")
        self.client, self.tokenizer, self.max_model_len = client, tokenizer, max_model_len
        self.model_names, self.metrics, self.default_max_tokens = model_names, metrics, default_max_tokens
        self.control = ControlTokens.of_tokenizer(self.tokenizer)
        self.max_prompt_chars = _max_prompt_chars(tokenizer, max_model_len)
        self.created = int(time.time())
        self.token_text = functools.lru_cache(maxsize=1 << 16)(lambda i: self.tokenizer.decode([i]))

    def model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "dsv3",
                "max_model_len": self.max_model_len}

    def check_model(self, model: str) -> None:
        if model not in self.model_names:
            served = " or ".join(map(repr, self.model_names))
            raise APIError(404, f"the model {model!r} does not exist; this server serves {served}", "model",
                           "model_not_found")

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """A prompt's token ids; a text longer than the context could hold is refused before it is tokenized."""
        if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
            raise APIError(400, f"the prompt has {len(text):,} characters, more than the {self.max_model_len}-token "
                                "context can hold", param)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    # ---- chat ---------------------------------------------------------------------------------------------------
    def render_chat(self, body: ChatCompletionRequest) -> tuple[str, list[int]]:
        messages = [m.for_template() for m in body.messages]
        tools = ([t.model_dump(exclude_none=True) for t in body.tools]
                 if body.tools and body.tool_choice != "none" else None)
        kwargs = {k: v for k, v in (body.chat_template_kwargs or {}).items() if k not in RESERVED_TEMPLATE_KWARGS}
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools, **kwargs)
        except Exception as e:  # the template runs on what the client sent: whatever it raises is a bad request
            raise APIError(400, f"cannot render the messages with the chat template: {e}", "messages") from None
        return text, self.encode(text, "messages", add_special_tokens=False)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        prompt_text, prompt_ids = await run_in_threadpool(self.render_chat, body)
        parser = OutputParser(self.control, reasoning=True, starts_in_reasoning=starts_in_reasoning(prompt_text),
                              tools=bool(body.tools) and body.tool_choice != "none")
        max_tokens, field = ((body.max_completion_tokens, "max_completion_tokens")
                             if body.max_completion_tokens is not None else (body.max_tokens, "max_tokens"))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling_params(body, max_tokens, field, len(prompt_ids), logprobs)
        generation, head = await self.submit([(prompt_ids, p) for p in params], "chatcmpl", "messages", body.model)
        if not body.stream:
            results = await self.collect(generation, request)
            choices = [self.chat_choice(r, parser.parse(r.text), body.logprobs) for r in results]
            return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                                 "usage": _usage(len(prompt_ids), sum(len(r.token_ids) for r in results))})
        streams = [StreamingParser(parser) for _ in params]

        def pieces(u: SequenceUpdate):
            stream = streams[u.index]
            num_calls = len(stream.sent.tool_calls)
            new = stream.feed(u.text, final=u.finish_reason is not None)
            delta: dict[str, Any] = {}
            if new.reasoning:
                delta["reasoning_content"] = new.reasoning
            if new.content:
                delta["content"] = new.content
            if new.tool_calls:
                delta["tool_calls"] = [{"index": k, **_tool_call_json(call)}
                                       for k, call in enumerate(new.tool_calls, start=num_calls)]
            logprobs = self.chat_logprobs(u.logprobs) if body.logprobs and u.logprobs else None
            opened = {"index": u.index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
            closed = None if u.finish_reason is None else {
                "index": u.index, "delta": {}, "logprobs": None,
                "finish_reason": "tool_calls" if stream.sent.tool_calls else u.finish_reason}
            return opened if delta or logprobs else None, closed

        first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                 for i in range(len(params))]
        events = self.events(generation, {**head, "object": "chat.completion.chunk"}, pieces, len(prompt_ids),
                             body.include_usage, first)
        return GenerationResponse(generation, self.metrics, events)

    def chat_choice(self, result: SequenceUpdate, parsed: ParsedOutput, want_logprobs: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant",
                                   "content": parsed.content if parsed.content or not parsed.tool_calls else None}
        if parsed.reasoning:
            message["reasoning_content"] = parsed.reasoning
        if parsed.tool_calls:
            message["tool_calls"] = [_tool_call_json(c) for c in parsed.tool_calls]
        return {"index": result.index, "message": message,
                "logprobs": self.chat_logprobs(result.logprobs) if want_logprobs else None,
                "finish_reason": "tool_calls" if parsed.tool_calls else result.finish_reason}

    def chat_logprobs(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            token = self.token_text(token_id)
            return {"token": token, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(token.encode())}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in logprobs]}

    # ---- completions --------------------------------------------------------------------------------------------
    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt is empty", "prompt")
        return [self.encode(p, "prompt") if isinstance(p, str) else list(p) for p in prompts]

    async def complete(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        prompts = await run_in_threadpool(self.completion_prompts, body)
        requests = [(ids, params) for ids in prompts  # choice index = prompt index * n + i, as OpenAI numbers them
                    for params in self.sampling_params(body, body.max_tokens, "max_tokens", len(ids), body.logprobs)]
        generation, head = await self.submit(requests, "cmpl", "prompt", body.model)
        prompt_tokens, parser = sum(map(len, prompts)), OutputParser(self.control)
        want_logprobs = body.logprobs is not None
        if not body.stream:
            results = await self.collect(generation, request)
            choices = [{"index": r.index, "text": parser.parse(r.text).content,
                        "logprobs": self.completion_logprobs(r.logprobs, 0) if want_logprobs else None,
                        "finish_reason": r.finish_reason} for r in results]
            return JSONResponse({**head, "object": "text_completion", "choices": choices,
                                 "usage": _usage(prompt_tokens, sum(len(r.token_ids) for r in results))})
        streams, offsets = [StreamingParser(parser) for _ in requests], [0] * len(requests)

        def pieces(u: SequenceUpdate):
            text = streams[u.index].feed(u.text, final=u.finish_reason is not None).content
            logprobs = None
            if want_logprobs and u.logprobs:
                logprobs = self.completion_logprobs(u.logprobs, offsets[u.index])
                offsets[u.index] += sum(map(len, logprobs["tokens"]))
            if text or logprobs or u.finish_reason is not None:
                return {"index": u.index, "text": text, "logprobs": logprobs, "finish_reason": u.finish_reason}, None
            return None, None

        events = self.events(generation, {**head, "object": "text_completion"}, pieces, prompt_tokens,
                             body.include_usage)
        return GenerationResponse(generation, self.metrics, events)

    def completion_logprobs(self, logprobs: list[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens = [self.token_text(lp.token_id) for lp in logprobs]
        starts = [offset + sum(map(len, tokens[:i])) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [max(lp.logprob, MIN_LOGPROB) for lp in logprobs],
                "top_logprobs": [{self.token_text(t): max(v, MIN_LOGPROB) for t, v in lp.top} for lp in logprobs],
                "text_offset": starts}

    # ---- shared: into the engine and back -----------------------------------------------------------------------
    def sampling_params(self, body: GenerationRequest, max_tokens: int | None, max_tokens_field: str,
                        prompt_len: int, logprobs: int | None) -> list[SamplingParams]:
        """One set per choice (n of them); the seed of choice i is seed + i so that choices differ."""
        room = self.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = max(min(room, self.default_max_tokens or room), 1)
        elif 0 < room < max_tokens:
            raise APIError(400, f"{max_tokens_field} is {max_tokens}, but the prompt has {prompt_len} tokens and the "
                                f"context is {self.max_model_len}: at most {room} new tokens fit",
                           max_tokens_field)
        try:
            return [SamplingParams(max_tokens=max_tokens, temperature=_given(body.temperature, 1.0),
                                   top_p=_given(body.top_p, 1.0), top_k=_given(body.top_k, 0),
                                   seed=None if body.seed is None else (body.seed + i) % 2 ** 64,
                                   stop=body.stop or [], ignore_eos=body.ignore_eos, logprobs=logprobs)
                    for i in range(body.n)]
        except ValueError as e:  # SamplingParams names the field first: "top_p must be in (0, 1], got 2"
            param = str(e).split()[0]
            raise APIError(400, str(e), max_tokens_field if param == "max_tokens" else param) from None

    async def submit(self, requests: list[tuple[list[int], SamplingParams]], prefix: str, prompt_field: str,
                     model: str) -> tuple[Generation, dict[str, Any]]:
        """Hand the sequences to the engine; returns their Generation and the head of every answer."""
        if len(requests) > MAX_SEQUENCES_PER_REQUEST:
            raise APIError(400, f"{len(requests)} sequences in one request; at most {MAX_SEQUENCES_PER_REQUEST}",
                           "n")
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        try:
            generation = await self.client.submit(requests, request_id)
        except ValueError as e:  # the engine's own checks: context length, cache room, token ids
            raise APIError(400, str(e), prompt_field) from None
        return generation, {"id": request_id, "created": int(time.time()), "model": model}

    async def collect(self, generation: Generation, request: Request) -> list[SequenceUpdate]:
        """Every sequence's whole result; aborted as soon as the client disconnects."""
        results = [SequenceUpdate(i, "") for i in range(len(generation.request_ids))]

        async def gather():
            async for batch in generation.stream():
                for update in batch:
                    results[update.index].merge(update)

        work, watch = asyncio.ensure_future(gather()), asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            work.cancel(), watch.cancel()
            generation.abort()
        if work not in done:
            raise APIError(499, "the client closed the request")
        work.result()
        self.metrics.observe(generation)
        failed = [r.error for r in results if r.error]
        if failed:
            raise APIError(500, failed[0], kind="server_error")
        return results

    async def events(self, generation: Generation, chunk: dict[str, Any], pieces: ChoicePieces, prompt_tokens: int,
                     include_usage: bool, first_choices: list[dict[str, Any]] | None = None) -> AsyncIterator[str]:
        """Server-sent events: a chunk of delta choices per batch of updates, then one of closing choices; the
        usage chunk if asked; [DONE]. An engine failure ends the stream with an error event."""
        if first_choices:
            yield _sse({**chunk, "choices": first_choices})
        completion_tokens = 0
        async for batch in generation.stream():
            opened, closed = [], []
            for u in batch:
                if u.error:
                    yield _sse(APIError(500, u.error, kind="server_error").body()) + DONE
                    return
                completion_tokens += len(u.token_ids)
                delta, end = pieces(u)
                opened += [delta] if delta else []
                closed += [end] if end else []
            for choices in (opened, closed):
                if choices:
                    yield _sse({**chunk, "choices": choices})
        if include_usage:
            yield _sse({**chunk, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield DONE


class GenerationResponse(StreamingResponse):
    """Server-sent events of one generation. However the stream ends (done, client gone, server stopping), its
    unfinished sequences are aborted at once and their cache blocks freed."""

    def __init__(self, generation: Generation, metrics: Metrics, events: AsyncIterator[str]):
        super().__init__(_guarded(events), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation, self.metrics = generation, metrics

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.abort()
            self.metrics.observe(self.generation)


async def _guarded(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once the 200 is sent, a failure can only be reported in the stream."""
    try:
        async for event in events:
            yield event
    except Exception as e:
        log.exception("streaming a response failed")
        yield _sse(APIError(500, f"{type(e).__name__}: {e}", kind="server_error").body()) + DONE


def _max_prompt_chars(tokenizer: Tokenizer, max_model_len: int) -> int | None:
    """The most characters a prompt of max_model_len tokens can have, if the tokenizer is a byte-level BPE that keeps
    every byte of its input (no normalizer, no pre-tokenizer that drops text, no added token that swallows the
    spaces beside it): each token then stands for at most as many characters as its vocabulary entry has UTF-8
    bytes. None for other tokenizers: no bound is safe there."""
    backend = tokenizer.backend
    normalizer = json.loads(backend.normalizer.__getstate__()) if backend.normalizer else None
    pre_tokenizer = backend.pre_tokenizer.__getstate__().decode() if backend.pre_tokenizer else ""
    keeps_every_byte = (
        normalizer in (None, {"type": "Sequence", "normalizers": []}) and type(backend.model).__name__ == "BPE"
        and '"ByteLevel"' in pre_tokenizer and '"Removed"' not in pre_tokenizer
        and not any(t.lstrip or t.rstrip for t in backend.get_added_tokens_decoder().values()))
    if not keeps_every_byte:
        return None
    return max_model_len * max((len(token.encode()) for token in backend.get_vocab(with_added_tokens=True)), default=1)


def _given(value, default):
    return default if value is None else value


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _tool_call_json(call) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
