"""The deterministic mode (issue 21) on the GPU: is it batch-invariant, and what does it cost?

    PYTHONPATH=src:bench python3 bench/deterministic.py --out $OUT

1. Invariance, embedded model (bf16): 16 prompts (128-token windows of The Tempest, as bench/speculative.py),
   64 greedy tokens, each prompt alone; then how many of the 16 outputs equal their alone output when run
   together, again after a prefix-cache hit (the same prompts a second time in the engine that ran them),
   with chunked prefill (48 tokens a step) and with MTP speculation (k=1, speculating at every batch);
   default mode and deterministic mode.
2. Kernel check: 64 rows of a GEMM (moonlight-16b's 2048 -> 11264 bf16, v3-slice's FP8 7168 -> 18432) at once
   and one row at a time: how many rows differ, bitwise, through dispatch's default path and the mode's.
3. Throughput: decode tok/s (prompt 128, 64 new, batch 1 / 8 / 64) and prefill tok/s (the same prompts' first
   step) on moonlight-16b (4 layers) and v3-slice (2 layers, FP8) with random weights, default vs deterministic.

Writes a markdown table and JSON to --out. `--device cpu --prompts 4 --new 8 --skip-throughput` runs the first
two parts on the CPU in float32 (a smoke test; the CPU's default path is not batch-invariant either).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch

from bench import SHAPES, random_fp8_weights, random_prompts, sync
from dsv3.checkpoint import load_model
from dsv3.config import ModelConfig
from dsv3.default_model import default_model_path
from dsv3.engine.llm import LLMEngine
from dsv3.engine.sampling import SamplingParams
from dsv3.engine.speculative import SpeculationPolicy
from dsv3.kernels import dispatch, reference
from dsv3.model import DeepseekV3ForCausalLM, init_weights
from dsv3.tokenizer import Tokenizer
from speculative import tempest_prompts

MODES = {"default": False, "deterministic": True}


def generate(engine: LLMEngine, prompts: list[list[int]], new: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    for s in seqs:
        engine.release(s)
    return [s.output_token_ids for s in seqs]


def invariance(device: str, n_prompts: int, new: int) -> list[dict]:
    path = default_model_path()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(path, dtype=dtype, device=device, progress=False)
    prompts = tempest_prompts(Tokenizer.from_dir(path), n_prompts, 128)
    rows = []
    for mode, deterministic in MODES.items():
        def engine(**options) -> LLMEngine:
            return LLMEngine(model, None, **{"max_num_seqs": n_prompts, "max_num_batched_tokens": 2048,
                                             "max_model_len": 128 + new + 8, "block_size": 16,
                                             "num_blocks": 4 * n_prompts * (128 + new) // 16,
                                             "deterministic": deterministic, **options})
        t0 = time.perf_counter()
        first = engine()
        alone = [generate(first, [p], new)[0] for p in prompts]
        hits = first.blocks.prefix_hits
        scenarios = {"prefix-cache hit": generate(first, prompts, new)}
        assert first.blocks.prefix_hits > hits, "the second run of the prompts hit no cached block"
        del first
        scenarios["together"] = generate(engine(), prompts, new)
        scenarios["chunked prefill (48 a step)"] = generate(engine(max_num_batched_tokens=48), prompts, new)
        spec = engine(speculative_tokens=1, speculative_max_batch=n_prompts)
        spec.spec_policy = SpeculationPolicy(n_prompts, clock=None)  # speculate at every batch
        scenarios["MTP k=1"] = generate(spec, prompts, new)
        accepted = spec.stats["spec_accepted"] / max(spec.stats["spec_drafted"], 1)
        del spec
        for name, outs in scenarios.items():
            same = sum(a == b for a, b in zip(outs, alone))
            rows.append(dict(part="invariance", mode=mode, scenario=name, identical=same, of=n_prompts, **({"acceptance": accepted} if name.startswith("MTP") else {})))
            print(rows[-1], flush=True)
        print(f"{mode}: {time.perf_counter() - t0:.1f}s", flush=True)
    return rows


def kernel_check(device: str) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    cases = [("moonlight-16b up_proj bf16", 2048, 11264, False), ("v3-slice up_proj FP8", 7168, 18432, True)]
    for name, k, n, fp8 in cases:
        x = torch.randn(64, k, generator=gen).to(device, dtype)
        w = (torch.randn(n, k, generator=gen) * 0.02).to(device)
        scale = None
        if fp8 and device == "cuda":
            w, scale = reference.fp8_quantize(w)
        else:
            w = w.to(dtype)

        def product(rows_: torch.Tensor) -> torch.Tensor:
            return dispatch.fp8_linear(rows_, w, scale) if scale is not None else dispatch.linear(rows_, w)

        for mode, deterministic in MODES.items():
            with torch.no_grad(), dispatch.using(deterministic=deterministic):
                together = product(x)
                alone = torch.cat([product(x[i:i + 1]) for i in range(64)])
            rows.append(dict(part="kernel", mode=mode, scenario=f"{name}: 64 rows vs one by one",
                             identical=int((together == alone).all(-1).sum()), of=64))
            print(rows[-1], flush=True)
    return rows


def small_model(name: str, layers: int) -> DeepseekV3ForCausalLM:
    raw = {**SHAPES[name], "num_hidden_layers": layers, "num_nextn_predict_layers": 0}
    cfg = ModelConfig.from_dict(raw)
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM(cfg, dtype=torch.bfloat16).eval()
    init_weights(model, cfg.initializer_range)
    if cfg.quant is not None:
        random_fp8_weights(model, cfg.initializer_range)
    return model


def throughput(batches: list[int], new: int) -> list[dict]:
    rows = []
    for name, layers in (("moonlight-16b", 4), ("v3-slice", 2)):
        model = small_model(name, layers)
        vocab = model.config.vocab_size
        for mode, deterministic in MODES.items():
            t0 = time.perf_counter()
            engine = LLMEngine(model, None, max_num_seqs=max(batches), max_num_batched_tokens=8192, block_size=64,
                               max_model_len=128 + new + 8, num_blocks=512, deterministic=deterministic)
            setup = time.perf_counter() - t0
            for b in batches:
                prompts = random_prompts(b, 128, vocab, seed=b)
                generate(engine, prompts, 4)                                   # warm-up
                params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
                seqs = [engine.add_request(p, params) for p in prompts]
                sync()
                start = time.perf_counter()
                while any(len(s.output_token_ids) == 0 for s in seqs):        # prefill, and the first token
                    engine.step()
                sync()
                prefill = time.perf_counter() - start
                start = time.perf_counter()
                while engine.has_unfinished():
                    engine.step()
                sync()
                decode = (time.perf_counter() - start) / (new - 1)
                for s in seqs:
                    engine.release(s)
                rows.append(dict(part="throughput", model=f"{name} ({layers} layers)", mode=mode, batch=b,
                                 decode_tokens_per_s=b / decode, prefill_tokens_per_s=b * 128 / prefill,
                                 engine_setup_s=setup))
                print(rows[-1], flush=True)
            del engine
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    for r in rows:  # the mode's share of the default's throughput
        base = next(d for d in rows if d["model"] == r["model"] and d["batch"] == r["batch"] and d["mode"] == "default")
        r["decode_vs_default"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        r["prefill_vs_default"] = r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
    return rows


def gemm_times(batches: list[int]) -> list[dict]:
    """Each distinct linear of v3-slice (FP8, one layer and the LM head) and moonlight-16b (bf16): microseconds
    of the default path, the mode's GEMM in one part of K, and the mode's GEMM as it runs (fixed_splits' parts),
    at each batch; CUDA-graphed (triton.testing.do_bench_cudagraph)."""
    import triton

    from dsv3.kernels import fp8_gemm
    from dsv3.model.layers import Linear

    rows = []
    for name in ("v3-slice", "moonlight-16b"):
        model = small_model(name, 1)
        seen = set()
        for module_name, module in model.named_modules():
            if not isinstance(module, Linear) or module.weight.dim() != 2 or module.weight.shape in seen:
                continue
            seen.add(module.weight.shape)
            w, scale = module.weight, module.weight_scale_inv
            n, k = w.shape
            for b in batches:
                x = torch.randn(b, k, device="cuda", dtype=torch.bfloat16)

                def default():
                    return dispatch.fp8_linear(x, w, scale) if scale is not None else dispatch.linear(x, w)

                def one_part():
                    return fp8_gemm.block_scaled_matmul(x, w[None], None if scale is None else scale[None], b,
                                                        config=fp8_gemm.FIXED_CONFIG)

                def fixed():
                    return fp8_gemm.fixed_linear(x, w, scale)

                us = {f: triton.testing.do_bench_cudagraph(fn) * 1e3 for f, fn in
                      (("default", default), ("one part", one_part), ("fixed", fixed))}
                rows.append(dict(part="gemm", model=name, weight=module_name.split(".")[-1], n=n, k=k, batch=b,
                                 splits=fp8_gemm.fixed_splits(n, k), **{f"{f}_us": v for f, v in us.items()}))
                print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def profile_decode(name: str, layers: int, batch: int, new: int) -> None:
    """Print the kernels of the decode phase in each mode, the most time first (where the mode's cost is)."""
    from torch.profiler import ProfilerActivity, profile

    model = small_model(name, layers)
    for mode, deterministic in MODES.items():
        engine = LLMEngine(model, None, max_num_seqs=batch, block_size=64, max_model_len=128 + new + 8,
                           num_blocks=512, deterministic=deterministic)
        prompts = random_prompts(batch, 128, model.config.vocab_size, seed=batch)
        generate(engine, prompts, 4)
        seqs = [engine.add_request(p, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
                for p in prompts]
        while any(len(s.output_token_ids) == 0 for s in seqs):
            engine.step()
        sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            while engine.has_unfinished():
                engine.step()
            sync()
        steps = new - 1
        kernels = sorted((e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA),
                         key=lambda e: -e.self_device_time_total)
        total = sum(e.self_device_time_total for e in kernels) / steps
        print(f"{name} ({layers} layers) batch {batch} {mode}: {total:.1f} us of kernels a step", flush=True)
        for e in kernels[:12]:
            print(f"    {e.self_device_time_total / steps:8.1f} us  {e.count // steps:4d}x  {e.key[:90]}", flush=True)
        del engine
        torch.cuda.empty_cache()


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, ""]
    checks = [r for r in rows if r["part"] in ("invariance", "kernel")]
    if checks:
        lines += ["| check | default | deterministic |", "|---|---|---|"]
        for scenario in dict.fromkeys(r["scenario"] for r in checks):
            cells = {r["mode"]: f"{r['identical']}/{r['of']}" + (f" (acceptance {r['acceptance']:.2f})"
                                                                  if "acceptance" in r else "")
                     for r in checks if r["scenario"] == scenario}
            lines.append(f"| {scenario} | {cells.get('default', '')} | {cells.get('deterministic', '')} |")
        lines.append("")
    gemms = [r for r in rows if r["part"] == "gemm"]
    if gemms:
        lines += ["| model | weight (N x K) | batch | default us | mode, K in one part | mode (parts) | mode/default |",
                  "|---|---|---|---|---|---|---|"]
        for r in gemms:
            lines.append(f"| {r['model']} | {r['weight']} ({r['n']} x {r['k']}) | {r['batch']} | {r['default_us']:.1f} "
                         f"| {r['one part_us']:.1f} | {r['fixed_us']:.1f} ({r['splits']}) | "
                         f"{r['default_us'] / r['fixed_us']:.2f} |")
        lines.append("")
    speed = [r for r in rows if r["part"] == "throughput" and r["mode"] == "deterministic"]
    if speed:
        lines += ["| model | batch | decode tok/s default | deterministic | det/default | prefill tok/s default | "
                  "deterministic | det/default |", "|---|---|---|---|---|---|---|---|"]
        for r in speed:
            base = next(d for d in rows if d["part"] == "throughput" and d["mode"] == "default"
                        and d["model"] == r["model"] and d["batch"] == r["batch"])
            lines.append(f"| {r['model']} | {r['batch']} | {base['decode_tokens_per_s']:,.0f} | "
                         f"{r['decode_tokens_per_s']:,.0f} | {r['decode_vs_default']:.2f} | "
                         f"{base['prefill_tokens_per_s']:,.0f} | {r['prefill_tokens_per_s']:,.0f} | "
                         f"{r['prefill_vs_default']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--profile", metavar="MODEL:LAYERS:BATCH",
                    help="only print each mode's decode kernels, e.g. v3-slice:2:1")
    ap.add_argument("--commit", default=os.environ.get("DSV3_COMMIT", "unknown"))
    args = ap.parse_args()
    if args.profile:
        name, layers, batch = args.profile.split(":")
        profile_decode(name, int(layers), int(batch), args.new)
        return
    t0 = time.perf_counter()
    rows = invariance(args.device, args.prompts, args.new) + kernel_check(args.device)
    if not args.skip_throughput and args.device == "cuda":
        rows += gemm_times([int(b) for b in args.batches.split(",")])
        rows += throughput([int(b) for b in args.batches.split(",")], args.new)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    header = (f"# Deterministic mode, {gpu}, {date}, commit {args.commit} ({time.perf_counter() - t0:.0f}s)\n\n"
              f"Identical outputs against each prompt run alone ({args.prompts} prompts, {args.new} greedy tokens), "
              "rows of a GEMM identical batched vs one by one, and throughput.")
    table = markdown(rows, header)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{date}-{gpu.replace(' ', '_')}-deterministic"
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps(dict(date=date, gpu=gpu, torch=torch.__version__,
                                                      commit=args.commit, rows=rows), indent=1))


if __name__ == "__main__":
    main()
