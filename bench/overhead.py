"""Where a whole engine step's time goes on the full moonlight-16b shape: the GPU's share and the host's.

    PYTHONPATH=src:bench python bench/overhead.py [--batches 1,64] [--prefill 8x2048]

For each decode batch: the steady engine step, the graph replay alone (the GPU's floor for that step),
and the host's part (cProfile of the engine's Python, top functions). For prefill: the engine step, the
packing, the forward alone, and the sum of the GPU kernels of one forward (torch.profiler): any gap
between the forward's wall time and its kernels is the GPU waiting on the host.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from bench import SHAPES, random_fp8_weights, random_prompts
from dsv3.config import ModelConfig
from dsv3.engine.llm import LLMEngine
from dsv3.engine.sampling import SamplingParams
from dsv3.engine.sequence import ScheduledItem
from dsv3.kernels import dispatch, pdl
from dsv3.model import DeepseekV3ForCausalLM, init_weights


def sync() -> None:
    torch.cuda.synchronize()


def host_profile(fn, n: int, top: int = 12) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    sync()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    return "\n".join(line for line in s.getvalue().splitlines() if line.strip())[:4000]


def gpu_events(run, times: int, categories: tuple[str, ...]) -> list[dict]:
    """The GPU's events of the given trace categories while run() runs `times` times (CUPTI sees inside graphs),
    as the profiler's trace dicts in start order."""
    import json
    import os
    import tempfile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(times):
            run()
        sync()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    return sorted((e for e in json.load(open(path))["traceEvents"] if e.get("cat") in categories),
                  key=lambda e: e["ts"])


