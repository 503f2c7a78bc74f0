"""bench/serve.py's workload without the server: closed-loop clients inside one process, on the engine that
`dsv3 serve` makes (moonlight-16b, random weights). Each client sends its requests one after another (random
128-token prompts, 128 new tokens, greedy, ignore_eos); a finished request's next one is added before the next step.
Every step's GPU time is recorded (CUDA events around the forward), by kind: decode-only, prefilling in a graph,
prefilling eagerly. Beside it, the engine's decode-only figure at the same batch (bench.py's measure), in the same
process, so the ratio says how far the schedule itself is from the engine; serve's own ratio then says what the
server adds.

    PYTHONPATH=src:bench python bench/closed_loop.py [--clients 64,256] [--requests 8] \\
        [--variants "d2-t8192-g2048 d2-t8192-g8192"] [--profile-prefill 256] [--out DIR]

A variant names EngineConfig fields: dF prefill_delay_factor, tN max_num_batched_tokens, gN cuda_graph_max_tokens,
mN mixed_step_tokens (m0: prompts in whole steps); and kernel options (dispatch.KernelOptions, for the engine's
capture and its steps): oN overlaps the shared experts and kv_a_proj on a side stream up to N tokens
(overlap_tokens), fN takes bf16 experts' fused MoE up to N pairs an expert (fused_pairs), x0 attends every row of a
rows-mode step absorbed (expand_prompts=False).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import torch

from bench import SHAPES, dsv3_decode, random_prompts, sync
from dsv3.config import ModelConfig
from dsv3.engine.llm import LLMEngine
from dsv3.engine.sampling import SamplingParams
from dsv3.kernels import dispatch
from dsv3.model import DeepseekV3ForCausalLM, init_weights

FIELDS = {"d": ("prefill_delay_factor", float), "t": ("max_num_batched_tokens", int),
          "g": ("cuda_graph_max_tokens", int), "m": ("mixed_step_tokens", int)}
MIXED_TOP = 30  # kernels the mixed-step profile lists, by their largest time in any step
KERNEL_FIELDS = {"o": ("overlap_tokens", int), "f": ("fused_pairs", int), "x": ("expand_prompts", lambda v: v != "0")}


def parse_variant(name: str) -> tuple[dict, dict]:
    """A variant's EngineConfig fields and its kernel options."""
    options, kernels = {}, {}
    for part in name.split("-"):
        if not part or part[0] not in FIELDS | KERNEL_FIELDS:
            raise SystemExit(f"variant {name!r}: {part!r} is not one of "
                             f"{', '.join(k + 'N' for k in FIELDS | KERNEL_FIELDS)}")
        field, kind = (FIELDS | KERNEL_FIELDS)[part[0]]
        (options if part[0] in FIELDS else kernels)[field] = kind(part[1:])
    return options, kernels


class _HostClock:
    """A CUDA event's two methods on the host's clock (the CPU smoke run)."""

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _HostClock) -> float:
        return (end.t - self.t) * 1e3


class StepLog:
    """Wraps the runner's forward: per step, its kind, rows and CUDA events around it (read at the end)."""

    def __init__(self, engine: LLMEngine):
        self.runner, self.steps = engine.runner, []
        self.run = self.runner.run
        self.runner.run = self
        cuda = engine.device.type == "cuda"
        self.event = (lambda: torch.cuda.Event(enable_timing=True)) if cuda else _HostClock

    def __call__(self, step):
        start, end = self.event(), self.event()
        start.record()
        out = self.run(step)
        end.record()
        rows = int(step.batch.query_starts[-1])
        # a decode-only step keeps every row's logits; a prefilling one (in rows mode too) fewer
        kind = "decode" if len(step.rows) == rows else ("prefill-graph" if step.graph_size else "prefill-eager")
        self.steps.append((kind, rows, step.graph_size, start, end))
        return out

    def close(self) -> None:
        self.runner.run = self.run

    def summary(self) -> dict:
        sync()
        out = defaultdict(lambda: {"steps": 0, "rows": 0, "padded_rows": 0, "gpu_s": 0.0})
        for kind, rows, graph_size, start, end in self.steps:
            entry = out[kind]
            entry["steps"] += 1
            entry["rows"] += rows
            entry["padded_rows"] += max(graph_size - rows, 0)
            entry["gpu_s"] += start.elapsed_time(end) / 1e3
        return dict(out)


