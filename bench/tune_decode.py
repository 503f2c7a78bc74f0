"""Launch settings of the decode kernels at moonlight-16b's shapes, timed under a CUDA graph.

    PYTHONPATH=src:bench python bench/tune_decode.py

The fused MoE's two GEMMs (tile shapes, warps, stages, rows a block) at batch 1, 8, 64 and 256, the
MLA decode (tokens a tile, splits, warps) at batch 1 and 64 over a 256-token context, and the dense
projections of a layer (cuBLAS against the Triton GEMM's tiles) at batch 1 and 8. Prints each
candidate's time and the best per shape, against the current default (the first candidate).
"""

from __future__ import annotations

import itertools

import torch
from triton.testing import do_bench_cudagraph

from dsv3.kernels.fp8_gemm import block_scaled_matmul, gemm_config
from dsv3.kernels.mla_decode import mla_decode
from dsv3.kernels.moe import expert_blocks, moe_block_m, moe_config


def us(fn) -> float:
    # Run once first: the first candidate of a run read high without it (the fused MoE's default 418 us when
    # timed first, 336 us when the same setting came again later; results/...-tune-moe-b256-b128.txt).
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=30) * 1e3


def moe(tokens: int, experts: int = 64, dim: int = 2048, inter: int = 1408, k: int = 6, fp8: bool = False) -> None:
    """The fused MoE's two GEMMs at moonlight-16b's shapes in bf16, or (fp8) as the engine runs DeepSeek-V3's FP8
    experts: 128 x 128 block scales, activations quantized, SwiGLU in the first GEMM."""
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(experts, 2 * inter, dim, device="cuda", dtype=torch.bfloat16) * 0.02
    down = torch.randn(experts, dim, inter, device="cuda", dtype=torch.bfloat16) * 0.02
    gate_up_scale = down_scale = None
    if fp8:
        gate_up = gate_up.clamp(-8, 8).to(torch.float8_e4m3fn)
        down = down.clamp(-8, 8).to(torch.float8_e4m3fn)
        gate_up_scale = torch.rand(experts, 2 * inter // 128, dim // 128, device="cuda")
        down_scale = torch.rand(experts, dim // 128, inter // 128, device="cuda")
    ids = torch.stack([torch.randperm(experts, device="cuda", generator=gen)[:k] for _ in range(tokens)])
    act = torch.randn(tokens * k * 64 + experts * 64, inter, device="cuda", dtype=torch.bfloat16)
    default_m = moe_block_m(tokens * k, experts, fp8)   # as kernels/moe.py fused_experts picks it
    results = []
    # The engine's own choice first: results[0] is the default the best is compared with.
    others = ({16, 64} | ({32} if tokens >= 64 else set()) | ({128} if tokens >= 512 else set())
              if tokens > 1 else set()) - {default_m}
    for block_m in [default_m, *sorted(others)]:
        token_at, row_at, block_expert, _ = expert_blocks(ids.flatten(), experts, block_m, k)
        cap = token_at.numel()
        base = moe_config(block_m, 2 * inter, tokens * k, experts, fp8)   # the engine's tiles for this block_m
        grid = itertools.product((32, 64, 128), (128,) if fp8 else (64, 128), (4, 8), (3, 4))   # FP8: K blocks 128
        configs = [base] + [dict(BLOCK_M=block_m, BLOCK_N=n, BLOCK_K=kk, num_warps=w, num_stages=st)
                            for n, kk, w, st in grid]
        for config in configs:
            try:
                t1 = us(lambda: block_scaled_matmul(x, gate_up, gate_up_scale, cap, token_at, block_expert, fp8, config,
                                                    swiglu=fp8))
                t2 = us(lambda: block_scaled_matmul(act[:cap], down, down_scale, cap, row_at, block_expert, fp8,
                                                    config))
            except Exception as e:  # out of shared memory, say
                print(f"  moe tokens={tokens} {config}: {type(e).__name__}")
                continue
            results.append((t1 + t2, t1, t2, config))
    default = results[0]
    best = min(results, key=lambda r: r[0])
    print(f"moe tokens={tokens}: default {default[0]:.1f} us ({default[1]:.1f} + {default[2]:.1f}) {default[3]}; "
          f"best {best[0]:.1f} us ({best[1]:.1f} + {best[2]:.1f}) {best[3]}", flush=True)
    for r in sorted(results, key=lambda r: r[0])[:5]:
        print(f"    {r[0]:.1f} us {r[3]}")


def report(title: str, results: list, unit: str, top: int) -> None:
    """results: (time, setting) with the default first; prints it, the best, and the `top` fastest."""
    best = min(results, key=lambda r: r[0])
    print(f"{title}: default {results[0][0]:.2f} {unit}; best {best[0]:.2f} {unit} {best[1]}", flush=True)
    for t, kw in sorted(results, key=lambda r: r[0])[:top]:
        print(f"    {t:.2f} us {kw}")


def mla(batch: int, context: int = 256, heads: int = 16, max_len: int = 1024, block_size: int = 64) -> None:
    c, r = 512, 64
    blocks = batch * (max_len // block_size)
    cache = torch.randn(blocks + 1, block_size, c + r, device="cuda", dtype=torch.bfloat16)
    tables = torch.arange(blocks, device="cuda", dtype=torch.int32).view(batch, -1)
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, heads, c, device="cuda", dtype=torch.bfloat16)
    q_pe = torch.randn(batch, heads, r, device="cuda", dtype=torch.bfloat16)
    results = [(us(lambda: mla_decode(q, q_pe, cache, tables, lens, c, 0.1)), "default")]
    for splits, block_n, warps, stages in itertools.product((1, 2, 4, 8), (16, 32, 64), (4, 8), (1, 2)):
        kw = dict(num_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)
        try:
            results.append((us(lambda: mla_decode(q, q_pe, cache, tables, lens, c, 0.1, **kw)), kw))
        except Exception as e:
            print(f"  mla batch={batch} {kw}: {type(e).__name__}")
    report(f"mla batch={batch} context={context} max_len={max_len}", results, "us", 4)


def streamed_us(op, weights: list[torch.Tensor], reps: int = 20) -> float:
    """Microseconds per call of op(w) when each call reads its weight from HBM, as a decode step does:
    one CUDA graph runs op over enough distinct copies to overflow L2 (do_bench_cudagraph repeats one
    weight, which then stays in the 50 MB L2)."""
    for w in weights:
        op(w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            op(w)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(weights))


DENSE_SHAPES = {"q_proj": (3072, 2048), "kv_a_proj": (576, 2048), "o_proj": (2048, 2048),
                "shared gate_up": (5632, 2048), "shared down": (2048, 2816), "dense gate_up": (22528, 2048)}


def dense(tokens: int) -> None:
    """cuBLAS (F.linear) against the Triton GEMM at moonlight-16b's dense shapes, weights streamed from HBM."""
    for name, (n, k) in DENSE_SHAPES.items():
        copies = max(4, -(-256 * 2**20 // (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
        results = [(streamed_us(lambda w: torch.nn.functional.linear(x, w), weights), "cuBLAS")]
        for bn, bk, warps, stages in itertools.product((16, 32, 64), (128, 256), (2, 4), (3, 4, 6)):
            config = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
            try:
                results.append((streamed_us(lambda w: block_scaled_matmul(x, w[None], None, tokens, config=config),
                                            weights), config))
            except Exception as e:  # out of shared memory, say
                print(f"  dense {name} {config}: {type(e).__name__}")
        best = min(results[1:], key=lambda r: r[0])
        mb = n * k * 2 / 1e6
        print(f"dense {name} ({n}x{k}, {mb:.1f} MB) tokens={tokens}: cuBLAS {results[0][0]:.2f} us "
              f"({mb / results[0][0]:.2f} TB/s); best Triton {best[0]:.2f} us ({mb / best[0]:.2f} TB/s) {best[1]}",
              flush=True)
        for t, config in sorted(results[1:], key=lambda r: r[0])[1:4]:
            print(f"    {t:.2f} us {config}")
        del weights
        torch.cuda.empty_cache()


def pdl_chain() -> None:
    """A chain of dependent batch-1 projections (each reads the last one's output, as in a layer), weights
    streamed from HBM: cuBLAS, the GEMV kernel (kernels/gemv.py), and the GEMV with programmatic
    dependent launch (its weight loads overlap the previous kernel's tail)."""
    from dsv3.kernels import gemv, pdl
    for n, k in ((2048, 2048), (5632, 2048), (1024, 1024)):
        length = max(8, -(-256 * 2**20 // (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(length)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)

        def chain(op, weights=weights):
            def run(_):
                h = x
                for w in weights:
                    h = op(h[:, :k], w)
                return h
            return run

        times = {}
        for name, op, on in (("cuBLAS", torch.nn.functional.linear, False), ("gemv", gemv.linear, False),
                             ("gemv + PDL", gemv.linear, True)):
            pdl.ENABLED = on
            times[name] = streamed_us(chain(op), [None], reps=20) / length
        pdl.ENABLED = True
        print(f"chain of {length} dependent {n}x{k} projections ({n * k * 2 / 1e6:.1f} MB each), batch 1: "
              + ", ".join(f"{name} {t:.2f} us" for name, t in times.items()), flush=True)
        del weights
        torch.cuda.empty_cache()


def mla_chain(context: int, layers: int = 27, heads: int = 16, max_len: int = 1024, block_size: int = 64) -> None:
    """Batch 1: a chain of `layers` MLA decodes with the W_UV product (the merge inside it), each over its own
    layer's cache, under PDL as in a decode step: microseconds a link, by launch setting."""
    c, r, v = 512, 64, 128
    blocks = max_len // block_size
    caches = [torch.randn(blocks, block_size, c + r, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    tables = torch.arange(blocks, device="cuda", dtype=torch.int32).view(1, -1)
    lens = torch.full((1,), context, device="cuda", dtype=torch.int32)
    q = torch.randn(1, heads, c, device="cuda", dtype=torch.bfloat16)
    q_pe = torch.randn(1, heads, r, device="cuda", dtype=torch.bfloat16)
    w_uv = torch.randn(heads, v, c, device="cuda", dtype=torch.bfloat16) * 0.02

    def chain(kw):
        def run(_):
            for cache in caches:
                mla_decode(q, q_pe, cache, tables, lens, c, 0.1, w_uv=w_uv, **kw)
        return run

    results = [(streamed_us(chain({}), [None]) / layers, "default")]
    for splits, block_n, warps, stages in itertools.product((2, 4, 8, 16), (16, 32, 64), (4, 8), (1, 2)):
        kw = dict(num_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)
        try:
            results.append((streamed_us(chain(kw), [None]) / layers, kw))
        except Exception as e:
            print(f"  mla chain {kw}: {type(e).__name__}")
    try:  # registers and spills of each compiled variant (Triton's cache layout differs between versions)
        from dsv3.kernels import mla_decode as module
        for cache in module._mla_decode_split.device_caches.values():
            for key, kernel in cache[0].items():
                print(f"    compiled: {kernel.n_regs} registers, {kernel.n_spills} spills, "
                      f"{kernel.metadata.num_warps} warps, shared {kernel.metadata.shared} B", flush=True)
    except Exception as e:
        print(f"    (no register counts: {type(e).__name__}: {e})")
    report(f"mla + W_UV chain, batch 1, context {context}, max_len {max_len}", results, "us a link", 6)


def fp8_gemv(settings=((16384, 8192, 4), (8192, 8192, 4), (32768, 8192, 4), (32768, 65536, 8))) -> None:
    """The FP8 GEMV (kernels/gemv.py) at DeepSeek-V3's shapes, one token: 8 routed experts' gate and up (SwiGLU,
    and as plain rows), their down, and o_proj, for each (FP8_TILE_ELEMENTS, TILE_ELEMENTS, NUM_WARPS)."""
    from dsv3.kernels import gemv
    e, d, inter, dev = 256, 7168, 2048, "cuda"

    def fp8(*shape):
        return torch.randn(*shape, device=dev).clamp(-8, 8).to(torch.float8_e4m3fn)

    gate_up, gate_up_scale = fp8(e, 2 * inter, d), torch.rand(e, 2 * inter // 128, d // 128, device=dev)
    down, down_scale = fp8(e, d, inter), torch.rand(e, d // 128, inter // 128, device=dev)
    o_proj, o_scale = fp8(d, 16384), torch.rand(d // 128, 128, device=dev)
    x, xo = (torch.randn(1, k, device=dev, dtype=torch.bfloat16) for k in (d, 16384))
    act = torch.randn(8, inter, device=dev, dtype=torch.bfloat16)
    ids = torch.randperm(e, device=dev)[:8]
    cases = (("gate_up swiglu", lambda: gemv.routed(x, ids, gate_up, swiglu=True, scale=gate_up_scale), 8 * 2 * inter * d),
             ("gate_up plain", lambda: gemv.routed(x, ids, gate_up, scale=gate_up_scale), 8 * 2 * inter * d),
             ("down", lambda: gemv.routed(act, ids, down, scale=down_scale), 8 * inter * d),
             ("o_proj", lambda: gemv.linear(xo, o_proj, scale=o_scale), d * 16384))
    saved = gemv.FP8_TILE_ELEMENTS, gemv.TILE_ELEMENTS, gemv.NUM_WARPS
    for setting in settings:
        gemv.FP8_TILE_ELEMENTS, gemv.TILE_ELEMENTS, gemv.NUM_WARPS = setting
        for name, fn, nbytes in cases:
            t = us(fn)
            print(f"fp8 tile {setting[0]} tile {setting[1]} warps {setting[2]}: {name:15s} {t:7.1f} us "
                  f"{nbytes / t / 1e6:5.2f} TB/s", flush=True)
    gemv.FP8_TILE_ELEMENTS, gemv.TILE_ELEMENTS, gemv.NUM_WARPS = saved


def main() -> None:
    import sys
    if "--fp8-gemv" in sys.argv:
        fp8_gemv()
        return
    if "--mla-chain" in sys.argv:
        for context in (170, 1000):
            mla_chain(context)
        return
    if "--pdl" in sys.argv:
        pdl_chain()
        return
    if "--moe-fp8" in sys.argv:             # --moe-fp8 256,64: the same at DeepSeek-V3's FP8 expert shapes
        for tokens in sys.argv[sys.argv.index("--moe-fp8") + 1].split(","):
            moe(int(tokens), experts=256, dim=7168, inter=2048, k=8, fp8=True)
        return
    if "--moe" in sys.argv:                 # --moe 256,128: the fused MoE's tiles at those batches
        for tokens in sys.argv[sys.argv.index("--moe") + 1].split(","):
            moe(int(tokens))
        return
    if "--mla" in sys.argv:                 # --mla 256,128: the MLA decode alone at those batches
        for batch in sys.argv[sys.argv.index("--mla") + 1].split(","):
            mla(int(batch), context=200, max_len=1024)
        return
    if "--dense" in sys.argv:
        for tokens in (1, 8):
            dense(tokens)
        return
    for tokens in (1, 8, 64, 256):
        moe(tokens)
    for batch, max_len in ((1, 1024), (1, 264), (64, 264)):
        mla(batch, max_len=max_len)


if __name__ == "__main__":
    main()
