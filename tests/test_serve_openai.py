"""A real server on loopback, as `dsv3 serve` runs it (the HTTP front-end in a process of its own), driven by the
`openai` client and httpx: streamed answers equal whole ones, tool calls and reasoning come back parsed, hundreds of
concurrent requests each get exactly their own answer, a client that leaves frees its cache at once, the front-end
process loads no model, and `python -m dsv3 serve` checks API keys and stops on SIGTERM."""

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from test_serve_api import serving  # noqa: E402  (the server fixture of both files)

import dsv3.engine.llm as engine_module  # noqa: E402
from dsv3.engine.llm import LLM  # noqa: E402

MODEL = "tiny-chat"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CALL_TEXT = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                  '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')


@pytest.fixture(scope="module")
def llm(chat_checkpoint):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine loop, the front-end process and the clients share 2 cores
    yield LLM(chat_checkpoint, max_num_seqs=128)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(llm):
    with serving(llm.engine) as (base, frontend):
        yield base
    assert frontend.process.exitcode == 0


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def scripted(monkeypatch, llm):
    """script(seed, text): requests with that seed generate exactly `text` (then EOS), whatever the model says.
    A tiny random model never writes a tool call by itself."""
    scripts, progress, sample = {}, {}, engine_module.sample

    def scripted_sample(logits, params, generators, argmax=None):
        tokens = sample(logits, params, generators, argmax)  # (in place: the next step reads its tokens there)
        for row, (p, generator) in enumerate(zip(params, generators)):
            if p.seed in scripts:
                ids, k = scripts[p.seed], progress.get(generator, 0)
                tokens[row] = ids[min(k, len(ids) - 1)]
                progress[generator] = k + 1
        return tokens

    monkeypatch.setattr(engine_module, "sample", scripted_sample)

    def script(seed: int, text: str) -> None:
        scripts[seed] = llm.tokenizer.encode(text, add_special_tokens=False) + [llm.tokenizer.eos_token_id]

    return script


def wait_until_idle(engine, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while engine.requests or engine.has_unfinished() or engine.blocks.num_free != engine.blocks.num_blocks:
        assert time.monotonic() < deadline, "requests or cache blocks were left behind"
        time.sleep(0.01)


def join_chat_stream(chunks, n: int):
    """Per choice: (content, reasoning_content, tool calls, finish_reason); and the usage of the last chunk."""
    content, reasoning, calls, finish, usage = [""] * n, [""] * n, [[] for _ in range(n)], [None] * n, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for c in chunk.choices:
            content[c.index] += c.delta.content or ""
            reasoning[c.index] += getattr(c.delta, "reasoning_content", None) or ""
            calls[c.index] += [(t.function.name, t.function.arguments) for t in c.delta.tool_calls or []]
            finish[c.index] = c.finish_reason or finish[c.index]
    return list(zip(content, reasoning, calls, finish)), usage


def test_chat_streamed_equals_whole_at_temperature_0(client, llm):
    request = dict(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "What is DeepSeek-V3?"}],
                   max_tokens=12, temperature=0, n=2)
    whole = client.chat.completions.create(**request)
    streamed, usage = join_chat_stream(client.chat.completions.create(
        **request, stream=True, stream_options={"include_usage": True}), 2)
    assert [(c.message.content, c.finish_reason) for c in whole.choices] == [(s[0], s[3]) for s in streamed]
    assert whole.choices[0].message.content and whole.choices[0].finish_reason == "length"
    assert usage.model_dump() == whole.usage.model_dump() and whole.usage.completion_tokens == 24
    wait_until_idle(llm.engine)


def test_completions_streamed_equals_whole_at_temperature_0(client):
    request = dict(model=MODEL, prompt=["The sea", "A king"], max_tokens=10, temperature=0, logprobs=2)
    whole = client.completions.create(**request)
    texts, tokens = ["", ""], [[], []]
    for chunk in client.completions.create(**request, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
            tokens[c.index] += c.logprobs.tokens if c.logprobs else []
    assert [c.text for c in whole.choices] == texts
    assert [c.logprobs.tokens for c in whole.choices] == tokens
    assert all(len(c.logprobs.top_logprobs[0]) == 2 for c in whole.choices)


def test_tool_calls_come_back_parsed(client, scripted):
    scripted(101, "Let me check." + TOOL_CALL_TEXT)
    request = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL],
                   seed=101, temperature=0, max_tokens=60)
    whole = client.chat.completions.create(**request).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Let me check."
    (call,) = whole.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    [(content, _, calls, finish)], _ = join_chat_stream(client.chat.completions.create(**request, stream=True), 1)
    assert (content, calls, finish) == ("Let me check.", [("get_weather", '{"city": "Paris"}')], "tool_calls")