def closed_loop(engine: LLMEngine, clients: int, requests: int, vocab: int, seed: int) -> dict:
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    prompts = random_prompts(clients * requests, 128, vocab, seed=seed)
    left = {c: prompts[c * requests:(c + 1) * requests] for c in range(clients)}
    owner = {}
    for c in range(clients):
        owner[engine.add_request(left[c].pop(), params).seq_id] = c
    log = StepLog(engine)
    sync()
    start, tokens, steps = time.perf_counter(), 0, 0
    while engine.has_unfinished():
        for seq in engine.step():
            if not seq.finished:
                continue
            tokens += len(seq.output_token_ids)
            engine.release(seq)
            c = owner.pop(seq.seq_id)
            if left[c]:
                owner[engine.add_request(left[c].pop(), params).seq_id] = c
        steps += 1
    sync()
    seconds = time.perf_counter() - start
    log.close()
    kinds = log.summary()
    gpu = sum(k["gpu_s"] for k in kinds.values())
    return {"clients": clients, "requests": requests, "seconds": seconds, "output_tokens_per_s": tokens / seconds,
            "engine_steps": steps, "kinds": kinds, "gpu_busy_fraction": gpu / seconds}


def prefill_kernels(engine: LLMEngine, clients: int, vocab: int, top: int = 16) -> str:
    """The GPU kernels of one wave's prefilling steps (`clients` prompts added at once, stepped until each has its
    first token; CUPTI sees inside the graphs), summed by name: where a prompt row's time goes."""
    from overhead import gpu_events

    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in random_prompts(clients, 128, vocab, seed=99)]

    def wave():
        while any(not s.output_token_ids for s in seqs):
            engine.step()

    events = gpu_events(wave, 1, ("kernel",))
    while engine.has_unfinished():
        engine.step()
    for s in seqs:
        engine.release(s)
    total, by_name = sum(e["dur"] for e in events), defaultdict(lambda: [0, 0.0])
    for e in events:
        by_name[e["name"][:60]][0] += 1
        by_name[e["name"][:60]][1] += e["dur"]
    lines = [f"prefill kernels, {clients} prompts of 128 tokens: {len(events)} kernels, {total / 1e3:.1f} ms "
             f"({total / (clients * 128):.2f} us a prompt token)"]
    for name, (count, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"  {us / 1e3:8.2f} ms {us / total:6.1%} {count:6d}x  {name}")
    return "\n".join(lines)


