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

from bench import SHAPES, random_prompts
from dsv3.config import ModelConfig
from dsv3.engine.llm import LLMEngine
from dsv3.engine.sampling import SamplingParams
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


def decode(model, cfg, batch: int) -> None:
    engine = LLMEngine(model, None, max_num_seqs=batch, max_num_batched_tokens=16384, block_size=64,
                       max_model_len=1024, num_blocks=batch * 16 + 8)
    params = SamplingParams(max_tokens=600, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in random_prompts(batch, 128, cfg.vocab_size, seed=batch)]
    while any(len(s.output_token_ids) == 0 for s in seqs):
        engine.step()
    for _ in range(5):
        engine.step()
    sync()
    t0 = time.perf_counter()
    for _ in range(50):
        engine.step()
    sync()
    step_ms = (time.perf_counter() - t0) / 50 * 1e3
    size = next(b for b in engine.runner.graphs if b >= batch)
    graph = engine.runner.graphs[size]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        graph.replay()
    end.record()
    sync()
    replay_ms = start.elapsed_time(end) / 50
    # Each sequence's last known token again (a step may be in flight): a real decode step's shapes.
    items = [(s, len(s.all_token_ids) - 1, s.all_token_ids[-1:], 1) for s in seqs]
    t0 = time.perf_counter()
    for _ in range(50):
        engine.runner.pack(items, rows_mode=True)
    pack_ms = (time.perf_counter() - t0) / 50 * 1e3
    print(f"decode batch {batch}: engine step {step_ms:.2f} ms, graph replay {replay_ms:.2f} ms, "
          f"host share {step_ms - replay_ms:.2f} ms (pack alone {pack_ms:.3f} ms)", flush=True)
    print(host_profile(engine.step, 30), flush=True)
    step = engine.runner.pack(items, rows_mode=True)
    # The captured step (side streams on) against the same step run eagerly on one stream.
    with torch.inference_mode():
        replayed = engine.runner.execute(step)[1].clone()
        (overlap, dispatch.OVERLAP), (launch, pdl.ENABLED) = (dispatch.OVERLAP, False), (pdl.ENABLED, False)
        step.graph_size = 0
        one_stream = engine.runner.execute(step)[1]
        dispatch.OVERLAP, pdl.ENABLED = overlap, launch
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
    items = [(s, 0, s.all_token_ids[:n], 1) for s, n in scheduled]
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
    for b in [int(x) for x in args.batches.split(",") if x]:
        decode(model, cfg, b)
    for shape in [s for s in args.prefill.split(",") if s]:
        prefill(model, cfg, *(int(v) for v in shape.split("x")))


if __name__ == "__main__":
    main()
