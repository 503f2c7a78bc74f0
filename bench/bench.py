"""dsv3 vs transformers on the same random weights, on one GPU (shared/BENCH.md).

    PYTHONPATH=src python bench/bench.py --model moonlight-16b --out bench/results

Measures the copy bandwidth and bf16 matmul rate first, then decode (prompt 128, 128 new tokens,
greedy, batch 1/8/64/256) and prefill (8 x 2048, 1 x 8192) with dsv3's engine, the same decode with
transformers (dynamic and static cache, sharing dsv3's weight tensors, so no second copy), greedy
agreement between the two, and cache bytes per token. Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch

from dsv3.config import ModelConfig
from dsv3.engine.cache import blocks_that_fit
from dsv3.engine.llm import LLMEngine
from dsv3.engine.sampling import SamplingParams
from dsv3.model import DeepseekV3ForCausalLM, init_weights

SHAPES = {
    "moonlight-16b": dict(vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
                          num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
                          n_routed_experts=64, routed_scaling_factor=2.446, kv_lora_rank=512, q_lora_rank=None,
                          qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=1, topk_group=1,
                          num_experts_per_tok=6, first_k_dense_replace=1, norm_topk_prob=True,
                          max_position_embeddings=8192, rope_theta=50000.0, num_nextn_predict_layers=1,
                          bos_token_id=163584, eos_token_id=163585),
    # DeepSeek-V3's real dimensions (config_671B) with 1 dense + 4 MoE layers, FP8 128x128 as the checkpoint ships.
    "v3-slice": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                     num_hidden_layers=5, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
                     n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
                     qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4,
                     num_experts_per_tok=8, first_k_dense_replace=1, norm_topk_prob=True,
                     max_position_embeddings=16384, rope_theta=10000.0, num_nextn_predict_layers=0,
                     rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                     quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}),
}


@torch.no_grad()
def random_fp8_weights(model: DeepseekV3ForCausalLM, std: float) -> None:
    """FP8 weights ~ N(0, 1) clamped, scales std: weights of std `std`, made expert by expert (no big temporaries)."""
    for name, p in model.named_parameters():
        if p.dtype == torch.float8_e4m3fn:
            for part in (p.unbind(0) if p.dim() == 3 else [p]):
                part.copy_(torch.randn(part.shape, device=part.device).clamp(-8, 8).to(torch.float8_e4m3fn))
        elif name.endswith("scale_inv"):
            p.uniform_(0.5 * std, 1.5 * std)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_copy_bandwidth() -> float:
    x = torch.randn(512 * 2**20, device="cuda")  # 2 GiB
    y = torch.empty_like(x)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del x, y
    return 2 * 512 * 2**20 * 4 / sorted(times)[len(times) // 2]  # bytes read + written per second


def measure_matmul_rate() -> float:
    a = [torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    for _ in range(3):
        a[0] @ a[1]
    times = []
    for i in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a[i % 3] @ a[(i + 1) % 3]
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / sorted(times)[len(times) // 2]


def weight_bytes(cfg: ModelConfig, batch: int) -> tuple[float, float]:
    """Bytes of weights one decode step touches at this batch (routed experts: the expected number of
    distinct experts hit by batch*k uniform picks), and the active parameters per token (for MFU)."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    q = d * h * cfg.qk_head_dim if cfg.q_lora_rank is None else d * cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim
    attn = q + d * cfg.latent_dim + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim) + h * cfg.v_head_dim * d
    expert = 3 * d * cfg.moe_intermediate_size
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    n_dense = cfg.num_hidden_layers - n_moe
    hit = cfg.n_routed_experts * (1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** batch)
    shared = n_moe * (cfg.n_shared_experts * expert + d * cfg.n_routed_experts)
    dense = cfg.num_hidden_layers * attn + n_dense * 3 * d * cfg.intermediate_size + shared + d * cfg.vocab_size
    touched = dense + n_moe * hit * expert
    active = dense + n_moe * cfg.num_experts_per_tok * expert
    # FP8 checkpoints: every projection 1 byte a weight; the router and LM head stay bf16.
    bf16_part = d * cfg.vocab_size + n_moe * d * cfg.n_routed_experts
    weight_size = 1 if cfg.quant is not None else 2
    return (touched - bf16_part) * weight_size + bf16_part * 2, active


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n, length), generator=g).tolist()


