"""What an MTP proposer costs a batch that does not speculate (issue 19: the embedded model at batch 64 ran 0.80x
with the defaults, every step a plain one). In one process on the GPU, the same prompts through engines that
differ only in their speculation options:

    PYTHONPATH=src:bench python3 bench/spec_overhead.py [--batch 64]

Per engine: decode tok/s (the median of 5 runs, as bench/speculative.py), the wall time of each step() in the
decode phase (median and largest), and from one profiled run the graph launches, eager kernel launches and the
device time of the kernels, with the kernels that take the most of it.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench import dsv3_decode
from dsv3.checkpoint import load_model
from dsv3.default_model import default_model_path
from dsv3.engine.llm import LLMEngine
from dsv3.engine.sampling import SamplingParams
from dsv3.tokenizer import Tokenizer
from speculative import NEW, PROMPT, tempest_prompts

VARIANTS = [  # (name, drafts, LLMEngine options beyond bench/speculative.py's), alternated: is it the order?
    ("plain", 0, {}),
    ("k1 defaults", 1, {}),
    ("plain", 0, {}),
    ("k1 defaults", 1, {}),
    ("k1, no draft graphs", 1, {"speculative_max_batch": 0}),
    ("k1 defaults", 1, {}),
]
TIMED = {"scheduler": ("schedule",), "runner": ("pack", "run"), "engine": ("_sampled", "_resolve", "_to_host")}


def timed(engine) -> dict[str, float]:
    """Wrap the step's parts (host wall time, summed per name into the returned dict)."""
    spent: dict[str, float] = {}
    for owner, names in TIMED.items():
        obj = engine if owner == "engine" else getattr(engine, owner)
        for name in names:
            inner = getattr(obj, name)

            def wrapper(*a, _inner=inner, _name=name, **kw):
                t0 = time.perf_counter()
                try:
                    return _inner(*a, **kw)
                finally:
                    spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - t0
            setattr(obj, name, wrapper)
    return spent


def step_times(engine, prompts: list[list[int]], spent: dict | None = None) -> list[float]:
    """The wall time of each step() after every sequence has its first token (spent: cleared there)."""
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]
    while any(len(s.output_token_ids) == 0 for s in seqs):
        engine.step()
    torch.cuda.synchronize()
    if spent is not None:
        spent.clear()
    times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    for s in seqs:
        engine.release(s)
    return times


def profiled(engine, prompts: list[list[int]]) -> dict:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_times(engine, prompts)
    events = prof.key_averages()
    launches = {e.key: e.count for e in events if e.key in ("cudaGraphLaunch", "cudaLaunchKernel", "cuLaunchKernel",
                                                            "cudaMemcpyAsync", "cudaStreamSynchronize",
                                                            "cudaEventSynchronize")}
    host_us = {e.key: round(e.cpu_time_total / max(e.count, 1), 1) for e in events if e.key in launches}
    device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in device)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for a, b in spans:  # the union of the kernels' intervals: the device's busy time
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    top = sorted(device, key=lambda e: -e.self_device_time_total)[:8]
    return dict(launches=launches, host_us_per_call=host_us, device_ms=total / 1e3, busy_ms=busy / 1e3,
                span_ms=(spans[-1][1] - spans[0][0]) / 1e3 if spans else 0.0,
                top=[(e.key[:70], e.count, round(e.self_device_time_total / 1e3, 2)) for e in top])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    path = default_model_path()
    model = load_model(path, dtype=torch.bfloat16, device="cuda", progress=False)
    tokenizer = Tokenizer.from_dir(path)
    prompts = tempest_prompts(tokenizer, args.batch, PROMPT)
    for name, k, extra in VARIANTS:
        engine = LLMEngine(model, tokenizer, speculative_tokens=k, max_num_seqs=args.batch, block_size=64,
                           max_model_len=PROMPT + NEW + 8, num_blocks=1024, **extra)  # as bench/speculative.py's auto
        dsv3_decode(engine, args.batch, PROMPT, NEW, 0, prompts)  # warm-up
        runs = sorted(dsv3_decode(engine, args.batch, PROMPT, NEW, 0, prompts)[0] for _ in range(args.repeats))
        spent = timed(engine)
        steps = sorted(step_times(engine, prompts, spent))
        spent = dict(spent)
        prof = profiled(engine, prompts)
        print(f"{name}: {args.batch / runs[len(runs) // 2]:.0f} tok/s; {len(steps)} steps, step() median "
              f"{steps[len(steps) // 2] * 1e3:.3f} ms, max {steps[-1] * 1e3:.2f} ms, sum {sum(steps) * 1e3:.1f} ms; "
              f"graphs {list(engine.runner.graphs)[:3]}..{list(engine.runner.graphs)[-1:]}, draft graphs "
              f"{list(engine.runner.draft_graphs)}; stats {engine.stats}", flush=True)
        print(f"  host parts over those steps (ms): { {key: round(v * 1e3, 1) for key, v in spent.items()} }; "
              f"python objects {len(gc.get_objects())}, cuda allocated {torch.cuda.memory_allocated() / 2**20:.0f} MiB",
              flush=True)
        print(f"  profiled: kernels {prof['device_ms']:.1f} ms, device busy {prof['busy_ms']:.1f} of "
              f"{prof['span_ms']:.1f} ms; "
              f"launches {prof['launches']}, host us a call {prof['host_us_per_call']}", flush=True)
        for row in prof["top"]:
            print("   ", row, flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