def test_reasoning_comes_apart_from_content(client, scripted):
    scripted(202, "<think>Two and two make four.</think>Four.")
    request = dict(model=MODEL, messages=[{"role": "user", "content": "2+2?"}], seed=202, temperature=0, max_tokens=40)
    message = client.chat.completions.create(**request).choices[0].message
    assert (message.content, message.reasoning_content) == ("Four.", "Two and two make four.")
    [(content, reasoning, _, finish)], _ = join_chat_stream(client.chat.completions.create(**request, stream=True), 1)
    assert (content, reasoning, finish) == ("Four.", "Two and two make four.", "stop")


def test_errors_reach_the_client_as_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert "temperature" in bad.value.message and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt="word " * 300, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=100_000)


def test_hundreds_of_concurrent_requests_each_get_their_own_answer(server, llm):
    """300 requests at once (60 different ones, each 5 times): every one completes with exactly the answer it gets
    alone, they share the batch (far fewer engine steps than tokens), and the cache is all free afterwards."""
    distinct = ([("/v1/completions", {"prompt": f"Request {i}:" + " word" * (i % 7), "max_tokens": 4 + i % 5})
                 for i in range(30)] +
                [("/v1/chat/completions", {"messages": [{"role": "user", "content": f"Question {i}" + "?" * (i % 5)}],
                                           "max_tokens": 4 + i % 5}) for i in range(30)])
    order = [i % len(distinct) for i in range(300)]
    random.Random(0).shuffle(order)

    async def send(client, path, body):
        r = await client.post(path, json={"model": MODEL, "temperature": 0, **body})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice.get("text", choice.get("message", {}).get("content")), choice["finish_reason"]

    async def main():
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
        async with httpx.AsyncClient(base_url=server, timeout=120, limits=limits) as client:
            alone = [await send(client, path, body) for path, body in distinct]
            steps = llm.engine.stats["steps"]
            together = await asyncio.gather(*(send(client, *distinct[i]) for i in order))
            return alone, together, llm.engine.stats["steps"] - steps

    start = time.monotonic()
    alone, together, steps = asyncio.run(asyncio.wait_for(main(), timeout=150))
    assert [alone[i] for i in order] == together
    generated = sum(distinct[i][1]["max_tokens"] for i in order)
    assert steps < generated / 10, f"{steps} engine steps for {generated} tokens: requests were not batched"
    wait_until_idle(llm.engine)
    metrics = httpx.get(f"{server}/metrics").text
    assert f"dsv3_cache_blocks_free {llm.engine.blocks.num_blocks}" in metrics
    print(f"\n300 concurrent requests in {time.monotonic() - start:.1f}s ({steps} engine steps)")


def test_a_client_that_leaves_frees_its_sequence_at_once(server, llm, monkeypatch):
    real_step = llm.engine.step

    def slow_step():  # 200 tokens would take 4 s or more: the request cannot end by itself during the test
        time.sleep(0.02)
        return real_step()

    monkeypatch.setattr(llm.engine, "step", slow_step)
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 200, "ignore_eos": True}
    with httpx.Client(base_url=server, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = (line for line in r.iter_lines() if line.startswith("data: "))
            for _ in range(3):
                next(events)
            (seq,) = llm.engine.requests.values()
    wait_until_idle(llm.engine, seconds=2)
    assert seq.finish_reason == "abort" and len(seq.output_token_ids) < 100

    async def leave_while_waiting():
        async with httpx.AsyncClient(base_url=server, timeout=30) as http:
            request = asyncio.ensure_future(http.post("/v1/completions", json=body))
            while not llm.engine.requests:
                await asyncio.sleep(0.01)
            (seq,) = llm.engine.requests.values()
            request.cancel()
            return seq

    seq = asyncio.run(leave_while_waiting())
    wait_until_idle(llm.engine, seconds=2)
    assert seq.finish_reason == "abort" and len(seq.output_token_ids) < 100


LONG_STREAM = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 200, "ignore_eos": True, "stream": True}


def slow_down(engine, monkeypatch, seconds: float) -> None:
    """Each engine step takes `seconds` longer, so that a stream lasts while the test acts on the server."""
    real_step = engine.step

    def slow_step():
        time.sleep(seconds)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)


def test_when_the_front_end_dies_the_engine_loop_drops_its_requests_and_ends(llm, monkeypatch):
    """Each process sees the other's end of the pipe close: here the engine loop cancels what the dead front-end
    had asked for, frees the cache and returns (as `dsv3 serve` would, with the front-end's status)."""
    slow_down(llm.engine, monkeypatch, 0.02)
    with serving(llm.engine) as (base, frontend), httpx.stream("POST", f"{base}/v1/completions", json=LONG_STREAM) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        (seq,) = llm.engine.requests.values()
        os.kill(frontend.process.pid, signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):  # cut off without [DONE]
            list(lines)
        wait_until_idle(llm.engine, seconds=5)
    assert seq.finish_reason == "abort" and len(seq.output_token_ids) < 100 and frontend.process.exitcode == -9