def timeline(graph, norms_a_layer: int = 2, steps: int = 3) -> str:
    """Where a replayed step's time goes, kernel by kernel (CUPTI traces the kernels inside a graph): each
    kernel's start and end, and its *link cost*: its end minus the end of the kernel before it on the same
    stream. With programmatic dependent launch a kernel starts before the one ahead ends, so its duration
    overstates it; the link cost is what it adds to its stream. Averaged over the MoE layers by position
    in the layer (a MoE layer is the kernels from one input norm to the next: norms_a_layer rms norms a layer,
    3 with a q_lora_rank)."""
    events = gpu_events(graph.replay, steps, ("kernel",))
    if not events:
        return "timeline: the profiler saw no kernels inside the graph"
    per_step = len(events) // steps
    events = events[-per_step:]                                                  # the last replay
    t0 = events[0]["ts"]
    last_end: dict = {}
    rows = []
    for e in events:
        stream = e["args"].get("stream", 0)
        end = e["ts"] + e["dur"]
        link = end - last_end.get(stream, e["ts"])
        last_end[stream] = end
        rows.append((e["name"][:40], stream, e["ts"] - t0, e["dur"], end - t0, link))
    main = rows[0][1]
    wall = max(r[4] for r in rows)
    norms = [i for i, r in enumerate(rows) if r[0] == "_rms_norm"]
    starts = norms[norms_a_layer:-1:norms_a_layer]                               # input norms of layers 1..
    layers = [rows[a:b] for a, b in zip(starts, starts[1:])]
    out = [f"timeline of one replay: {len(rows)} kernels, {wall:.0f} us from the first start to the last end; "
           f"streams {sorted(set(r[1] for r in rows))} (main {main})"]
    if layers:
        mid = layers[len(layers) // 2]
        base = mid[0][2]
        out.append(f"one MoE layer ({len(mid)} kernels, {mid[-1][4] - base:.1f} us from its first start):")
        out.append(f"{'kernel':40s} {'stream':>6s} {'start':>7s} {'dur':>6s} {'end':>7s} {'link':>6s}")
        for name, stream, start, dur, end, link in mid:
            out.append(f"{name:40s} {stream:6d} {start - base:7.1f} {dur:6.1f} {end - base:7.1f} {link:6.1f}")
        same = [layer for layer in layers if [r[0] for r in layer] == [r[0] for r in mid]]
        spans = [layer[-1][4] - layer[0][2] for layer in same]
        out.append(f"mean over {len(same)} MoE layers of that shape: layer {sum(spans) / len(spans):.1f} us "
                   f"(from input norm to input norm: "
                   f"{sum(b[0][2] - a[0][2] for a, b in zip(same, same[1:])) / max(1, len(same) - 1):.1f} us); link cost by position:")
        for i, (name, stream, *_rest) in enumerate(mid):
            links = [layer[i][5] for layer in same]
            durs = [layer[i][3] for layer in same]
            out.append(f"  {i:2d} {name:40s} stream {stream:3d} link {sum(links) / len(links):6.2f} us, "
                       f"duration {sum(durs) / len(durs):6.2f} us")
    tail = [r for r in rows[starts[-1] if starts else 0:]]
    out.append("the last layer and the head:")
    for name, stream, start, dur, end, link in tail:
        out.append(f"{name:40s} {stream:6d} {start:7.1f} {dur:6.1f} {end:7.1f} {link:6.1f}")
    return "\n".join(out)


def step_gaps(engine, steps: int = 6) -> str:
    """What the GPU runs between two decode steps' layers (the step's edges and the host's share of it, seen
    from the GPU): every kernel and copy from the end of one step's LM head (its longest kernel) to the next
    step's first norm, with offsets from that end."""
    events = gpu_events(engine.step, steps, ("kernel", "gpu_memcpy", "gpu_memset"))
    if not events:
        return "step gaps: the profiler saw no GPU work"
    longest = max(e["dur"] for e in events)
    heads = [i for i, e in enumerate(events) if e["dur"] > 0.5 * longest]
    if len(heads) < 3:
        return "step gaps: fewer than three LM heads seen"
    a, b = heads[-3], heads[-2]
    t0 = events[a]["ts"] + events[a]["dur"]
    norm = next(i for i in range(a + 1, b) if events[i]["name"] == "_rms_norm")
    lines = [f"step gaps: one step {events[b]['ts'] + events[b]['dur'] - t0:.1f} us from LM head end to LM head end; "
             f"the next step's first norm starts at +{events[norm]['ts'] - t0:.1f} us"]
    for e in events[a + 1:norm + 1]:
        lines.append(f"  +{e['ts'] - t0:8.1f} us  {e['dur']:6.1f} us  {e.get('cat'):10s} {e['name'][:70]}")
    return "\n".join(lines)


def replay_ms(graph: torch.cuda.CUDAGraph, reps: int = 50) -> float:
    """Milliseconds a replay of a captured step, the mean of reps back to back."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    sync()
    return start.elapsed_time(end) / reps


def decoding_engine(model, cfg, batch: int) -> tuple[LLMEngine, list]:
    """An engine decoding `batch` random 128-token prompts, a few steps past their first tokens."""
    engine = LLMEngine(model, None, max_num_seqs=batch, max_num_batched_tokens=16384, block_size=64,
                       max_model_len=1024, num_blocks=batch * 16 + 8)
    params = SamplingParams(max_tokens=600, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in random_prompts(batch, 128, cfg.vocab_size, seed=batch)]
    while any(len(s.output_token_ids) == 0 for s in seqs):
        engine.step()
    for _ in range(5):
        engine.step()
    sync()
    return engine, seqs


def same_without_graphs(model, cfg, batch: int, new: int = 32) -> None:
    """Greedy tokens of whole requests from an engine that replays graphs (pending tokens and the argmax
    taken inside them, scheduling asynchronous) against one that runs every step eagerly."""
    outputs = []
    for graphs in (True, False):
        engine = LLMEngine(model, None, max_num_seqs=batch, max_num_batched_tokens=16384, block_size=64,
                           max_model_len=1024, num_blocks=batch * 4 + 8, cuda_graphs=graphs)
        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        seqs = [engine.add_request(p, params) for p in random_prompts(batch, 128, cfg.vocab_size, seed=7)]
        while engine.has_unfinished():
            engine.step()
        outputs.append([s.output_token_ids for s in seqs])
        del engine
    same = sum(a == b for a, b in zip(*outputs))
    print(f"decode batch {batch}: {new} greedy tokens with graphs against without: {same}/{batch} sequences "
          f"identical", flush=True)


def gemv_sweep(model, cfg, settings: str) -> None:
    """Batch-1 graph replay for each GEMV tile setting, 'elements x warps' (kernels/gemv.py)."""
    from dsv3.kernels import gemv
    for setting in settings.split(","):
        gemv.TILE_ELEMENTS, gemv.NUM_WARPS = (int(v) for v in setting.split("x"))
        engine, _ = decoding_engine(model, cfg, 1)
        print(f"gemv {setting}: batch 1 graph replay {replay_ms(engine.runner.graphs[1]):.3f} ms", flush=True)
        del engine
        torch.cuda.empty_cache()


def decode(model, cfg, batch: int, show_timeline: bool = False) -> None:
    engine, seqs = decoding_engine(model, cfg, batch)
    t0 = time.perf_counter()
    for _ in range(50):
        engine.step()
    sync()
    step_ms = (time.perf_counter() - t0) / 50 * 1e3
    graph = engine.runner.graphs[next(b for b in engine.runner.graphs if b >= batch)]
    replay = replay_ms(graph)
    # Each sequence's last known token again (a step may be in flight): a real decode step's shapes.
    items = [ScheduledItem(s, len(s.all_token_ids) - 1, s.all_token_ids[-1:], 1) for s in seqs]
    t0 = time.perf_counter()
    for _ in range(50):
        engine.runner.pack(items, rows_mode=True)
    pack_ms = (time.perf_counter() - t0) / 50 * 1e3
    print(f"decode batch {batch}: engine step {step_ms:.2f} ms, graph replay {replay:.2f} ms, "
          f"host share {step_ms - replay:.2f} ms (pack alone {pack_ms:.3f} ms)", flush=True)
    if show_timeline:
        print(timeline(graph, 2 if cfg.q_lora_rank is None else 3), flush=True)
        print(step_gaps(engine), flush=True)
        return
    same_without_graphs(model, cfg, batch)
    print(host_profile(engine.step, 30), flush=True)
    step = engine.runner.pack(items, rows_mode=True)
    # The captured step (side streams on) against the same step run eagerly on one stream.
    with torch.inference_mode():
        replayed = engine.runner.execute(step)[1].clone()
        # The same step replayed again and again gives the same logits to the bit (a kernel that races, such
        # as a last-program-done reduction reading rows before they land, would not).
        differ = sum(not torch.equal(engine.runner.execute(step)[1], replayed) for _ in range(100))
        print(f"decode batch {batch}: the same step replayed 100 times: {differ} differ from the first", flush=True)
        print(f"decode batch {batch}: the graph's own argmax equals the logits' argmax: "
              f"{torch.equal(engine.runner.last_argmax, replayed.argmax(-1))}", flush=True)
        before, (launch, pdl.ENABLED) = dispatch.configure(overlap=False), (pdl.ENABLED, False)
        overlap = before.overlap
        step.graph_size = 0
        one_stream = engine.runner.execute(step)[1]
        dispatch.configure(overlap=overlap)
        pdl.ENABLED = launch
    print(f"decode batch {batch}: graph (overlap {overlap}, PDL {launch}) against eager on one stream without PDL: "
          f"logits max abs diff "
          f"{(replayed - one_stream).abs().max().item():.3g}, argmax equal "
          f"{bool((replayed.argmax(-1) == one_stream.argmax(-1)).all())}", flush=True)
    step.graph_size = 0  # eager, to see the kernels
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.runner.execute(step)
        sync()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=50), flush=True)


@torch.inference_mode()
def prefill(model, cfg, batch: int, length: int) -> None:
    engine = LLMEngine(model, None, max_num_seqs=batch, max_num_batched_tokens=batch * length, block_size=64,
                       max_model_len=length + 8, cuda_graphs=False, num_blocks=batch * (length // 64 + 2) + 8)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def step(seed: int) -> float:
        seqs = [engine.add_request(p, params) for p in random_prompts(batch, length, cfg.vocab_size, seed=seed)]
        sync()
        t0 = time.perf_counter()
        while engine.has_unfinished():  # async scheduling: the second step reads the first one's tokens
            engine.step()
        sync()
        elapsed = time.perf_counter() - t0
        assert all(s.finished for s in seqs)
        engine.requests.clear()
        return elapsed

    step(1)
    step_s = min(step(2), step(3))
    seqs = [engine.add_request(p, params) for p in random_prompts(batch, length, cfg.vocab_size, seed=4)]
    scheduled = engine.scheduler.schedule()
    items = [ScheduledItem(s, 0, s.all_token_ids[:n], 1) for s, n in scheduled]
    t0 = time.perf_counter()
    packed = engine.runner.pack(items, rows_mode=False)
    sync()
    pack_s = time.perf_counter() - t0
    times = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        engine.runner.execute(packed)
        sync()
        times.append(time.perf_counter() - t0)
    forward_s = min(times)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.runner.execute(packed)
        sync()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_s = sum(e.self_device_time_total for e in kernels) / 1e6
    tokens = batch * length
    print(f"prefill {batch} x {length}: engine step {step_s * 1e3:.1f} ms ({tokens / step_s:.0f} tok/s), "
          f"pack {pack_s * 1e3:.1f} ms, forward {forward_s * 1e3:.1f} ms, GPU kernels {gpu_s * 1e3:.1f} ms "
          f"({tokens / gpu_s:.0f} tok/s if the GPU never waited)", flush=True)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=50), flush=True)
    print(host_profile(lambda: engine.runner.execute(packed), 1, top=15), flush=True)
    for s in seqs:
        engine.abort(s.request_id)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="moonlight-16b", choices=list(SHAPES))
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prefill", default="8x2048")
    ap.add_argument("--gemv-sweep", default="", help="tile settings 'elements x warps', comma-separated")
    ap.add_argument("--timeline", action="store_true", help="per-kernel timeline of a replayed decode step only")
    ap.add_argument("--gemv-rows", type=int, default=None, help="rows up to which linears take the GEMV kernel")
    args = ap.parse_args()
    if args.gemv_rows is not None:
        from dsv3.kernels import gemv
        gemv.MAX_ROWS = args.gemv_rows
    cfg = ModelConfig.from_dict({**SHAPES[args.model], "num_nextn_predict_layers": 0})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM(cfg, dtype=torch.bfloat16).eval()
    init_weights(model, cfg.initializer_range)
    if cfg.quant is not None:
        random_fp8_weights(model, cfg.initializer_range)
    if args.gemv_sweep:
        gemv_sweep(model, cfg, args.gemv_sweep)
    for b in [int(x) for x in args.batches.split(",") if x]:
        decode(model, cfg, b, args.timeline)
    for shape in [s for s in args.prefill.split(",") if s]:
        prefill(model, cfg, *(int(v) for v in shape.split("x")))


if __name__ == "__main__":
    main()
