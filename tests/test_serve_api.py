"""The OpenAI API over HTTP, served as `dsv3 serve` serves it (the front-end in a process of its own): every bad
request is a 4xx with an OpenAI error body, fuzzed bodies never get a 5xx, a failing engine step fails only its
requests, tools go through the chat template; and the in-process app (create_app) answers the same. The app's
limits and options: body size, prompt length before tokenizing, API key on metrics and docs, model names, default
max_tokens."""

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

from dsv3.engine.llm import LLM  # noqa: E402
from dsv3.serve.frontend import Frontend  # noqa: E402
from dsv3.serve.command import default_model_names  # noqa: E402
from dsv3.serve.openai_api import create_app  # noqa: E402
from dsv3.serve.protocol import ChatCompletionRequest  # noqa: E402

MODEL = "tiny-chat"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HELLO = [{"role": "user", "content": "Hello!"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def tiny_llm(chat_checkpoint):
    return LLM(chat_checkpoint, max_model_len=64, max_num_seqs=16)  # a short context keeps fuzzed requests quick


@pytest.fixture(scope="module")
def llm(chat_checkpoint):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine loop, the front-end process and the client share 2 cores
    yield tiny_llm(chat_checkpoint)
    torch.set_num_threads(threads)


@contextmanager
def serving(engine, api_servers: int = 1):
    """The server as `dsv3 serve` runs it, the front-end in a process of its own, but with the engine loop in a
    thread of this process, so tests can look inside the engine; yields the base URL and the Frontend once /health
    answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    frontend = Frontend(engine, MODEL, port=port, shutdown_timeout=2, log_level="warning", api_servers=api_servers)
    thread = threading.Thread(target=frontend.run, daemon=True)
    thread.start()
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    try:
        while True:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield base, frontend
    finally:
        frontend.stop()
        thread.join(30)
    assert not thread.is_alive() and not engine.has_unfinished()


@pytest.fixture(scope="module")
def client(llm):
    with serving(llm.engine) as (base, _), httpx.Client(base_url=base, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def inprocess(chat_checkpoint, llm):
    """The app with its engine loop in a thread of this process (FastAPI's TestClient), on an engine of its own
    (made after `llm`, under its one torch thread)."""
    with TestClient(create_app(tiny_llm(chat_checkpoint), MODEL)) as client:
        yield client


@pytest.fixture(scope="module")
def spare_engine(chat_checkpoint, llm):
    """An engine for apps made with options, one at a time (made after `llm`, under its one torch thread)."""
    return tiny_llm(chat_checkpoint).engine


def assert_idle(engine):
    """No request left behind: nothing queued or running, every cache block free."""
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.blocks.num_free == engine.blocks.num_blocks


def chat(**fields):
    return {"model": MODEL, "messages": HELLO, "max_tokens": 4, **fields}


def completion(**fields):
    return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, **fields}


BAD_REQUESTS = [
    # (path, body, status, param, words the message must contain)
    (CHAT, b"{not json", 400, None, "not valid JSON"),
    (CHAT, b"[]", 400, None, "dictionary"),
    (CHAT, b"", 400, None, "send a JSON object"),
    (CHAT, {"model": MODEL}, 400, "messages", "required"),
    (CHAT, chat(messages=[]), 400, "messages", "at least 1"),
    (CHAT, chat(messages="hi"), 400, "messages", "list"),
    (CHAT, chat(messages=[{"role": "robot", "content": "hi"}]), 400, "messages.0.role", "'user'"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     None, "text"),
    (CHAT, chat(model="gpt-9"), 404, "model", "gpt-9"),
    (CHAT, chat(max_tokens=-1), 400, "max_tokens", "at least 1"),
    (CHAT, chat(max_tokens=10 ** 12), 400, "max_tokens", "context"),
    (CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens", "at least 1"),
    (CHAT, chat(temperature="hot"), 400, "temperature", "number"),
    (CHAT, chat(temperature=-0.5), 400, "temperature", ">= 0"),
    (CHAT, b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
     "temperature", "finite"),
    (CHAT, chat(top_p=0), 400, "top_p", "(0, 1]"),
    (CHAT, chat(top_k=-7), 400, "top_k", "top_k"),
    (CHAT, chat(n=0), 400, "n", "greater than or equal to 1"),
    (CHAT, chat(n=100000), 400, "n", "less than or equal to 128"),
    (CHAT, chat(stop=[""]), 400, "stop", "non-empty"),
    (CHAT, chat(seed=2 ** 70), 400, "seed", "less than"),
    (CHAT, chat(logprobs=True, top_logprobs=50), 400, "logprobs", "between 0 and 20"),
    (CHAT, chat(top_logprobs=2), 400, "top_logprobs", "logprobs set to true"),
    (CHAT, chat(tools=["get_weather"]), 400, "tools.0", "valid"),
    (CHAT, chat(tools=[WEATHER_TOOL], tool_choice="required"), 400, "tool_choice", "auto"),
    (CHAT, chat(frequency_penalty=0.5), 400, "frequency_penalty", "not supported"),
    (CHAT, chat(response_format={"type": "json_object"}), 400, "response_format", "'json_object' is not supported"),
    (CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}), 400,
     "response_format", "'json_schema' is not supported"),
    (CHAT, chat(response_format="json"), 400, "response_format", "valid"),
    (CHAT, b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages.0.content",
     "surrogate"),
    (CHAT, b'{"model": "tiny-chat", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfff"}]}]}',
     400, "messages.0.content.0.text", "surrogate"),
    (CHAT, b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', 400, "model", "surrogate"),
    (CHAT, chat(messages=[{"role": "user", "content": "word " * 100}]), 400, "messages", "context"),
    (COMPLETIONS, {"model": MODEL}, 400, "prompt", "required"),
    (COMPLETIONS, completion(prompt=[]), 400, "prompt", "empty"),
    (COMPLETIONS, completion(prompt=[[]]), 400, "prompt", "empty"),
    (COMPLETIONS, completion(prompt=[5, -2]), 400, "prompt", "token ids"),
    (COMPLETIONS, completion(prompt=[[1, 2], [10 ** 10]]), 400, "prompt", "token ids"),
    (COMPLETIONS, completion(prompt={"text": "hi"}), 400, "prompt", "valid"),
    (COMPLETIONS, completion(echo=True), 400, "echo", "not supported"),
    (COMPLETIONS, completion(logprobs=21), 400, "logprobs", "between 0 and 20"),
    (COMPLETIONS, completion(prompt=["a"] * 200, n=2), 400, "n", "at most 256"),
    (COMPLETIONS, b'{"model": "tiny-chat", "prompt": "\\ud800"}', 400, "prompt", "surrogate"),
    (COMPLETIONS, b'{"model": "tiny-chat", "prompt": ["ok", "\\ud800 x"]}', 400, "prompt.1", "surrogate"),
    (COMPLETIONS, b'{"model": "tiny-chat", "prompt": "hi", "stop": {"\\ud800": 1}}', 400, "stop", "surrogate"),
    (COMPLETIONS, completion(response_format={"type": "json_object"}), 400, "response_format", "not supported"),
    (COMPLETIONS, completion(prompt="word " * 20_000), 400, "prompt", "more than the 64-token context can hold"),
]


@pytest.mark.parametrize("path,body,status,param,words", BAD_REQUESTS)
def test_bad_requests_get_an_openai_error_naming_the_problem(client, llm, path, body, status, param, words):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert words in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert_idle(llm.engine)


def test_unknown_routes_and_methods_get_error_bodies(client):
    for method, path, status in [("GET", "/v2/nothing", 404), ("GET", CHAT, 405), ("DELETE", "/v1/models", 405)]:
        r = client.request(method, path)
        assert r.status_code == status and r.json()["error"]["message"]


def test_models_health_and_one_of_each_answer(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL]
    assert client.get(f"/v1/models/{MODEL}").json()["max_model_len"] == 64
    assert client.get("/v1/models/other").status_code == 404
    answer = client.post(CHAT, json=chat(logprobs=True, top_logprobs=2, n=2)).json()
    assert answer["object"] == "chat.completion" and len(answer["choices"]) == 2
    for choice in answer["choices"]:
        assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["message"]["content"], str)
        entries = choice["logprobs"]["content"]
        assert entries and all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in entries)
    usage = answer["usage"]
    assert usage["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in answer["choices"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    texts = client.post(COMPLETIONS, json=completion(prompt=["a b", "c d"], n=2, logprobs=1)).json()["choices"]
    assert [c["index"] for c in texts] == [0, 1, 2, 3]
    assert all(len(c["logprobs"]["tokens"]) == len(c["logprobs"]["top_logprobs"]) for c in texts)


def test_response_format_text_is_accepted(client):
    assert client.post(CHAT, json=chat(response_format={"type": "text"})).status_code == 200


def test_without_max_tokens_the_answer_may_fill_the_context(client):
    choice, usage = (client.post(COMPLETIONS, json={"model": MODEL, "prompt": [0, 5, 6], "ignore_eos": True}).json()[k]
                     for k in ("choices", "usage"))
    assert choice[0]["finish_reason"] == "length" and usage["completion_tokens"] == 64 - 3


def test_seeded_sampling_repeats_and_choices_differ(client):
    body = completion(n=3, temperature=1.0, seed=1234, max_tokens=6)
    first, again = (client.post(COMPLETIONS, json=body).json()["choices"] for _ in range(2))
    assert [c["text"] for c in first] == [c["text"] for c in again]
    assert len({c["text"] for c in first}) > 1


def test_the_in_process_app_answers_the_same(client, inprocess):
    """create_app (its engine loop in a thread beside the event loop) gives the answers of the front-end process.
    Logprobs to 1e-4: the two servers may batch the choices differently, which moves float32 logits
    by rounding (tokens are batch-invariant, their log-probabilities only to rounding); streams per choice."""
    def same(a, b) -> bool:  # equal, floats to 1e-4
        if isinstance(a, float) and isinstance(b, float):
            return abs(a - b) <= 1e-4
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a == b

    def choices(r):
        assert r.status_code == 200, r.text
        if not r.headers["content-type"].startswith("text/event-stream"):
            return r.json()["choices"]
        # A stream joined per choice: how many steps one chunk carries depends on timing.
        joined = {}
        for line in r.text.splitlines():
            for c in json.loads(line[6:])["choices"] if line.startswith("data: {") else []:
                j = joined.setdefault(c["index"], {"content": "", "logprobs": [], "finish_reason": None})
                j["content"] += c["delta"].get("content") or ""
                j["logprobs"] += (c.get("logprobs") or {}).get("content") or []
                j["finish_reason"] = c["finish_reason"] or j["finish_reason"]
        return joined

    for path, body in [(CHAT, chat(n=2, temperature=0, logprobs=True, top_logprobs=2, stream=True)),
                       (COMPLETIONS, completion(prompt=["a b", "c d"], temperature=0, max_tokens=6, logprobs=2))]:
        split, in_process = choices(client.post(path, json=body)), choices(inprocess.post(path, json=body))
        assert same(split, in_process), (split, in_process)


def test_tools_are_rendered_through_the_chat_template(inprocess):
    server = inprocess.app.state.server
    body = ChatCompletionRequest(**chat(tools=[WEATHER_TOOL]))
    text, ids = server.render_chat(body)
    assert "## Tools" in text and "### get_weather" in text and '"required": ["city"]' in text
    assert "<｜tool▁calls▁begin｜>" in text  # the call syntax the model is told to use
    plain, _ = server.render_chat(ChatCompletionRequest(**chat(tools=[WEATHER_TOOL], tool_choice="none")))
    assert "## Tools" not in plain
    # An earlier call and its result go back to the model in DeepSeek's tokens.
    history = [*HELLO, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}]
    text, _ = server.render_chat(ChatCompletionRequest(**chat(messages=history, tools=[WEATHER_TOOL])))
    assert '<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```' in text and "Sunny<｜tool▁output▁end｜>" in text


def test_a_failing_engine_step_fails_its_requests_and_the_server_goes_on(client, llm, monkeypatch):
    runner, real_run, failures = llm.engine.runner, llm.engine.runner.run, []

    def failing_once(step):
        if not failures:
            failures.append(step)
            raise RuntimeError("simulated device error")
        return real_run(step)

    monkeypatch.setattr(runner, "run", failing_once)
    r = client.post(CHAT, json=chat())
    assert r.status_code == 500 and "simulated device error" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "server_error"
    assert_idle(llm.engine)
    assert client.post(CHAT, json=chat()).status_code == 200
    failures.clear()
    stream = client.post(CHAT, json=chat(stream=True)).text
    assert "simulated device error" in stream and stream.endswith("data: [DONE]\n\n")
    assert client.post(CHAT, json=chat(stream=True)).text.endswith("data: [DONE]\n\n")
    assert_idle(llm.engine)


def test_metrics_are_prometheus_text(client):
    client.post(CHAT, json=chat())
    client.post(CHAT, json=chat(model="nope"))
    text = client.get("/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['dsv3_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert samples['dsv3_requests_total{endpoint="/v1/chat/completions",status="404"}'] >= 1
    assert samples["dsv3_generation_tokens_total"] > 0 and samples["dsv3_prompt_tokens_total"] > 0
    assert samples["dsv3_cache_blocks_free"] == samples["dsv3_cache_blocks_total"]
    assert samples["dsv3_requests_running"] == samples["dsv3_requests_waiting"] == 0
    assert samples["dsv3_spec_off_sequences_total"] == 0  # no speculation in this server
    assert samples["dsv3_engine_gpu_wait_seconds_total"] == 0  # the CPU's results are there at once: no wait
    count = samples["dsv3_time_to_first_token_seconds_count"]
    assert count >= 1 and samples['dsv3_time_to_first_token_seconds_bucket{le="+Inf"}'] == count


# ---- fuzzing -----------------------------------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 8) | st.sampled_from([2 ** 31, 2 ** 64, -(2 ** 63) - 1, 10 ** 30])
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


def mostly(valid):
    """A valid value 9 times in 10 (so that requests get through to the engine), else any JSON value."""
    return st.integers(0, 9).flatmap(lambda k: JSON if k == 0 else valid)


MESSAGE = st.fixed_dictionaries({"role": mostly(st.sampled_from(["system", "user", "assistant", "tool", "developer"]))},
                                optional={"content": mostly(st.text(max_size=30)), "tool_calls": mostly(st.just(
                                    [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]))})
SHARED = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50), "seed": st.integers(-(2 ** 63), 2 ** 64 - 1),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=2),
    "n": st.integers(1, 3), "stream": st.booleans(), "stream_options": st.fixed_dictionaries(
        {"include_usage": st.booleans()}), "presence_penalty": st.just(0), "user": st.text(max_size=5),
}
CHAT_FIELDS = {
    **SHARED, "max_completion_tokens": st.integers(1, 6), "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5),
    "tools": st.just([WEATHER_TOOL]), "tool_choice": st.sampled_from(["auto", "none"]),
    "chat_template_kwargs": st.dictionaries(st.sampled_from(["thinking", "bos_token", "x"]), JSON, max_size=2),
}
COMPLETION_FIELDS = {**SHARED, "logprobs": st.integers(0, 5)}
PROMPT = (st.text(max_size=40) | st.lists(st.integers(0, 129279), min_size=1, max_size=4)
          | st.lists(st.text(max_size=10), min_size=1, max_size=2))


def body_of(required: dict, optional: dict):
    return st.fixed_dictionaries({k: mostly(v) for k, v in required.items()},
                                 optional={k: mostly(v) for k, v in optional.items()})


def check_answer(r):
    event(f"status {r.status_code}")  # pytest --hypothesis-show-statistics: how many bodies got through
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n")
    else:
        assert r.json()["choices"] and r.json()["usage"]["total_tokens"] > 0


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=body_of({"model": st.just(MODEL), "messages": st.lists(MESSAGE, min_size=1, max_size=3),
                     "max_tokens": st.integers(1, 6)}, CHAT_FIELDS))
def test_fuzzed_chat_bodies_never_get_a_5xx(client, llm, body):
    check_answer(client.post(CHAT, json=body))
    assert_idle(llm.engine)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=body_of({"model": st.just(MODEL), "prompt": PROMPT, "max_tokens": st.integers(1, 6)}, COMPLETION_FIELDS))
def test_fuzzed_completion_bodies_never_get_a_5xx(client, llm, body):
    check_answer(client.post(COMPLETIONS, json=body))
    assert_idle(llm.engine)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from([CHAT, COMPLETIONS, "/v1/models", "/nowhere"]),
       raw=st.binary(max_size=60) | JSON.map(lambda v: json.dumps(v).encode()),
       content_type=st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"]))
def test_fuzzed_raw_bytes_never_get_a_5xx(client, path, raw, content_type):
    check_answer(client.post(path, content=raw, headers={"content-type": content_type}))


# ---- limits and options of the app ------------------------------------------------------------------------------
def test_a_prompt_too_long_for_the_context_is_refused_before_it_is_tokenized(inprocess, monkeypatch):
    """A text of more characters than max_model_len tokens can stand for is refused by its length; a text of long
    tokens that fits is not (the bound is each token's longest possible text, not an average)."""
    tokenizer = inprocess.app.state.server.tokenizer
    encoded, encode = [], tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text, **kw: encoded.append(len(text)) or encode(text, **kw))
    huge = "word " * 200_000
    for path, body, param in [(COMPLETIONS, completion(prompt=huge), "prompt"),
                              (CHAT, chat(messages=[{"role": "user", "content": huge}]), "messages")]:
        r = inprocess.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert "context can hold" in r.json()["error"]["message"]
    assert not any(n >= len(huge) for n in encoded), encoded
    vocab = tokenizer.backend.get_vocab()
    longest = tokenizer.decode([max(vocab.values(), key=lambda i: len(tokenizer.decode([i])))])
    long_tokens = longest * (50 // len(encode(longest, add_special_tokens=False)))
    assert len(long_tokens) > 64 * 64 and len(encode(long_tokens)) < 64  # over 64 characters a token, yet it fits
    r = inprocess.post(COMPLETIONS, json=completion(prompt=long_tokens, max_tokens=1))
    assert r.status_code == 200, r.text


def test_the_length_bound_is_only_for_tokenizers_that_keep_every_character(llm):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, normalizers, pre_tokenizers

    from dsv3.serve.completions import _max_prompt_chars
    from dsv3.tokenizer import Tokenizer

    assert _max_prompt_chars(llm.tokenizer, 64) == 64 * 256  # DeepSeek's longest entry: 128 spaces, 2 bytes each
    backend = Backend(models.BPE())
    for pre_tokenizer, normalizer in [(pre_tokenizers.Whitespace(), None),  # drops the spaces
                                      (pre_tokenizers.ByteLevel(), normalizers.Strip())]:
        backend.pre_tokenizer, backend.normalizer = pre_tokenizer, normalizer
        assert _max_prompt_chars(Tokenizer(backend, None, None, add_bos_token=False), 64) is None


def test_tokenizing_a_long_prompt_leaves_the_event_loop_running(llm):
    """The server tokenizes in a worker thread (run_in_threadpool); the tokenizer must let go of the GIL meanwhile,
    or the event loop, /health and every stream wait for it (a 5 MB prompt: 7 s)."""
    text = "word " * 200_000

    async def loop_turns_while_tokenizing():
        work, turns = asyncio.ensure_future(run_in_threadpool(llm.tokenizer.encode, text)), 0
        while not work.done():
            await asyncio.sleep(0.001)
            turns += 1
        return turns, len(await work)

    turns, num_tokens = asyncio.run(loop_turns_while_tokenizing())
    assert num_tokens > 200_000 and turns >= 10, turns  # holding the GIL, encode let the loop turn once or twice


def test_a_body_over_the_limit_gets_413_before_it_is_read(spare_engine):
    with TestClient(create_app(spare_engine, MODEL, max_request_bytes=2000)) as http:
        as_json = {"content-type": "application/json"}
        body = json.dumps(completion(user="x" * 1900)).encode()  # (an unused field)
        assert len(body) < 2000 and http.post(COMPLETIONS, content=body, headers=as_json).status_code == 200
        too_big = json.dumps(completion(user="x" * 2100)).encode()
        chunked = (too_big[i:i + 500] for i in range(0, len(too_big), 500))  # no Content-Length: counted as it comes
        for content in (too_big, chunked):
            r = http.post(COMPLETIONS, content=content, headers=as_json)
            assert r.status_code == 413, r.text
            error = r.json()["error"]
            assert "2,000 bytes" in error["message"] and error["type"] == "invalid_request_error"
        assert_idle(spare_engine)


@pytest.mark.parametrize("public", [False, True])
def test_with_an_api_key_metrics_and_docs_need_it_unless_made_public(spare_engine, public):
    with TestClient(create_app(spare_engine, MODEL, api_key="sk-test", public_metrics_and_docs=public)) as http:
        key = {"Authorization": "Bearer sk-test"}
        assert http.get("/health").status_code == 200
        assert http.get("/v1/models").status_code == 401 and http.get("/v1/models", headers=key).status_code == 200
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
            r = http.get(path)
            assert r.status_code == (200 if public else 401), (path, r.text)
            assert http.get(path, headers=key).status_code == 200
        if not public:
            assert r.json()["error"]["code"] == "invalid_api_key"


def test_a_model_may_be_served_under_several_names(spare_engine):
    with TestClient(create_app(spare_engine, ["DeepSeek-V3", "dsv3"])) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["DeepSeek-V3", "dsv3"]
        assert http.get("/v1/models/dsv3").json()["id"] == "dsv3"
        for name in ("DeepSeek-V3", "dsv3"):
            r = http.post(CHAT, json=chat(model=name))
            assert r.status_code == 200 and r.json()["model"] == name, r.text
        r = http.post(CHAT, json=chat(model=MODEL))
        assert r.status_code == 404 and "'DeepSeek-V3' or 'dsv3'" in r.json()["error"]["message"]


def test_the_default_model_names_are_the_checkpoint_directory_s(tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt-0123"
    checkpoint.mkdir()
    (tmp_path / "DeepSeek-V3").symlink_to(checkpoint)
    assert default_model_names(str(tmp_path / "DeepSeek-V3")) == ["DeepSeek-V3", "ckpt-0123"]
    assert default_model_names(f"{checkpoint}/") == ["ckpt-0123"]
    monkeypatch.chdir(checkpoint)
    assert default_model_names(".") == ["ckpt-0123"]
    assert default_model_names(None) == ["dsv3"]


def test_default_max_tokens_caps_only_requests_that_set_none(spare_engine):
    with TestClient(create_app(spare_engine, MODEL, default_max_tokens=3)) as http:
        for body, expected in [({}, 3), ({"max_tokens": 5}, 5), ({"prompt": [0] * 62}, 2)]:
            r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": [0, 5, 6], "ignore_eos": True, **body})
            assert r.json()["usage"]["completion_tokens"] == expected, (body, r.text)


def test_an_idle_keep_alive_connection_outlives_the_clients_expiry(client):
    """httpx (and the openai client) let an idle connection go after 5 s; a server that closed it at 5 s too could
    close it just as a client sends on it (a ReadError). The server keeps it longer: a request sent on one connection
    6 s after the one before is answered."""
    import http.client

    connection = http.client.HTTPConnection(client.base_url.host, client.base_url.port, timeout=10)
    try:
        for wait in (0, 6):
            time.sleep(wait)
            connection.request("GET", "/health")
            response = connection.getresponse()   # RemoteDisconnected if the server had closed it meanwhile
            assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}
            port = connection.sock.getsockname()[1] if wait == 0 else port
        assert connection.sock.getsockname()[1] == port   # the same connection, not a new one
    finally:
        connection.close()