def test_a_stream_still_running_at_the_shutdown_timeout_ends_with_an_error_event_and_done(llm, monkeypatch):
    """On SIGTERM, uvicorn lets running requests go on for the shutdown timeout (serving's: 2 s), then cancels them,
    which would cut a stream mid-body; the engine loop is stopped first, so the stream ends as an error."""
    slow_down(llm.engine, monkeypatch, 0.05)  # 200 tokens take 10 s or more: the stream outlives the timeout
    with serving(llm.engine) as (base, frontend), httpx.stream("POST", f"{base}/v1/completions", json=LONG_STREAM) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        frontend.stop()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["message"] == "the server is shutting down" and error["type"] == "server_error"
    assert len(rest) < 150 and frontend.process.exitcode == 0


def test_the_front_end_process_loads_no_model():
    """What the front-end process imports (its entry point's module, the app, uvicorn, the tokenizer it is sent)
    pulls in neither the model nor the engine: it holds no GPU memory and has no CUDA to initialize."""
    code = ("import sys, uvicorn, dsv3.serve.frontend, dsv3.serve.openai_api, dsv3.tokenizer; "
            "print([m for m in sys.modules if m.startswith(('dsv3.model', 'dsv3.engine.llm', 'dsv3.kernels', "
            "'dsv3.checkpoint', 'triton'))])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_dsv3_serve_checks_the_api_key_and_stops_cleanly_on_sigterm(chat_checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "dsv3", "serve", "--model", str(chat_checkpoint), "--port", str(port),
               "--api-key", "sk-test", "--served-model-name", MODEL, "DeepSeek-V3", "--max-num-seqs", "4",
               "--shutdown-timeout", "1", "--max-request-bytes", "4000", "--default-max-tokens", "2"]
    proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "dsv3 serve did not start"
            try:
                if httpx.get(f"{base}/health").status_code == 200:  # health needs no key
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/metrics").status_code == 401 and httpx.get(f"{base}/docs").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == [MODEL, "DeepSeek-V3"]
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert answer.usage.completion_tokens >= 1
        answer = client.completions.create(model="DeepSeek-V3", prompt="hi", extra_body={"ignore_eos": True})
        assert answer.usage.completion_tokens == 2  # --default-max-tokens
        with pytest.raises(openai.APIStatusError) as too_big:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=1, user="x" * 4000)
        assert too_big.value.status_code == 413
        # SIGTERM in the middle of a stream: the server stops taking requests, lets the stream run for up to
        # --shutdown-timeout seconds, stops the engine loop (which ends the stream with an error event) and exits
        # with status 0.
        stream = client.completions.create(model=MODEL, prompt="Once", max_tokens=250, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shutting down"):
            list(stream)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    assert "Finished server process" in output, output


def test_several_front_ends_share_the_port_and_the_engine(llm):
    """--api-servers 2: two front-end processes on one port (SO_REUSEPORT) over one engine loop. Concurrent requests
    each get their own answer, every /metrics shows the totals of both, and when one front-end dies the other goes on
    serving (the dead one's requests are dropped, not the engine)."""
    prompts = [f"Request {i}:" + " word" * (i % 5) for i in range(40)]

    async def ask(base):
        limits = httpx.Limits(max_connections=40, max_keepalive_connections=0)  # a new connection each: both get some
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
            async def one(prompt):
                r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 5,
                                                               "temperature": 0})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]
            return await asyncio.gather(*(one(p) for p in prompts))

    with serving(llm.engine, api_servers=2) as (base, frontend):
        assert len(frontend.processes) == 2
        alone = [httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 5,
                                                            "temperature": 0}).json()["choices"][0]["text"]
                 for p in prompts[:8]]
        answers = asyncio.run(asyncio.wait_for(ask(base), timeout=120))
        assert answers[:8] == alone
        time.sleep(1.5)  # each front-end reports its counters to the others every 0.5 s
        for _ in range(6):  # the kernel picks the front-end for each new connection
            with httpx.Client(base_url=base, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as c:
                assert 'dsv3_requests_total{endpoint="/v1/completions",status="200"} 48' in c.get("/metrics").text
        os.kill(frontend.processes[1].pid, signal.SIGKILL)
        time.sleep(0.5)
        assert asyncio.run(asyncio.wait_for(ask(base), timeout=120)) == answers  # the other serves them all
        wait_until_idle(llm.engine)