def mixed_kernels(engine: LLMEngine, vocab: int, prompt_rows: list[int], decoding: int = 256, context: int = 200,
                  replays: int = 3) -> str:
    """What prompt rows add to a decode step: rows-mode steps of `decoding` decode rows (contexts of `context`
    tokens) beside P rows of whole 128-token prompts, each replayed from its graph under CUPTI, the kernels summed
    by name; per kernel its time in the decode-only step and what each prompt row adds. The cache holds random
    latents (attention then weighs its keys as on real ones); token ids are random."""
    from types import SimpleNamespace

    from overhead import gpu_events

    from dsv3.engine.sequence import ScheduledItem

    runner, bs = engine.runner, engine.blocks.block_size
    for cache in engine.latent_caches:
        cache.normal_()
    gen = torch.Generator().manual_seed(5)
    tables, next_block = [], 0

    def table(tokens: int) -> list[int]:
        nonlocal next_block
        n = -(-tokens // bs)
        next_block += n
        return list(range(next_block - n, next_block))

    decode_items = [ScheduledItem(SimpleNamespace(block_table=table(context)), context - 1,
                                  [int(torch.randint(vocab, (1,), generator=gen))], 1) for _ in range(decoding)]
    per_step, wall, sizes = [], [], [0, *prompt_rows]
    for p in sizes:
        prompts = [ScheduledItem(SimpleNamespace(block_table=table(128)), 0,   # no logits: a graph keeps 256 rows'
                                 torch.randint(vocab, (128,), generator=gen).tolist(), 0) for _ in range(p // 128)]
        step = runner.pack(decode_items + prompts, rows_mode=True)
        runner.run(step)
        sync()
        walls = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner.run(step)
            end.record()
            end.synchronize()
            walls.append(start.elapsed_time(end) * 1e3)
        wall.append(sorted(walls)[2])
        events = gpu_events(lambda step=step: runner.run(step), replays, ("kernel",))
        by_name = defaultdict(float)
        for e in events:
            by_name[e["name"][:40]] += e["dur"] / replays
        tables.append((p, step.graph_size, by_name))
        per_step.append(sum(by_name.values()))
    base = tables[0][2]
    names = sorted(set().union(*(t[2] for t in tables)), key=lambda n: -max(t[2].get(n, 0) for t in tables))[:MIXED_TOP]
    head = f"{'kernel (us a step; then us each prompt row adds)':44s}" + "".join(
        f"{f'+{p} ({g})':>16s}" for p, g, _ in tables)
    lines = [f"rows-mode steps of {decoding} decode rows at {context} tokens beside P prompt rows (graph size):", head,
             f"{'step (the replay, median of 5)':44s}" + "".join(f"{t:16.0f}" if not p else f"{t:9.0f} {(t - wall[0]) / p:5.2f}"
                                                                 for (p, _, _), t in zip(tables, wall)),
             f"{'all kernels':44s}" + "".join(f"{t:16.0f}" if not p else f"{t:9.0f} {(t - per_step[0]) / p:5.2f}"
                                              for (p, _, _), t in zip(tables, per_step))]
    for name in names:
        lines.append(f"  {name:42s}" + "".join(f"{by.get(name, 0):16.0f}" if not p else
                                               f"{by.get(name, 0):9.0f} {(by.get(name, 0) - base.get(name, 0)) / p:5.2f}"
                                               for p, _, by in tables))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="64,256")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--variants", default="d2-t8192-g2048 d2-t8192-g8192")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--layers", type=int, help="fewer layers (a CPU smoke run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile-prefill", type=int, default=0, help="also profile one wave of this many prompts")
    ap.add_argument("--profile-mixed", default="", help="also profile steps of 256 decode rows beside this many prompt "
                    "rows, e.g. 128,512,1792,7936 (graph sizes: the padding counts too)")
    args = ap.parse_args()
    raw = {**SHAPES["moonlight-16b"], "num_nextn_predict_layers": 0}
    cfg = ModelConfig.from_dict({**raw, **({"num_hidden_layers": args.layers} if args.layers else {})})
    torch.manual_seed(0)
    with torch.device(args.device):
        model = DeepseekV3ForCausalLM(cfg, dtype=torch.bfloat16 if args.device.startswith("cuda") else torch.float32).eval()
    init_weights(model, cfg.initializer_range)
    levels = [int(c) for c in args.clients.split(",") if c]
    rows, engine_tok_s = [], {}
    for variant in args.variants.split():
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        built = time.perf_counter()
        options, kernels = parse_variant(variant)
        with dispatch.using(**kernels):  # the graphs keep the kernels they were captured with
            engine = LLMEngine(model, None, max_num_seqs=256, **options)
            print(f"{variant}: engine in {time.perf_counter() - built:.1f} s, graphs up to "
                  f"{max(engine.runner.graphs, default=0)} rows", flush=True)
            for clients in levels:
                closed_loop(engine, clients, 1, cfg.vocab_size, seed=7)  # new shapes compile here, not in the timed run
                if clients not in engine_tok_s:  # the engine's decode-only figure (bench.py's), in this process
                    per_token, outs = dsv3_decode(engine, clients, 128, 128, cfg.vocab_size)
                    engine_tok_s[clients] = clients / per_token
                    # Greedy tokens of random weights may repeat across the batch (and route alike), unlike the
                    # closed loop's random prompts: how many distinct tokens a step of the engine's figure decodes.
                    distinct = sum(len(set(step)) for step in zip(*outs)) / len(outs[0])
                    print(f"engine's decode at {clients}: {clients / per_token:,.0f} tok/s, {distinct:.1f} distinct "
                          f"tokens a step of {clients} on average", flush=True)
                row = {"variant": variant, **closed_loop(engine, clients, args.requests, cfg.vocab_size, seed=clients)}
                row["engine_tok_s"] = engine_tok_s[clients]
                row["ratio"] = row["output_tokens_per_s"] / engine_tok_s[clients]
                rows.append(row)
                kinds = " ".join(f"{k} {v['steps']} steps {v['gpu_s']:.2f} s ({v['rows'] / max(v['steps'], 1):.0f} rows, "
                                 f"{v['padded_rows'] / max(v['steps'], 1):.0f} pad)" for k, v in row["kinds"].items())
                print(f"{variant} {clients} clients: {row['output_tokens_per_s']:,.0f} tok/s = {row['ratio']:.0%} of the "
                      f"engine's {engine_tok_s[clients]:,.0f}; {row['seconds']:.2f} s, GPU busy "
                      f"{row['gpu_busy_fraction']:.0%}; {kinds}", flush=True)
            if args.profile_prefill:
                print(prefill_kernels(engine, args.profile_prefill, cfg.vocab_size), flush=True)
            if args.profile_mixed:
                print(mixed_kernels(engine, cfg.vocab_size, [int(p) for p in args.profile_mixed.split(",")]), flush=True)
        del engine
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    path = Path(args.out) / f"{date.today()}-{gpu.replace(' ', '_')}-closed-loop-moonlight-16b.json"
    path.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
