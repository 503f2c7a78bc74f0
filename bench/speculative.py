"""MTP speculative decoding on the GPU (issue 19): the trained embedded model, and moonlight-16b's shape with random
weights (its MTP layer untrained: drafts almost never stand, so speculation must cost nothing).

    PYTHONPATH=src:bench python3 bench/speculative.py --out $OUT

Prompts are 128-token windows of The Tempest (held out from the model's training; random tokens for moonlight),
128 new tokens, greedy, batch 1 / 8 / 64; plain decoding, then k = 1 and 2 drafts in three modes:
- async: every step speculates (the policy's clock off), scheduled asynchronously (issue 19's path; k = 2: the
  drafts chained on the device in the verifying forward, one MTP block forward each);
- sync: every step speculates, each reading its results before the next is launched (the path before; k = 2 now
  drafts in the verifying forward too, eagerly);
- auto: the engine's defaults (speculative_max_batch, the measuring policy): what a user gets.
Reports tokens/s over the decode phase (the median of DSV3_BENCH_REPEATS timed runs, 5 by default), acceptance,
speed-up over plain decoding (whose timed runs alternate with the configuration's), how many steps took the
asynchronous path and whether the tokens equal plain decoding's; prints a table and writes JSON and markdown.
A configuration that fails (a graph that cannot be captured, say) prints its error and the bench goes on.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import gzip
import json
import os
import time
import traceback
from pathlib import Path

import torch

from bench import SHAPES, dsv3_decode, random_prompts
from dsv3.checkpoint import load_model
from dsv3.config import ModelConfig
from dsv3.default_model import default_model_path
from dsv3.engine.llm import LLMEngine
from dsv3.engine.speculative import SpeculationPolicy
from dsv3.model import DeepseekV3ForCausalLM, init_weights
from dsv3.tokenizer import Tokenizer

HELD_OUT = Path(__file__).parents[1] / "tests" / "data" / "shakespeare" / "tempest.txt.gz"
PROMPT, NEW = int(os.environ.get("DSV3_BENCH_PROMPT", 128)), int(os.environ.get("DSV3_BENCH_NEW", 128))
REPEATS = int(os.environ.get("DSV3_BENCH_REPEATS", 5))  # timed runs a configuration, after one warm-up


def tempest_prompts(tokenizer: Tokenizer, n: int, length: int) -> list[list[int]]:
    ids = tokenizer.encode(gzip.open(HELD_OUT, "rt").read(), add_special_tokens=False)
    stride = (len(ids) - length) // n
    return [[tokenizer.bos_token_id] + ids[i * stride:i * stride + length - 1] for i in range(n)]


def engine_for(model, tokenizer, k: int, mode: str, max_batch: int) -> LLMEngine:
    options = dict(max_num_seqs=max_batch, block_size=64, max_model_len=PROMPT + NEW + 8, num_blocks=1024)
    if mode == "auto" or not k:
        return LLMEngine(model, tokenizer, speculative_tokens=k, **options)
    engine = LLMEngine(model, tokenizer, speculative_tokens=k, speculative_max_batch=max_batch, **options)
    engine.spec_policy = SpeculationPolicy(max_batch, clock=None)  # speculate wherever the sequences pay
    if mode == "sync":
        engine._speculates_async = lambda: False
    return engine


def timed(engine: LLMEngine, b: int, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    step, outs = dsv3_decode(engine, b, PROMPT, NEW, 0, prompts)
    return step, outs


def measure(name: str, model, tokenizer, prompts_of, batches: list[int], drafts: list[int], modes: list[str],
            rows: list[dict]) -> None:
    """Plain decoding, then each configuration beside it: the plain engine stays, and their timed runs alternate
    (plain, speculative, plain, ...), so that a drift of the host's speed between configurations (the embedded
    model's steps are host-bound, and one engine's runs were seen 2x slower than the same engine's runs a minute
    later: bench/spec_overhead.py) weighs on both sides of the ratio."""
    plain_engine = engine_for(model, tokenizer, 0, "plain", max(batches))
    plain_outs = {}
    for b in batches:
        timed(plain_engine, b, prompts_of(b))  # warm-up
        times = []
        for _ in range(REPEATS):
            step, plain_outs[b] = timed(plain_engine, b, prompts_of(b))
            times.append(step)
        step = sorted(times)[len(times) // 2]
        rows.append(dict(system="dsv3", model=name, workload="decode", batch=b, prompt=PROMPT, new=NEW,
                         tokens_per_s=b / step, ms_per_token=step * 1e3, steps=NEW, repeats=REPEATS,
                         spread=max(times) / min(times) - 1))
        print(rows[-1], flush=True)
    for k, mode in [(k, mode) for k in drafts if k for mode in modes]:
        system = f"dsv3-mtp{k}-{mode}"
        try:
            t0 = time.perf_counter()
            engine = engine_for(model, tokenizer, k, mode, max(batches))
            print(f"{name} k={k} {mode}: engine ready in {time.perf_counter() - t0:.1f}s, graphs "
                  f"{list(engine.runner.graphs)}, speculative graphs {list(engine.runner.draft_graphs)}", flush=True)
        except Exception as error:  # noqa: BLE001 (the bench goes on with the other configurations)
            traceback.print_exc()
            rows.append(dict(system=system, model=name, error=repr(error)))
            continue
        for b in batches:
            try:
                batch_prompts = prompts_of(b)
                timed(engine, b, batch_prompts)  # warm-up (and the policy's measurements)
                before = dict(engine.stats)
                times, plain_times = [], []
                for _ in range(REPEATS):
                    plain_times.append(timed(plain_engine, b, batch_prompts)[0])
                    step, outs = timed(engine, b, batch_prompts)
                    times.append(step)
                step, plain_step = sorted(times)[len(times) // 2], sorted(plain_times)[len(times) // 2]
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                rows.append(dict(system=system, model=name, batch=b, error=repr(error)))
                continue
            delta = {key: engine.stats[key] - before[key] for key in before}
            base = plain_outs[b]
            rows.append(dict(system=system, model=name, workload="decode", batch=b, prompt=PROMPT, new=NEW,
                             tokens_per_s=b / step, ms_per_token=step * 1e3, steps=delta["steps"] // REPEATS,
                             repeats=REPEATS, spread=max(times) / min(times) - 1, plain_tokens_per_s=b / plain_step,
                             acceptance=delta["spec_accepted"] / max(delta["spec_drafted"], 1),
                             async_steps=delta["spec_async_steps"] // REPEATS,
                             spec_off_steps=delta["spec_off_steps"] // REPEATS, speedup=plain_step / step,
                             tokens_equal_to_plain=outs == base,
                             sequences_equal_to_plain=sum(a == p for a, p in zip(outs, base))))
            print(rows[-1], flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    del plain_engine
    gc.collect()
    torch.cuda.empty_cache()


def profile(model, tokenizer, k: int, mode: str, b: int) -> None:
    """Print where one configuration's decode phase spends host and device time (torch.profiler, the top ops)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine = engine_for(model, tokenizer, k, mode, b)
    prompts = tempest_prompts(tokenizer, b, PROMPT)
    timed(engine, b, prompts)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step, _ = timed(engine, b, prompts)
    print(f"k={k} {mode} batch {b}: {step * 1e3:.3f} ms a token, {engine.stats}", flush=True)
    for key in ("self_cpu_time_total", "self_device_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60), flush=True)


def table(rows: list[dict]) -> str:
    def f(r, key, spec):
        return "" if r.get(key) is None else format(r[key], spec)

    lines = ["| model | system | batch | tokens/s | ms/token | plain tokens/s beside it | acceptance | speedup | "
             "async steps / steps | sequences equal to plain |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['system']} | {r.get('batch', '')} | failed: {r['error'][:80]} "
                         "| | | | | | |")
            continue
        steps = f"{r['async_steps']} / {r['steps']}" if "async_steps" in r else ""
        equal = f"{r['sequences_equal_to_plain']} / {r['batch']}" if r.get("sequences_equal_to_plain") is not None else ""
        lines.append(f"| {r['model']} | {r['system']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                     f"{r['ms_per_token']:.3f} | {f(r, 'plain_tokens_per_s', '.1f')} | {f(r, 'acceptance', '.2f')} | "
                     f"{f(r, 'speedup', '.2f')} | {steps} | "
                     f"{equal} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--drafts", default="1,2")
    ap.add_argument("--modes", default="async,sync,auto")
    ap.add_argument("--models", default="embedded,moonlight-16b")
    ap.add_argument("--moonlight-modes", default="async,auto")
    ap.add_argument("--commit", default=os.environ.get("DSV3_COMMIT", "unknown"))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the bench itself")
    ap.add_argument("--profile", metavar="K:MODE:BATCH", help="only profile one configuration (embedded model)")
    args = ap.parse_args()
    if args.profile:
        k, mode, b = args.profile.split(":")
        path = default_model_path()
        profile(load_model(path, dtype=torch.bfloat16, device=args.device, progress=False), Tokenizer.from_dir(path),
                int(k), mode, int(b))
        return
    batches, drafts = [int(x) for x in args.batches.split(",")], [int(x) for x in args.drafts.split(",") if x]
    rows: list[dict] = []
    models = args.models.split(",")
    if "embedded" in models:
        path = default_model_path()
        model = load_model(path, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32,
                           device=args.device, progress=False)
        tokenizer = Tokenizer.from_dir(path)
        measure("embedded", model, tokenizer, lambda b: tempest_prompts(tokenizer, b, PROMPT), batches, drafts,
                args.modes.split(","), rows)
        del model
        torch.cuda.empty_cache()
    if "moonlight-16b" in models:
        try:
            cfg = ModelConfig.from_dict(SHAPES["moonlight-16b"])
            with torch.device(args.device):
                model = DeepseekV3ForCausalLM(cfg, dtype=torch.bfloat16).eval()
            init_weights(model, cfg.initializer_range)
            measure("moonlight-16b", model, None, lambda b: random_prompts(b, PROMPT, cfg.vocab_size, seed=b), batches,
                    [1], args.moonlight_modes.split(","), rows)
            del model
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            rows.append(dict(system="dsv3", model="moonlight-16b", error=repr(error)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__,
                  commit=args.commit, rows=rows)
    stem = f"{result['date']}-{result['gpu'].replace(' ', '_')}-speculative-{args.commit}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    text = table(rows)
    (out / f"{stem}.md").write_text(f"# MTP speculation, {result['gpu']}, torch {result['torch']}, commit "
                                    f"{args.commit}\n\n{text}\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