def dsv3_decode(engine: LLMEngine, batch: int, prompt: int, new: int, vocab: int,
                prompts: list[list[int]] | None = None) -> tuple[float, list[list[int]]]:
    """Seconds per output token of each sequence over the decode phase (after its first token), and the tokens."""
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    prompts = prompts or random_prompts(batch, prompt, vocab, seed=batch)
    seqs = [engine.add_request(p, params) for p in prompts]
    while any(len(s.output_token_ids) == 0 for s in seqs):  # prefill (and the first token)
        engine.step()
    sync()
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    sync()
    elapsed = time.perf_counter() - start
    outs = [s.output_token_ids for s in seqs]
    for s in seqs:
        engine.release(s)
    return elapsed / (new - 1), outs


def dsv3_prefill(engine: LLMEngine, batch: int, prompt: int, vocab: int) -> float:
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    times = []
    for rep in range(3):
        seqs = [engine.add_request(p, params) for p in random_prompts(batch, prompt, vocab, seed=1000 + rep)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        for s in seqs:
            engine.release(s)
    return sorted(times)[1]


def hf_model(model: DeepseekV3ForCausalLM, raw: dict):
    import transformers

    cfg = transformers.DeepseekV3Config(**raw)
    with torch.device("meta"):
        hf = transformers.DeepseekV3ForCausalLM(cfg)
    missing, _ = hf.load_state_dict(model.state_dict(), strict=False, assign=True)  # shares dsv3's tensors
    missing = [k for k in missing if "rotary" not in k]
    assert not missing, missing
    hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg).to("cuda")  # its buffers were left on meta
    return hf.eval()


def hf_decode(hf, batch: int, prompt: int, new: int, vocab: int, static: bool) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(random_prompts(batch, prompt, vocab, seed=batch), device="cuda")
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    with torch.inference_mode():
        # Warm up with the very arguments timed: a static cache of another length would compile again.
        for _ in range(2 if static else 1):
            hf.generate(ids, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(ids, **{**kw, "max_new_tokens": 1, "min_new_tokens": 1})
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        out = hf.generate(ids, **kw)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    # Dynamic cache: subtract the prefill (a 1-token generate). Static: that would compile anew, so the
    # whole call counts, prefill included (a slight underestimate of its decode speed).
    per_step = ((t2 - t1) - (t1 - t0)) / (new - 1) if not static else (t2 - t1) / new
    return per_step, out[:, prompt:].tolist()


@torch.inference_mode()
def logits_agreement(model: DeepseekV3ForCausalLM, hf, vocab: int) -> dict:
    """Teacher-forced: both models' logits on the same 2 x 128 prompts. Relative error and how often
    the two argmaxes agree; with random weights the logits are nearly flat, so bf16 noise flips close calls."""
    ids = torch.tensor(random_prompts(2, 128, vocab, seed=7), device="cuda")
    ours, theirs = model(ids).float(), hf(ids).logits.float()
    top2 = theirs.topk(2, dim=-1).values
    return dict(logits_relative_error=((ours - theirs).norm() / theirs.norm()).item(),
                top1_agreement=(ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
                median_top2_gap=(top2[..., 0] - top2[..., 1]).median().item(),
                logits_std=theirs.std().item())


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each row's tokens before the first disagreement."""
    fractions = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        fractions.append(n / max(min(len(x), len(y)), 1))
    return sum(fractions) / len(fractions)


def write_results(args, cfg: ModelConfig, copy_bw: float, mm_rate: float, pool_tokens: int,
                  cache_bytes_per_token: int, rows: list[dict]) -> None:
    """JSON and a markdown table under $OUT (the device run) or --out; called after each phase, so a run cut
    short still leaves what it measured."""
    result = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  commit=args.commit, model=args.model, copy_TBps=copy_bw / 1e12, matmul_TFLOPs=mm_rate / 1e12,
                  cache_bytes_per_token=cache_bytes_per_token,
                  transformers_cache_bytes_per_token=cfg.num_hidden_layers * cfg.num_attention_heads
                  * (cfg.qk_head_dim + cfg.v_head_dim) * 2,
                  pool_tokens_at_startup=pool_tokens, rows=rows)
    out = Path(os.environ.get("OUT", args.out))
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{result['date']}-{result['gpu'].replace(' ', '_')}-{args.model}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# {args.model} on {result['gpu']} (torch {result['torch']}, commit {args.commit}, {result['date']})", "",
             f"copy {result['copy_TBps']:.2f} TB/s, bf16 matmul {result['matmul_TFLOPs']:.0f} TFLOP/s; latent cache "
             f"{cache_bytes_per_token} B/token vs transformers {result['transformers_cache_bytes_per_token']} B/token; "
             f"pool at start-up {pool_tokens} tokens", "",
             "| system | workload | batch | tokens/s | ms/token | roofline | MFU | acceptance | speedup | agreement |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def f(r, key, fmt):
        return format(r[key], fmt) if key in r else ""

    for r in rows:
        lines.append(f"| {r['system']} | {r['workload']} {r.get('prompt')} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                     f"{f(r, 'ms_per_token', '.2f')} | {f(r, 'roofline_fraction', '.2f')} | {f(r, 'mfu', '.2f')} | "
                     f"{f(r, 'acceptance', '.2f')} | {f(r, 'speedup', '.2f')} | "
                     f"{f(r, 'greedy_agreement_with_dsv3', '.2f')} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="moonlight-16b", choices=list(SHAPES))
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--peer", default="dynamic,static", help="transformers cache kinds to run ('' = none)")
    ap.add_argument("--peer-batches", default="1,64")
    ap.add_argument("--prefill", default="8x2048,1x8192", help="batch x length shapes to prefill")
    ap.add_argument("--speculative", default="1", help="draft lengths k to measure with MTP ('' = none)")
    ap.add_argument("--commit", default=os.environ.get("DSV3_COMMIT", "unknown"))
    args = ap.parse_args()

    torch.manual_seed(0)
    copy_bw, mm_rate = measure_copy_bandwidth(), measure_matmul_rate()
    print(f"copy {copy_bw / 1e12:.2f} TB/s, bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s", flush=True)
    raw = SHAPES[args.model]
    cfg = ModelConfig.from_dict(raw)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM(cfg, dtype=torch.bfloat16).eval()
    init_weights(model, cfg.initializer_range)  # skips FP8 weights and their scales
    if cfg.quant is not None:
        random_fp8_weights(model, cfg.initializer_range)
    print(f"random weights in {time.perf_counter() - t0:.1f}s, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.perf_counter()
    free, _ = torch.cuda.mem_get_info()
    pool_tokens = 64 * blocks_that_fit(int(free * 0.8), len(model.model.layers), 64, cfg.latent_dim, torch.bfloat16)
    # The runs below need far less than what memory allows: a fixed pool leaves room for a second engine.
    engine = LLMEngine(model, None, max_num_seqs=max(batches), max_num_batched_tokens=16384, block_size=64,
                       max_model_len=args.prompt + args.new + 8, num_blocks=2048)
    print(f"engine ready in {time.perf_counter() - t0:.1f}s (graphs for {list(engine.runner.graphs)}), "
          f"pool {engine.cache_tokens} tokens", flush=True)
    rows = []
    cache_bytes_per_token = len(engine.latent_caches) * cfg.latent_dim * 2
    dsv3_tokens = {}
    for b in batches:
        step, outs = dsv3_decode(engine, b, args.prompt, args.new, cfg.vocab_size)
        dsv3_tokens[b] = outs
        weights, _ = weight_bytes(cfg, b)
        cache_read = b * (args.prompt + args.new / 2) * cache_bytes_per_token
        roofline = (weights + cache_read) / copy_bw
        rows.append(dict(system="dsv3", workload="decode", batch=b, prompt=args.prompt, new=args.new,
                         tokens_per_s=b / step, ms_per_token=step * 1e3, roofline_fraction=roofline / step,
                         roofline_tokens_per_s=b / roofline))
        print(rows[-1], flush=True)
    for k in [int(x) for x in args.speculative.split(",") if x]:
        spec = LLMEngine(model, None, max_num_seqs=64, max_num_batched_tokens=16384, block_size=64,
                         max_model_len=args.prompt + args.new + 8, speculative_tokens=k,
                         num_blocks=1024)
        for b in (1, 8, 64):
            before = dict(spec.stats)
            step, outs = dsv3_decode(spec, b, args.prompt, args.new, cfg.vocab_size)
            drafted = spec.stats["spec_drafted"] - before["spec_drafted"]
            accepted = spec.stats["spec_accepted"] - before["spec_accepted"]
            tokens_per_s = b / step
            plain = next(r for r in rows if r["workload"] == "decode" and r["batch"] == b and r["system"] == "dsv3")
            rows.append(dict(system=f"dsv3-mtp{k}", workload="decode", batch=b, prompt=args.prompt, new=args.new,
                             tokens_per_s=tokens_per_s, ms_per_token=step * 1e3,
                             acceptance=accepted / max(drafted, 1), speedup=tokens_per_s / plain["tokens_per_s"],
                             greedy_equal_to_plain=outs == dsv3_tokens.get(b),
                             speculation_off_steps=spec.stats["spec_off_steps"] - before["spec_off_steps"],
                             speculation_off_sequences=spec.stats["spec_off_sequences"] - before["spec_off_sequences"]))
            print(rows[-1], flush=True)
        del spec
    # Prefill: a pool sized for long prompts.
    del engine
    torch.cuda.empty_cache()
    engine = LLMEngine(model, None, max_num_seqs=8, max_num_batched_tokens=16384, block_size=64,
                       max_model_len=8192 + 8, cuda_graphs=False, num_blocks=1100)
    _, active = weight_bytes(cfg, 1)
    for b, t in [tuple(int(v) for v in shape.split("x")) for shape in args.prefill.split(",") if shape]:
        seconds = dsv3_prefill(engine, b, t, cfg.vocab_size)
        attn_flops = cfg.num_hidden_layers * b * 2 * cfg.num_attention_heads * t * t / 2 * (cfg.qk_head_dim + cfg.v_head_dim)
        flops = 2 * active * b * t + attn_flops
        rows.append(dict(system="dsv3", workload="prefill", batch=b, prompt=t, tokens_per_s=b * t / seconds,
                         seconds=seconds, mfu=flops / seconds / mm_rate))
        print(rows[-1], flush=True)
    del engine
    torch.cuda.empty_cache()

    save = lambda: write_results(args, cfg, copy_bw, mm_rate, pool_tokens, cache_bytes_per_token, rows)  # noqa: E731
    save()
    peer_kinds = [k for k in args.peer.split(",") if k]
    if peer_kinds:
        hf = hf_model(model, raw)
        check = logits_agreement(model, hf, cfg.vocab_size)
        rows.append(dict(system="dsv3-vs-transformers", workload="logits", batch=2, prompt=128, tokens_per_s=0.0,
                         **check))
        print(rows[-1], flush=True)
        for kind in peer_kinds:
            for b in [int(x) for x in args.peer_batches.split(",")] if kind == "dynamic" else [1]:
                new = 64
                try:
                    step, outs = hf_decode(hf, b, args.prompt, new, cfg.vocab_size, static=kind == "static")
                except Exception as e:  # the peer failing must not lose dsv3's figures
                    print(f"transformers {kind} batch {b} failed: {e!r}", flush=True)
                    continue
                row = dict(system=f"transformers-{kind}", workload="decode", batch=b, prompt=args.prompt, new=new,
                           tokens_per_s=b / step, ms_per_token=step * 1e3)
                if b in dsv3_tokens:
                    row["greedy_agreement_with_dsv3"] = agreement(dsv3_tokens[b], outs)
                rows.append(row)
                print(row, flush=True)
                save()


if __name__ == "__main__":
    main()
