"""The Triton kernels against their PyTorch twins in src/dsv3/kernels/reference.py.

The kernels run on the CPU under Triton's interpreter, which must be switched on before triton is
first imported; other test modules import it without, so the checks run in one subprocess (this file
run as a script) and report each distance to the reference. Shapes are tiny: the interpreter is slow.
Two limits of the interpreter shape the inputs: it multiplies bf16 as integers, so the kernels see
float32 and float16; and its float32 -> e4m3 rounding can drop a carry, so the activations fed to the
FP8 path are already e4m3 values times a power of two (their quantization is then exact). The GPU
comparison in bf16, at the model's shapes, is bench/kernels.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from dsv3.kernels import reference


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, NaN when out has one (so a NaN never passes a bound)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


# ---- the checks, run under TRITON_INTERPRET=1 in a subprocess ----------------------------------------

def paged_cache(gen: torch.Generator, lens: list[int], block_size: int, dim: int, dtype: torch.dtype):
    """A latent cache whose sequences own shuffled, non-contiguous blocks (one spare column of blocks)."""
    width = max(-(-n // block_size) for n in lens) + 1
    num_blocks = len(lens) * width + 3
    cache = torch.randn(num_blocks, block_size, dim, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[: len(lens) * width].view(len(lens), width).int()
    return cache, tables, torch.tensor(lens, dtype=torch.int32)


def check_mla_decode(gen: torch.Generator) -> dict[str, float]:
    from dsv3.kernels.mla_decode import mla_decode

    errors = {}
    cases = [  # name, heads, C, R, block_size, context lengths, dtype, splits, tokens a tile
        ("auto_splits", 4, 32, 16, 16, [37, 5], torch.float32, None, 16),
        ("one_split", 4, 32, 16, 16, [37, 5], torch.float32, 1, 16),
        ("ragged_heads", 20, 32, 16, 4, [1, 70, 33], torch.float32, 3, 16),
        ("more_splits_than_tiles", 4, 32, 16, 16, [3, 17], torch.float32, 8, 16),
        ("float16", 4, 32, 16, 16, [100], torch.float16, 4, 16),
        ("seven_splits_with_tokens", 4, 32, 16, 16, [100, 9], torch.float32, 7, 16),   # the merge's second turn
        # 32 programs: the launch for many sequences (at most one program a multiprocessor), all its defaults
        ("many_sequences", 4, 32, 16, 16, [1 + (7 * i) % 45 for i in range(32)], torch.float32, None, None),
    ]
    for name, heads, c, r, block_size, lens, dtype, splits, block_n in cases:
        cache, tables, ctx = paged_cache(gen, lens, block_size, c + r, dtype)
        q_latent = torch.randn(len(lens), heads, c, generator=gen).to(dtype)
        q_rope = torch.randn(len(lens), heads, r, generator=gen).to(dtype)
        ref = reference.mla_decode(q_latent.double(), q_rope.double(), cache.double(), tables, ctx, c, 0.3)
        out = mla_decode(q_latent, q_rope, cache, tables, ctx, c, 0.3, num_splits=splits, block_n=block_n)
        errors[f"mla_decode/{name}"] = rel_err(out, ref)
    # An empty context (a padded slot of a captured batch) gives zeros, never NaN.
    cache, tables, _ = paged_cache(gen, [16], 16, 48, torch.float32)
    out = mla_decode(torch.randn(1, 4, 32), torch.randn(1, 4, 16), cache, tables, torch.zeros(1, dtype=torch.int32),
                     32, 0.3, num_splits=2)
    errors["mla_decode/empty_context_abs"] = out.abs().max().item() if torch.isfinite(out).all() else float("nan")
    # Most splits empty (the split count follows the cache's capacity, not the context): the merges must
    # read only the splits that hold tokens, so fresh buffers are poisoned with NaN here.
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = poisoned
    try:
        cache, tables, ctx = paged_cache(gen, [5, 40], 16, 48, torch.float16)
        q_latent, q_rope = torch.randn(2, 4, 32, generator=gen).half(), torch.randn(2, 4, 16, generator=gen).half()
        w_uv = torch.randn(4, 24, 32, generator=gen).half()
        ref = reference.mla_decode(q_latent.float(), q_rope.float(), cache.float(), tables, ctx, 32, 0.3)
        for project in (False, True):
            out = mla_decode(q_latent, q_rope, cache, tables, ctx, 32, 0.3, num_splits=16, block_n=16,
                             w_uv=w_uv if project else None)
            errors[f"mla_decode/empty_splits/w_uv={project}/float16"] = rel_err(
                out, reference.per_head(ref, w_uv.float()) if project else ref)
    finally:
        torch.empty = empty
    # Projected by W_UV in the same call: with several splits their merge happens inside the GEMV. 7 splits over
    # 100 tokens all hold tokens: the merge's second turn of four rows.
    for splits, lens in ((1, [37, 5]), (4, [37, 5]), (7, [100, 5])):
        cache, tables, ctx = paged_cache(gen, lens, 16, 48, torch.float16)
        q_latent, q_rope = torch.randn(2, 4, 32, generator=gen).half(), torch.randn(2, 4, 16, generator=gen).half()
        w_uv = torch.randn(4, 24, 32, generator=gen).half()
        out = mla_decode(q_latent, q_rope, cache, tables, ctx, 32, 0.3, num_splits=splits, block_n=16, w_uv=w_uv)
        ref = reference.mla_decode(q_latent.float(), q_rope.float(), cache.float(), tables, ctx, 32, 0.3)
        errors[f"mla_decode/w_uv/splits={splits}/float16"] = rel_err(out, reference.per_head(ref, w_uv.float()))
    return errors


def check_prompt_attention(gen: torch.Generator) -> dict[str, float]:
    """A rows-mode step's fresh prompts in the expanded form: prompts that start and end inside a block of rows
    and span blocks, beside rows that are not fresh (a decode row, a later chunk: left as they were) and padding
    rows (each its own one-row prompt)."""
    from dsv3.kernels.mla_prompt import prompt_attention

    errors = {}
    spans = [(0, 7, True), (39, 1, False), (0, 20, True), (20, 3, False), (0, 1, True), (0, 1, True)]
    first_rows = torch.cat([torch.full((n,), sum(m for _, m, _ in spans[:s])) for s, (_, n, _) in enumerate(spans)])
    fresh = torch.cat([torch.full((n,), f) for _, n, f in spans])
    rows, heads = len(first_rows), 3
    for name, dtype, block in (("float32", torch.float32, 16), ("float16", torch.float16, 16),
                               ("one_tile", torch.float32, 64)):
        q_nope, k_nope = (torch.randn(rows, heads, 32, generator=gen).to(dtype) for _ in range(2))
        v = torch.randn(rows, heads, 24, generator=gen).to(dtype)                  # masked to 24 of a 32-wide tile
        q_pe, k_pe = torch.randn(rows, heads, 16, generator=gen).to(dtype), torch.randn(rows, 16, generator=gen).to(dtype)
        kept = torch.randn(rows, heads, 24, generator=gen).to(dtype)
        ref = reference.prompt_attention(q_nope.double(), q_pe.double(), k_nope.double(), k_pe.double(), v.double(),
                                         first_rows, fresh, 0.3, kept.double().clone())
        out = prompt_attention(q_nope, q_pe, k_nope, k_pe, v, first_rows.int(), fresh, 0.3, kept.clone(),
                               block_m=block, block_n=block)
        errors[f"prompt_attention/{name}"] = rel_err(out, ref)
    return errors


def exact_e4m3_activations(gen: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    """Rows of e4m3 values times a power of two, each 128-column block holding a 448: quantizing them is exact."""
    q = torch.randn(rows, cols, generator=gen).mul(40).clamp(-440, 440).to(torch.float8_e4m3fn).float()
    q[:, ::128] = 448.0
    return q * torch.exp2(torch.randint(-8, 2, (rows, 1), generator=gen).float())


def check_fp8_gemm(gen: torch.Generator) -> dict[str, float]:
    from dsv3.kernels import scaled_mm
    from dsv3.kernels.fp8_gemm import fp8_dequantize, fp8_linear, quantize_rows

    errors = {}
    # The activations' quantization before cuBLASLt's FP8 GEMM: the PyTorch function's values, scales and
    # their column-major layout, with the rows padded to the multiple it needs.
    x = exact_e4m3_activations(gen, 3, 256).to(torch.bfloat16)
    q, s = quantize_rows(x, 8)
    ref_q, ref_s = scaled_mm.quantize_activations(torch.nn.functional.pad(x, (0, 0, 0, 5)))
    errors["fp8_linear/quantize_rows/value_mismatches"] = float((q.float() != ref_q.float()).sum())
    errors["fp8_linear/quantize_rows/scale_mismatches"] = float((s != ref_s).sum())
    errors["fp8_linear/quantize_rows/layout_mismatches"] = float(s.stride() != ref_s.stride() or s.shape != ref_s.shape)
    for m, n, k in [(1, 128, 128), (5, 200, 320), (70, 130, 256)]:
        weight, scale = reference.fp8_quantize(torch.randn(n, k, generator=gen) * 0.1)
        x = torch.randn(m, k, generator=gen)
        ref = reference.fp8_linear(x.double(), weight, scale)
        errors[f"fp8_linear/bf16_path/{m}x{n}x{k}/float32"] = rel_err(
            fp8_linear(x, weight, scale, quantize_activations=False), ref)
        errors[f"fp8_linear/bf16_path/{m}x{n}x{k}/float16"] = rel_err(
            fp8_linear(x.half(), weight, scale, quantize_activations=False), ref)
        # DeepSeek's scheme: compare with the reference on the activations quantized per 1x128 block.
        x = exact_e4m3_activations(gen, m, k)
        xq, xs = reference.fp8_quantize(x, block=(1, 128))
        ref = reference.fp8_dequantize(xq, xs, torch.float64) @ reference.fp8_dequantize(weight, scale, torch.float64).T
        errors[f"fp8_linear/fp8_path/{m}x{n}x{k}"] = rel_err(fp8_linear(x, weight, scale), ref)
    weight, scale = reference.fp8_quantize(torch.randn(2, 3, 96, generator=gen))
    x = torch.randn(2, 3, 96, generator=gen)
    errors["fp8_linear/3d_input"] = rel_err(fp8_linear(x, weight[0], scale[0], quantize_activations=False),
                                            reference.fp8_linear(x.double(), weight[0], scale[0]))
    # Dequantization is exact in float32, including the partial edge block (576 rows in 5 blocks of 128).
    for shape in [(576, 320), (3, 130, 257)]:
        weight, scale = reference.fp8_quantize(torch.randn(*shape, generator=gen))
        for dtype in (torch.float32, torch.float16):
            out = fp8_dequantize(weight, scale, dtype)
            errors[f"fp8_dequantize/{shape}/{dtype}"] = rel_err(out, reference.fp8_dequantize(weight, scale, dtype))
    return errors


def check_fused_experts(gen: torch.Generator) -> dict[str, float]:
    from dsv3.kernels.moe import fused_experts

    errors = {}
    n_experts, dim, inter, tokens, k = 6, 160, 96, 7, 3
    x = torch.randn(tokens, dim, generator=gen)
    # Ids -1 and n_experts stand for other ranks' experts: they must add nothing.
    ids = torch.stack([torch.randperm(n_experts + 2, generator=gen)[:k] for _ in range(tokens)]) - 1
    weights = torch.rand(tokens, k, generator=gen)
    gate_up = torch.randn(n_experts, 2 * inter, dim, generator=gen) * 0.1
    down = torch.randn(n_experts, dim, inter, generator=gen) * 0.1
    ref = reference.routed_experts(x.double(), ids, weights, gate_up.double(), None, down.double(), None)
    for block_m in (16, 64, 128):
        out = fused_experts(x, ids, weights, gate_up, None, down, None, block_m=block_m)
        errors[f"fused_experts/plain/block_m={block_m}"] = rel_err(out, ref)
    plain_gate_up, plain_down = gate_up, down
    gate_up, gate_up_scale = reference.fp8_quantize(gate_up)
    down, down_scale = reference.fp8_quantize(down)
    ref = reference.routed_experts(x.double(), ids, weights, gate_up, gate_up_scale, down, down_scale)
    for block_m in (16, 64, 128):
        out = fused_experts(x, ids, weights, gate_up, gate_up_scale, down, down_scale, quantize_activations=False,
                            block_m=block_m)
        errors[f"fused_experts/fp8/block_m={block_m}"] = rel_err(out, ref)
    # A prefill of FP8 experts (PREFILL_PAIRS pairs an expert): PREFILL_FP8_CONFIG's tiles.
    from dsv3.kernels.moe import PREFILL_FP8_CONFIG, PREFILL_PAIRS, moe_block_m, moe_config

    many = PREFILL_PAIRS * n_experts // k
    big_x = torch.randn(many, dim, generator=gen)
    big_ids = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(many)])
    big_w = torch.rand(many, k, generator=gen)
    pairs = many * k
    assert moe_config(moe_block_m(pairs, n_experts, True), 2 * inter, pairs, n_experts, True) is PREFILL_FP8_CONFIG
    ref = reference.routed_experts(big_x.double(), big_ids, big_w, gate_up, gate_up_scale, down, down_scale)
    out = fused_experts(big_x, big_ids, big_w, gate_up, gate_up_scale, down, down_scale, quantize_activations=False)
    errors["fused_experts/fp8/prefill_tiles"] = rel_err(out, ref)
    # 16-bit experts past 64 pairs an expert: 128-row blocks, chosen by fused_experts itself.
    assert moe_block_m(pairs, n_experts, False) == 128 and moe_block_m(64 * n_experts, n_experts, False) == 64
    ref = reference.routed_experts(big_x.double(), big_ids, big_w, plain_gate_up.double(), None, plain_down.double(),
                                   None)
    out = fused_experts(big_x, big_ids, big_w, plain_gate_up, None, plain_down, None)
    errors["fused_experts/plain/many_pairs"] = rel_err(out, ref)
    # One token, every expert on this rank: the layout without its kernel (a block per pair).
    one = torch.randperm(n_experts, generator=gen)[:k][None]
    ref = reference.routed_experts(x[:1].double(), one, weights[:1], gate_up, gate_up_scale, down, down_scale)
    out = fused_experts(x[:1], one, weights[:1], gate_up, gate_up_scale, down, down_scale, quantize_activations=False,
                        all_local=True)
    errors["fused_experts/one_token"] = rel_err(out, ref)
    # The shared experts' output added in the weighted sum, after join() (the stream wait) and only then.
    shared, joins = torch.randn(tokens, dim, generator=gen), []
    ref = reference.moe_combine(reference.routed_experts(x.double(), ids, weights, gate_up, gate_up_scale, down,
                                                         down_scale), shared, torch.float64)
    out = fused_experts(x, ids, weights, gate_up, gate_up_scale, down, down_scale, quantize_activations=False,
                        shared=shared, join=lambda: joins.append(1))
    errors["fused_experts/shared"] = rel_err(out, ref)
    errors["fused_experts/shared/join_mismatches"] = float(joins != [1])
    # 16 bits: the SwiGLU product in the first GEMM's epilogue rounds gate, silu and up as silu_mul does.
    x16 = x.half()
    gate_up16, down16 = (torch.randn(w.shape, generator=gen).mul(0.1).half() for w in (gate_up, down))
    ref = reference.routed_experts(x16.double(), ids, weights, gate_up16.double(), None, down16.double(), None)
    errors["fused_experts/float16"] = rel_err(fused_experts(x16, ids, weights, gate_up16, None, down16, None), ref)
    # One 16-bit token, every expert here: each expert's rows as a GEMV (gemv.routed), shared added after join().
    ref = reference.moe_combine(reference.routed_experts(x16[:1].double(), one, weights[:1], gate_up16.double(), None,
                                                         down16.double(), None), shared[:1].half(), torch.float64)
    joins.clear()
    out = fused_experts(x16[:1], one, weights[:1], gate_up16, None, down16, None, all_local=True,
                        shared=shared[:1].half(), join=lambda: joins.append(1))
    errors["fused_experts/one_token_gemv/float16"] = rel_err(out, ref)
    errors["fused_experts/one_token_gemv/join_mismatches"] = float(joins != [1])
    # ... and the shared experts (2 routed experts' worth) inside the same two launches.
    gate, up = (torch.randn(2 * inter, dim, generator=gen).mul(0.1).half() for _ in range(2))
    shared_down = torch.randn(dim, 2 * inter, generator=gen).mul(0.1).half()
    mlp = reference.silu_mul(x16[:1].double() @ gate.double().T, x16[:1].double() @ up.double().T) @ shared_down.double().T
    ref = reference.moe_combine(reference.routed_experts(x16[:1].double(), one, weights[:1], gate_up16.double(), None,
                                                         down16.double(), None), mlp, torch.float64)
    out = fused_experts(x16[:1], one, weights[:1], gate_up16, None, down16, None, all_local=True,
                        shared_mlp=(gate, up, shared_down))
    errors["fused_experts/one_token_gemv/shared_inline/float16"] = rel_err(out, ref)
    errors["fused_experts/one_token_gemv/shared_inline/dtype_mismatches"] = float(out.dtype != torch.float16)
    return errors


def check_expert_sum(gen: torch.Generator) -> dict[str, float]:
    """The grouped path's routed sum: rows in expert order, some pairs on another rank (weight ignored)."""
    from dsv3.kernels.moe import expert_sum

    tokens, k, dim = 9, 3, 1100  # dim > 1024: two column blocks
    order = torch.randperm(tokens * k, generator=gen)
    mine = torch.rand(tokens * k, generator=gen) > 0.25
    weights = torch.rand(tokens, k, generator=gen)
    ys = torch.randn(tokens * k, dim, generator=gen)
    ys[~mine[order]] = float("nan")  # another rank's rows hold garbage: never read
    ref = reference.expert_sum(ys.double(), order, mine, weights.double())
    return {"expert_sum/partly_other_rank": rel_err(expert_sum(ys, order, mine, weights), ref)}


def check_norms_and_elementwise(gen: torch.Generator) -> dict[str, float]:
    from dsv3.kernels import glue

    errors = {}
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(2, 3, 100, generator=gen).to(dtype)
        weight, residual = torch.randn(100, generator=gen).to(dtype), torch.randn(2, 3, 100, generator=gen).to(dtype)
        errors[f"rms_norm/{dtype}"] = rel_err(glue.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
        (normed, summed), (ref_normed, ref_summed) = (f(x, weight, 1e-6, residual) for f in (glue.rms_norm,
                                                                                            reference.rms_norm))
        errors[f"rms_norm/residual/{dtype}/normed"] = rel_err(normed, ref_normed)
        errors[f"rms_norm/residual/{dtype}/sum"] = rel_err(summed, ref_summed)
        rows = torch.randn(5, 48 + 16, generator=gen).to(dtype)[:, :48]                     # strided rows
        errors[f"rms_norm/strided/{dtype}"] = rel_err(glue.rms_norm(rows, weight[:48], 1e-6),
                                                      reference.rms_norm(rows, weight[:48], 1e-6))
        h = torch.randn(7, 2 * 1100, generator=gen).to(dtype)               # gate, up: the halves of one output
        errors[f"silu_mul/{dtype}"] = rel_err(glue.silu_mul(h[:, :1100], h[:, 1100:]),
                                              reference.silu_mul(h[:, :1100], h[:, 1100:]))
        routed = torch.randn(3, 1100, generator=gen)
        errors[f"moe_combine/{dtype}"] = rel_err(glue.moe_combine(routed, h[:3, :1100], dtype),
                                                 reference.moe_combine(routed, h[:3, :1100], dtype))
    return errors


def check_speculation_edges(gen: torch.Generator) -> dict[str, float]:
    """A speculative step's edges, over more than one block of rows: its continuing rows moved (every input
    they change, and nothing else), and its pairs of rows verified into the record."""
    from dsv3.kernels import glue

    n, pairs, width, block_size = 1500, 700, 9, 4
    record = torch.stack([torch.randint(0, 2, (pairs,), generator=gen)] +
                         [torch.randint(0, 1000, (pairs,), generator=gen) for _ in range(3)], dim=1)
    continues = torch.randint(-1, 2 * pairs, (n,), generator=gen).where(torch.rand(n, generator=gen) < 0.7, -1)
    inputs = [torch.randint(0, 1000, (n,), generator=gen), torch.randint(0, width * block_size - 1, (n,), generator=gen),
              torch.randint(0, 4000, (n,), generator=gen), torch.randint(1, 40, (n,), generator=gen, dtype=torch.int32),
              torch.randint(0, 100, (n, width), generator=gen, dtype=torch.int32)]
    kernel, ref = [t.clone() for t in inputs], [t.clone() for t in inputs]
    glue.continue_speculation(*kernel, continues, record, block_size)
    reference.continue_speculation(*ref, continues, record, block_size)
    errors = {f"continue_speculation/{name}/mismatches": float((k != r).sum()) for name, k, r in
              zip(("ids", "positions", "slots", "context_lens", "tables"), kernel, ref)}
    errors["continue_speculation/none_moved/mismatches"] = float(torch.equal(ref[1], inputs[1]))  # (not vacuous)
    ids, tokens = torch.randint(0, 5, (2 * pairs + 3,), generator=gen), torch.randint(0, 5, (2, 2 * pairs + 3), generator=gen)
    out, expected = torch.full((pairs, 4), -7), torch.full((pairs, 4), -7)
    glue.record_speculation(ids, tokens, out)
    reference.record_speculation(ids, tokens, expected)
    errors["record_speculation/mismatches"] = float((out != expected).sum())
    return errors


def check_step_edges(gen: torch.Generator) -> dict[str, float]:
    """The engine step's first and last kernels: pending tokens filled in (over one block of rows), and each
    row's argmax, where ties must give the first column (inside one part, across parts, a row of -inf);
    and the GEMV's float32 out (the LM head's logits), which must be the float32 sums, not rounded to 16 bits."""
    from dsv3.kernels import gemv, glue

    ids, last = torch.randint(0, 1000, (1500,), generator=gen), torch.randint(0, 1000, (40,), generator=gen)
    sources = torch.randint(-20, 40, (1500,), generator=gen).clamp(min=-1)
    errors = {"fill_pending/mismatches": float((glue.fill_pending(ids, sources, last)
                                                != reference.fill_pending(ids, sources, last)).sum())}
    cols = 2 * glue.ARGMAX_BLOCK + 300
    for dtype in (torch.float32, torch.float16):
        x = torch.randint(-50, 3, (6, cols), generator=gen).float()  # few values: ties everywhere
        x[1] = float("-inf")
        x[2, [cols - 1, glue.ARGMAX_BLOCK + 5, 100]] = 9.0           # the same maximum in three parts
        x[3, [40, 7]] = 9.0                                           # twice in one part
        x[4, cols - 1] = 9.0                                          # in the last, partial part
        x = x.to(dtype)
        out = torch.full((6,), -7, dtype=torch.int64)
        written = glue.argmax(x, out) is out
        errors[f"argmax/{dtype}/mismatches"] = float((out != reference.argmax(x)).sum()) + (not written)
    errors.update(check_speculation_edges(gen))
    x, w = torch.randn(3, 300, generator=gen).half(), torch.randn(70, 300, generator=gen).half()
    # The float32 sums themselves (reference.linear_float32): rounded to float16 they would be ~3e-4 away.
    errors["gemv/float32_out/float32"] = rel_err(gemv.linear(x, w, out_dtype=torch.float32),
                                                 x.double() @ w.double().T)
    return errors


def check_gemv(gen: torch.Generator) -> dict[str, float]:
    """The decode GEMV (16-bit only: float16 here) against float32 products: K not a power of two, a bias,
    leading dims, and the absorbed MLA's per-head products on strided views of one kv_b_proj."""
    from dsv3.kernels import gemv

    x, w, b = (torch.randn(*shape, generator=gen).half() for shape in ((3, 300), (70, 300), (70,)))
    errors = {"gemv/linear/float16": rel_err(gemv.linear(x, w, b), torch.nn.functional.linear(x.float(), w.float(),
                                                                                                b.float())),
              "gemv/leading_dims/float16": rel_err(gemv.linear(x[:2].view(1, 2, 300), w),
                                                   (x[:2].float() @ w.float().T).view(1, 2, 70))}
    second = torch.randn(24, 300, generator=gen).half()                          # two matrices, one launch
    pair = gemv.linear_pair(x[:2], w, second)
    errors["gemv/linear_pair/float16"] = rel_err(torch.cat(pair, -1), x[:2].float() @ torch.cat([w, second]).float().T)
    errors["gemv/linear_pair/shapes"] = float([tuple(t.shape) for t in pair] != [(2, 70), (2, 24)])
    # FP8 weights with 128 x 128 block scales: K (300) and N (200) end in partial blocks.
    w8, s8 = reference.fp8_quantize(torch.randn(200, 300, generator=gen))
    errors["gemv/linear/fp8/float16"] = rel_err(gemv.linear(x[:2], w8, scale=s8), reference.fp8_linear(x[:2].float(), w8, s8))
    kv_b = torch.randn(4, 32 + 16, 64, generator=gen).half()                       # (H, nope + v, C)
    q_nope = torch.randn(2, 4, 32 + 8, generator=gen).half()[..., :32]            # a strided view, as in the model
    w_uk, w_uv = kv_b[:, :32], kv_b[:, 32:]
    errors["gemv/per_head/w_uk/float16"] = rel_err(gemv.per_head(q_nope, w_uk.transpose(1, 2)),
                                                   reference.per_head(q_nope.float(), w_uk.float().transpose(1, 2)))
    latent = torch.randn(2, 4, 64, generator=gen).half()
    errors["gemv/per_head/w_uv/float16"] = rel_err(gemv.per_head(latent, w_uv),
                                                   reference.per_head(latent.float(), w_uv.float()))
    # Routed experts of one token (K not a power of two): ids pick the weights, SwiGLU rounds as silu_mul.
    experts = torch.randn(5, 2 * 24, 300, generator=gen).half()
    ids = torch.tensor([3, 0, 4])
    act = gemv.routed(x[:1], ids, experts, swiglu=True)
    gate, up = (x[:1].float() @ experts[ids].float().transpose(1, 2)).half().chunk(2, dim=-1)
    errors["gemv/routed/swiglu/float16"] = rel_err(act, reference.silu_mul(gate, up).view(3, 24))
    down = torch.randn(5, 70, 24, generator=gen).half()
    errors["gemv/routed/rows/float16"] = rel_err(gemv.routed(act, ids, down),
                                                 (act.float()[:, None] @ down[ids].float().transpose(1, 2))[:, 0])
    # FP8 experts (gate and up rows 2 x 136: the up rows start inside a scale block), then their down rows.
    e8, es8 = reference.fp8_quantize(torch.randn(5, 2 * 136, 300, generator=gen))
    act8 = gemv.routed(x[:1], ids, e8, swiglu=True, scale=es8)
    gate, up = (x[:1].float() @ reference.fp8_dequantize(e8[ids], es8[ids], torch.float32).transpose(1, 2)
                ).half().chunk(2, dim=-1)
    errors["gemv/routed/swiglu/fp8/float16"] = rel_err(act8, reference.silu_mul(gate, up).view(3, 136))
    d8, ds8 = reference.fp8_quantize(torch.randn(5, 70, 136, generator=gen))
    errors["gemv/routed/rows/fp8/float16"] = rel_err(gemv.routed(act8, ids, d8, scale=ds8),
                                             (act8.float()[:, None] @ reference.fp8_dequantize(
                                                 d8[ids], ds8[ids], torch.float32).transpose(1, 2))[:, 0])
    return errors


def check_mla_rope_and_cache(gen: torch.Generator) -> dict[str, float]:
    from dsv3.kernels import glue

    errors = {}
    cases = [  # tokens, heads, kv_lora_rank, rope, dtype (40 heads: three programs a token, the last part-full)
        (4, 3, 32, 16, torch.float32), (3, 40, 64, 128, torch.float32), (5, 4, 32, 16, torch.float16)]
    for tokens, heads, c, r, dtype in cases:
        for interleaved in (True, False):
            name = f"mla_rope_and_cache/{tokens}x{heads}x{c}+{r}/{dtype}/interleaved={interleaved}"
            q_pe = torch.randn(tokens, heads, 32 + r, generator=gen).to(dtype)[..., 32:]    # q's rope slice
            kv = torch.randn(tokens, c + r, generator=gen).to(dtype)
            rope = torch.polar(torch.rand(tokens, r // 2, generator=gen) + 0.5,
                               torch.randn(tokens, r // 2, generator=gen))
            weight = torch.randn(c, generator=gen).to(dtype)
            cache = torch.randn(6, 4, c + r, generator=gen).to(dtype)
            ref_cache = cache.clone()
            slots = torch.randperm(24, generator=gen)[:tokens]
            out = glue.mla_rope_and_cache(q_pe, kv, rope, weight, 1e-6, cache, slots, interleaved)
            ref = reference.mla_rope_and_cache(q_pe, kv, rope, weight, 1e-6, ref_cache, slots, interleaved)
            errors[f"{name}/q_pe"] = rel_err(out, ref)
            errors[f"{name}/cache"] = rel_err(cache, ref_cache)
    return errors


def check_route(gen: torch.Generator) -> dict[str, float]:
    from dsv3.kernels import glue

    errors = {}
    cases = [  # experts, n_group, topk_group, top_k, norm_topk_prob
        (8, 4, 2, 3, True),         # tests' tiny config
        (64, 1, 1, 6, True),        # Moonlight
        (64, 1, 1, 6, False),
        (256, 8, 4, 8, True),       # DeepSeek-V3
        (16, 8, 3, 4, False),       # two experts a group
        (160, 8, 3, 6, True),       # 20 experts a group: not a power of two
    ]
    for experts, n_group, topk_group, top_k, norm in cases:
        for tokens, dtype in ((3, torch.float32), (40, torch.float32), (5, torch.float16)):
            name = f"route/E={experts}/groups={n_group}:{topk_group}/k={top_k}/norm={norm}/{tokens}x{dtype}"
            dim = 96 if tokens > 16 else 640  # decode-sized batches split K: 640 columns in two partial sums
            x = torch.randn(tokens, dim, generator=gen).to(dtype)
            weight = (torch.randn(experts, dim, generator=gen) * 0.1).to(dtype)
            bias = torch.randn(experts, generator=gen) * 0.1
            args = (top_k, n_group, topk_group, norm, 2.5)
            weights, ids, scores = glue.route(x, weight, bias, *args)
            ref_weights, ref_ids, ref_scores = reference.route(x, weight, bias, *args)
            errors[f"{name}/weights"] = rel_err(weights, ref_weights)
            errors[f"{name}/scores"] = rel_err(scores, ref_scores)
            errors[f"{name}/ids_mismatches"] = float((ids != ref_ids).sum())
    x, bias = torch.randn(4, 96, generator=gen), torch.zeros(64)
    weight = (torch.randn(64, 96, generator=gen) * 0.1).half()
    weights, ids, _ = glue.route(x, weight, bias, 6, 1, 1, True, 1.0)                       # float32 x, fp16 W
    ref_weights, ref_ids, _ = reference.route(x, weight, bias, 6, 1, 1, True, 1.0)
    errors["route/mixed_dtypes/weights"] = rel_err(weights, ref_weights)
    errors["route/mixed_dtypes/ids_mismatches"] = float((ids != ref_ids).sum())
    return errors


def check_expert_blocks(gen: torch.Generator) -> dict[str, float]:
    from dsv3.kernels.moe import expert_blocks

    errors = {}
    for pairs, experts, block_m, k in [(18, 6, 16, 3), (6, 64, 16, 6), (300, 64, 16, 6), (1000, 256, 64, 8),
                                       (40, 10, 16, 4), (5000, 64, 64, 6), (8000, 256, 16, 8), (0, 64, 16, 6)]:
        ids = torch.randint(-1, experts + 2, (pairs,), generator=gen)          # -1 and >= experts: other ranks
        got = expert_blocks(ids, experts, block_m, k)
        ref = reference.expert_blocks(ids, experts, block_m, k)
        errors[f"expert_blocks/{pairs}x{experts}/block_m={block_m}/mismatches"] = float(
            sum((a != b).sum() if a.shape == b.shape else a.numel() + b.numel() for a, b in zip(got, ref)))
    return errors


def check_paged_model(gen: torch.Generator) -> dict[str, float]:
    """A paged prefill then a decode step of tiny models with dispatch told that the CPU is fast, against the
    reference path: the kernels as the model calls them (float32, so the experts take the grouped GEMM)."""
    from helpers import random_bias, tiny_config

    from dsv3.config import ModelConfig
    from dsv3.kernels import dispatch
    from dsv3.model import DeepseekV3ForCausalLM, PagedBatch, init_weights

    block_size, tables = 4, torch.randperm(8, generator=gen)[:6].view(2, 3).int()
    ids = torch.randint(0, 256, (16,), generator=gen)

    def slots(seq: int, positions) -> list[int]:
        return [int(tables[seq, p // block_size]) * block_size + p % block_size for p in positions]

    def run(model, caches, fast: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Two sequences of 5 and 9 prompt tokens, then one new token each, then a rows-mode step: the first
        sequence's next token, the second's next two, and a fresh 3-token prompt in block 8 (expanded)."""
        prefill = PagedBatch([0, 5, 14], torch.tensor([5, 9], dtype=torch.int32), tables,
                             torch.tensor(slots(0, range(5)) + slots(1, range(9))), caches)
        decode = PagedBatch([0, 1, 2], torch.tensor([6, 10], dtype=torch.int32), tables,
                            torch.tensor(slots(0, [5]) + slots(1, [9])), caches, decode_only=True)
        third = torch.tensor([[8, 8, 8]], dtype=tables.dtype)
        rows = PagedBatch(list(range(7)), torch.tensor([7, 11, 12, 1, 2, 3], dtype=torch.int32),
                          torch.cat([tables[[0, 1, 1]], third.expand(3, -1)]),
                          torch.tensor(slots(0, [6]) + slots(1, [10, 11]) + [32, 33, 34]), caches, decode_only=True,
                          first_rows=torch.tensor([0, 1, 1, 3, 3, 3], dtype=torch.int32))
        use_fast = dispatch.use_fast
        if fast:
            dispatch.use_fast = lambda t: not (t.requires_grad and torch.is_grad_enabled())
        try:
            with torch.no_grad():
                return (model.model(ids[:14], torch.tensor([*range(5), *range(9)]), prefill),
                        model.model(ids[14:], torch.tensor([5, 9]), decode),
                        model.model(ids[1:7], torch.tensor([6, 10, 11, 0, 1, 2]), rows))
        finally:
            dispatch.use_fast = use_fast

    errors = {}
    configs = {"base": {}, "moonlight_like": {"q_lora_rank": None, "n_group": 1, "topk_group": 1,
                                              "num_experts_per_tok": 2, "norm_topk_prob": False,
                                              "rope_interleave": False}}
    for name, overrides in configs.items():
        cfg = ModelConfig.from_dict(tiny_config(**overrides))
        torch.manual_seed(0)
        model = DeepseekV3ForCausalLM(cfg, dtype=torch.float32).eval()
        init_weights(model, 0.2)
        random_bias(model)
        caches = [torch.zeros(9, block_size, cfg.latent_dim) for _ in model.model.layers]
        ref_caches = [c.clone() for c in caches]
        ref, out = run(model, ref_caches, fast=False), run(model, caches, fast=True)
        errors[f"paged_model/{name}/prefill"] = rel_err(out[0], ref[0])
        errors[f"paged_model/{name}/decode"] = rel_err(out[1], ref[1])
        errors[f"paged_model/{name}/rows_expanded"] = rel_err(out[2], ref[2])
        errors[f"paged_model/{name}/cache"] = rel_err(torch.stack(caches), torch.stack(ref_caches))
    def one_token(model: DeepseekV3ForCausalLM) -> list[torch.Tensor]:
        """One float16 sequence's 5-token prefill (reference path), then its decode step on the reference path and
        on the fast one, from the same cache."""
        outs, use_fast = [], dispatch.use_fast
        try:
            for fast in (False, True):
                caches = [torch.zeros(8, block_size, model.config.latent_dim, dtype=torch.float16)
                          for _ in model.model.layers]
                prefill = PagedBatch([0, 5], torch.tensor([5], dtype=torch.int32), tables[:1],
                                     torch.tensor(slots(0, range(5))), caches)
                decode = PagedBatch([0, 1], torch.tensor([6], dtype=torch.int32), tables[:1],
                                    torch.tensor(slots(0, [5])), caches, decode_only=True)
                with torch.no_grad():
                    model.model(ids[:5], torch.arange(5), prefill)
                    if fast:
                        dispatch.use_fast = lambda t: not (t.requires_grad and torch.is_grad_enabled())
                    outs.append(model.model(ids[5:6], torch.tensor([5]), decode))
        finally:
            dispatch.use_fast = use_fast
        return outs

    def float16_model(**overrides) -> DeepseekV3ForCausalLM:
        torch.manual_seed(0)
        model = DeepseekV3ForCausalLM(ModelConfig.from_dict(tiny_config(**configs["moonlight_like"], **overrides)),
                                      dtype=torch.float16).eval()
        init_weights(model, 0.2)
        random_bias(model)
        return model

    # One sequence in float16: its decode step takes the one-token expert GEMVs with the shared experts inside.
    # Three float16 layers part from the float16 reference by ~2e-3 with or without them inside (bound 5e-3); a
    # wrong sum would be off by far more (the kernel itself is checked in check_fused_experts).
    from dsv3.kernels import gemv
    model = float16_model(n_shared_experts=2)
    inline, routed, linear = [], gemv.routed, gemv.linear
    gemv.routed = lambda *args, extra=None, **kw: (inline.append(extra is not None), routed(*args, extra=extra, **kw))[1]
    try:
        outs = one_token(model)
    finally:
        gemv.routed = routed
    errors["paged_model/one_token/float16/decode"] = rel_err(outs[1], outs[0])
    # each MoE layer's two expert GEMVs ran with the shared experts inside
    layers = model.config.num_hidden_layers
    errors["paged_model/one_token/shared_inline_mismatches"] = float(inline != [True] * 2 * (layers - 1))
    # The same in FP8 with 16 x 16 block scales: every linear and the routed experts take the FP8 GEMV (the weights
    # dequantized in float32 in its registers; the reference rounds them to float16 first).
    model = float16_model(quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                               "weight_block_size": [16, 16]})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype == torch.float8_e4m3fn:
                p.copy_(torch.randn(p.shape, generator=gen).clamp(-8, 8).to(p.dtype))
            elif name.endswith("scale_inv"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.05 + 0.025)
    scaled = []
    gemv.routed = lambda *args, scale=None, **kw: (scaled.append(scale is not None), routed(*args, scale=scale, **kw))[1]
    gemv.linear = lambda *args, scale=None, **kw: (scaled.append(scale is not None), linear(*args, scale=scale, **kw))[1]
    try:
        outs = one_token(model)
    finally:
        gemv.routed, gemv.linear = routed, linear
    errors["paged_model/fp8/one_token/float16/decode"] = rel_err(outs[1], outs[0])
    # Each layer's q_proj, kv_a_proj and o_proj and its dense MLP's or shared experts' three linears, and each MoE
    # layer's two routed GEMVs, all with scales.
    errors["paged_model/fp8/one_token/gemv_call_mismatches"] = float(scaled != [True] * (6 * layers + 2 * (layers - 1)))
    return errors


def run_checks() -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    return {**check_mla_decode(gen), **check_prompt_attention(gen), **check_fp8_gemm(gen), **check_fused_experts(gen), **check_expert_sum(gen),
            **check_norms_and_elementwise(gen), **check_gemv(gen), **check_mla_rope_and_cache(gen), **check_route(gen),
            **check_expert_blocks(gen), **check_paged_model(gen), **check_step_edges(gen)}


# ---- the tests ---------------------------------------------------------------------------------------

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install triton): the kernels are not checked")


@pytest.fixture(scope="module")
def interpreted() -> dict[str, float]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# float32 throughout, except the float16 inputs (one rounding of q, p and the output; for the glue, a
# float32 difference that tips a rounding to float16 now and then). Chosen experts and layouts are exact.
BOUNDS = {"one_token/float16": 5e-3, "float16": 2e-3, "empty_context_abs": 0.0, "mismatches": 0.0}


@needs_triton
@pytest.mark.parametrize("kernel", ["mla_decode", "prompt_attention", "fp8_linear", "fp8_dequantize", "fused_experts", "expert_sum", "rms_norm",
                                    "silu_mul", "moe_combine", "gemv", "mla_rope_and_cache", "route", "expert_blocks",
                                    "paged_model", "fill_pending", "argmax", "continue_speculation",
                                    "record_speculation"])
def test_triton_kernel_matches_reference(interpreted, kernel):
    checked = {name: err for name, err in interpreted.items() if name.startswith(kernel + "/")}
    assert checked
    for name, err in checked.items():
        bound = next((b for key, b in BOUNDS.items() if key in name), 1e-5)
        print(f"{name}: {err:.2e} (bound {bound:.0e})")
        assert err <= bound, f"{name}: distance to the reference {err:.2e} > {bound:.0e}"


def sm90_cases():
    """(kernel, its pointer arguments' element types, its float arguments, constexprs) at the model's shapes."""
    from dsv3.kernels import fp8_gemm, gemv, glue, mla_decode, mla_prompt, moe

    bf16 = dict.fromkeys(["x", "residual", "weight", "out", "summed"], "bf16")
    cases = [
        (glue._rms_norm, bf16, {"eps"}, {"HAS_RESIDUAL": True, "BLOCK": 8192}),
        *((glue._mla_rope_and_cache, {**dict.fromkeys(["q_pe", "kv", "norm_weight", "cache", "q_out"], "bf16"),
                                      "rope": "fp32", "slot_mapping": "i64"}, {"eps"},
           {"C": 512, "HALF": 32, "BLOCK_C": 512, "BLOCK_HALF": 32, "BLOCK_H": 16, "INTERLEAVED": interleaved})
          for interleaved in (True, False)),
        *((glue._router_logits, {"x": x, "weight": "bf16", "logits": "fp32"}, set(),
           {"UPCAST": x != "bf16", "BLOCK_M": block, "BLOCK_E": block, "BLOCK_K": 256 if one else 64, "ONE_TILE": one})
          for x, block, one in (("bf16", 16, True), ("bf16", 64, False), ("fp32", 16, False))),
        *((glue._route, dict.fromkeys(["logits", "bias", "scores", "weights"], "fp32") | {"ids": "i64"}, {"scaling"},
           {"SPLITS": 8, "GROUPS": g, "PER_GROUP": e // g, "TOPK_GROUP": tg, "TOP_K": k, "NORM": True, "G_POW2": g,
            "PER_POW2": e // g, "K_POW2": 8}) for e, g, tg, k in ((64, 1, 1, 6), (256, 8, 4, 8))),
        (glue._silu_mul, dict.fromkeys(["gate", "up", "out"], "bf16"), set(), {"BLOCK": 1024}),
        (glue._moe_combine, {"routed": "fp32", "shared": "bf16", "out": "bf16"}, set(), {"BLOCK": 1024}),
        (glue._fill_pending, dict.fromkeys(["ids", "sources", "last", "out"], "i64"), set(), {"BLOCK": 1024}),
        (glue._continue_speculation, {**dict.fromkeys(["ids", "positions", "slots", "continues", "record"], "i64"),
                                      **dict.fromkeys(["context_lens", "tables"], "i32")}, set(), {"BLOCK": 1024}),
        (glue._record_speculation, dict.fromkeys(["ids", "tokens", "record"], "i64"), set(), {"BLOCK": 1024}),
        (glue._argmax_parts, {"x": "fp32", "values": "fp32", "indices": "i64"}, set(), {"BLOCK": glue.ARGMAX_BLOCK}),
        (glue._argmax_rows, {"values": "fp32", "indices": "i64", "out": "i64"}, set(), {"PARTS_POW2": 128}),
        (moe._expert_counts, {"ids": "i64", "counts": "i32", "token_at": "i64", "row_at": "i64"}, set(),
         {"E_POW2": 256, "BLOCK": 16}),
        (moe._expert_rows, {**dict.fromkeys(["ids", "token_at", "row_at", "block_expert", "row_of_pair"], "i64"),
                            "counts": "i32"}, set(), {"BLOCK_M": 16, "E_POW2": 256, "C_POW2": 64, "BLOCK": 16}),
        *((moe._weighted_sum, {"y": "bf16", "row_of_pair": "i64", "weights": "fp32", "shared": "bf16", "out": out},
           set(), {"K": 8, "HAS_SHARED": out == "bf16", "EXTRA": extra, "ROWS_IN_ORDER": extra > 0, "BLOCK": 1024})
          for out, extra in (("fp32", 0), ("bf16", 0), ("bf16", 2))),
        *((fp8_gemm._block_scaled_matmul, {"a": "bf16", "b": b, "b_scale": "fp32", "c": "bf16", "a_rows": "i64",
                                           "block_group": "i64"}, set(),
           {"HAS_SCALE": b == "fp8e4nv", "QUANTIZE_A": b == "fp8e4nv", "GATHER": True, "SWIGLU": True, "BLOCK_M": 16,
            "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}) for b in ("bf16", "fp8e4nv")),
        # The deterministic mode's fixed launch (fp8_gemm.FIXED_CONFIG): plain rows, logits written in float32.
        *((fp8_gemm._block_scaled_matmul, {"a": "bf16", "b": b, "b_scale": "fp32", "c": c, "a_rows": "i64",
                                           "block_group": "i64"}, set(),
           {"HAS_SCALE": b == "fp8e4nv", "QUANTIZE_A": b == "fp8e4nv", "GATHER": False, "SWIGLU": False,
            "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 8, "SPLIT_K": splits})
          for b, c, splits in (("bf16", "fp32", 1), ("fp8e4nv", "bf16", 1), ("bf16", "fp32", 2), ("fp8e4nv", "fp32", 4))),
        (fp8_gemm._sum_splits, {"part": "fp32", "out": "bf16"}, set(), {"SPLITS": 4, "BLOCK": 1024}),
        *((gemv._gemv, {**dict.fromkeys(["bias", "out"], "bf16"), "x": x, "lse": "fp32", "ids": "i64",
                        **dict.fromkeys(["w", "extra", "extra_up", "second"], "bf16" if scaled == 0 else "fp8e4nv"),
                        "scale": "fp32"}, set(),
           {"HAS_BIAS": False, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLITS_POW2": splits, "ROUTED": routed,
            "SWIGLU": swiglu, "PAIR": pair, "SCALE_N": scaled, "SCALE_K": 128})
          for x, splits, routed, swiglu, pair, scaled, block_n, block_k in (
              ("bf16", 0, False, False, False, 0, 4, 2048), ("fp32", 8, False, False, False, 0, 4, 512),
              ("bf16", 0, True, True, False, 0, 2, 2048), ("bf16", 0, True, False, False, 0, 4, 2048),
              ("bf16", 0, False, False, True, 0, 4, 2048),
              # FP8 at DeepSeek-V3's shapes: o_proj (16384 columns), the experts' gate and up, and down.
              ("bf16", 0, False, False, False, 128, 2, 16384), ("bf16", 0, True, True, False, 128, 2, 8192),
              ("bf16", 0, True, False, False, 128, 16, 2048))),
        (fp8_gemm._quantize_rows, {"x": "bf16", "q": "fp8e4nv", "scale": "fp32"}, set(), {}),
        *((mla_decode._mla_decode_split, {**dict.fromkeys(["q_latent", "q_rope", "cache"], "bf16"), "out": "fp32",
                                          "lse": "fp32", "block_tables": "i32", "context_lens": "i32"},
           {"softmax_scale"}, {"C": 512, "R": 64, "BLOCK_H": block_h, "BLOCK_N": block_n, "SPLIT": True,
                               "EARLY_TILE": early})
          for block_h, early, block_n in ((16, True, 64), (16, False, 32), (16, False, 64), (64, False, 32))),
        (mla_prompt._prompt_attention, {**dict.fromkeys(["q_nope", "q_pe", "k_nope", "k_pe", "v", "out"], "bf16"),
                                        "first_rows": "i32", "fresh": "i1"},
         {"softmax_scale"}, {"NOPE": 128, "ROPE": 64, "V": 128, "BLOCK_M": 64, "BLOCK_N": 64}),
        (mla_decode._mla_decode_merge, {"partial": "fp32", "lse": "fp32", "out": "bf16"}, set(),
         {"C": 512, "SPLITS_POW2": 8}),
    ]
    # Each with programmatic dependent launch's instructions (pdl.py), as the engine launches them on an H100.
    return [(kernel, pointers, floats, {**constexprs, "USE_GDC": True})
            for kernel, pointers, floats, constexprs in cases]


@needs_triton
def test_glue_kernels_compile_for_h100():
    """The interpreter runs some programs the compiler refuses (a loop variable that changes shape, say):
    compile each glue kernel for sm_90, which needs no GPU."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip("this Triton's ASTSource takes constants in an older form")
    for kernel, pointers, floats, constexprs in sm90_cases():
        signature = {name: "constexpr" if name in constexprs else "*" + pointers[name] if name in pointers
                     else "fp32" if name in floats else "i32" for name in kernel.arg_names}
        triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))


def test_dispatch_takes_the_reference_on_cpu():
    from dsv3.kernels import dispatch

    gen = torch.Generator().manual_seed(1)
    cache, tables, ctx = paged_cache(gen, [9, 30], 8, 48, torch.float32)
    q_latent, q_rope = torch.randn(2, 4, 32, generator=gen), torch.randn(2, 4, 16, generator=gen)
    assert torch.equal(dispatch.mla_decode(q_latent, q_rope, cache, tables, ctx, 32, 0.2),
                       reference.mla_decode(q_latent, q_rope, cache, tables, ctx, 32, 0.2))
    x, residual, weight = torch.randn(3, 64, generator=gen), torch.randn(3, 64, generator=gen), torch.randn(64)
    for got, ref in zip(dispatch.rms_norm(x, weight, 1e-6, residual), reference.rms_norm(x, weight, 1e-6, residual)):
        assert torch.equal(got, ref)
    gate, bias = torch.randn(8, 64, generator=gen), torch.randn(8, generator=gen)
    args = (x, gate, bias, 3, 4, 2, True, 2.5)
    for got, ref in zip(dispatch.route(*args), reference.route(*args)):
        assert torch.equal(got, ref)
    assert not dispatch.use_triton(q_latent)


def test_lm_head_logits_are_float32_sums():
    """bf16 hidden states and head, as the engine runs them: the logits are summed and returned in float32, never
    rounded to bf16 in between (that rounding flipped 0.8% of the embedded model's greedy tokens against float32's,
    bench/accuracy.py). Without a GPU: reference.linear_float32."""
    from dsv3.kernels import dispatch
    from dsv3.model.layers import ParallelLMHead

    gen = torch.Generator().manual_seed(3)
    head = ParallelLMHead(256, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_(torch.randn(512, 256, generator=gen) * 0.5)
    x = torch.randn(2, 5, 256, generator=gen).bfloat16()
    exact = x.double() @ head.weight.double().T
    logits = head(x)
    assert logits.dtype == torch.float32 and logits.shape == (2, 5, 512)
    rounded = rel_err(exact.bfloat16(), exact)                                 # ~2e-3: bf16's half ulp
    assert rel_err(logits, exact) < rounded / 100, (rel_err(logits, exact), rounded)
    with pytest.raises(ValueError, match="out_dtype"):
        dispatch.linear(x, head.weight, out_dtype=torch.float16)


def test_dispatch_rejects_unknown_kernel_choice(monkeypatch):
    from dsv3.kernels import dispatch

    monkeypatch.setenv("DSV3_KERNELS", "fast")
    with pytest.raises(ValueError, match="DSV3_KERNELS"):
        dispatch.KernelOptions.from_env()
    monkeypatch.setenv("DSV3_KERNELS", "reference")
    assert dispatch.KernelOptions.from_env().kernels == "reference"
    before = dispatch.configure(kernels="reference")  # read once: later changes to the environment do nothing
    try:
        assert dispatch.OPTIONS.kernels == "reference" and not dispatch.use_fast(torch.zeros(1))
    finally:
        dispatch.configure(**dataclasses.asdict(before))


def test_dispatch_imports_without_triton():
    code = ("import importlib.util as u; find = u.find_spec; "
            "u.find_spec = lambda name, *a: None if name == 'triton' else find(name, *a); "
            "from dsv3.kernels import dispatch; import sys; "
            "assert dispatch.fp8_gemm is None and 'triton' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_scaled_mm_path_pads_quantizes_and_lays_out_scales(monkeypatch):
    """torch._scaled_mm's blockwise FP8 GEMM runs only on sm90; here a stand-in with the layout it was
    measured with (bench/kernels.py) checks the padding, the activation scales and their layout."""
    from dsv3.kernels import scaled_mm

    def blockwise_scaled_mm(a, b, scale_a, scale_b, out_dtype):
        (m, k), n = a.shape, b.shape[1]
        assert a.dtype == b.dtype == torch.float8_e4m3fn and m % scaled_mm.ROW_MULTIPLE == 0
        assert scale_a.shape == (m, k // 128) and scale_a.stride(0) == 1          # column-major, 1x128 blocks
        assert scale_b.shape == (k // 128, n // 128) and b.stride(0) == 1          # W^T of a row-major W
        a = a.float() * scale_a.repeat_interleave(128, 1)
        b = b.float() * scale_b.repeat_interleave(128, 0).repeat_interleave(128, 1)
        return (a @ b).to(out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", blockwise_scaled_mm)
    gen = torch.Generator().manual_seed(2)
    weight, scale = reference.fp8_quantize(torch.randn(256, 512, generator=gen) * 0.1)
    x = torch.randn(2, 3, 512, generator=gen)
    xq, xs = reference.fp8_quantize(x.flatten(0, 1), block=(1, 128))
    ref = reference.fp8_dequantize(xq, xs, torch.float32) @ reference.fp8_dequantize(weight, scale, torch.float32).T
    torch.testing.assert_close(scaled_mm.fp8_linear(x, weight, scale), ref.view(2, 3, 256))
    assert not scaled_mm.supported(x, weight, scale)                               # CPU: the Triton or reference path


def test_routed_experts_reference_matches_the_model():
    """The fused kernel is checked against reference.routed_experts; this ties that definition to Experts."""
    from dsv3.config import ModelConfig
    from dsv3.model.moe import Experts

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3)
    experts = Experts(cfg, dtype=torch.float32)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(10, 64)
    ids = torch.stack([torch.randperm(8)[:3] for _ in range(10)])
    weights = torch.rand(10, 3)
    ref = reference.routed_experts(x, ids, weights, experts.gate_up_proj, None, experts.down_proj, None)
    torch.testing.assert_close(experts(x, ids, weights), ref, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    print(json.dumps(run_checks()))


def test_split_k_takes_plain_rows_only():
    pytest.importorskip("triton")
    from dsv3.kernels import fp8_gemm

    x, w = torch.randn(3, 2, 64), torch.randn(2, 8, 64)
    with pytest.raises(ValueError, match="split_k takes plain rows"):
        fp8_gemm.block_scaled_matmul(x, w, None, 3, config=fp8_gemm.FIXED_CONFIG, heads=True, split_k=2)
    assert fp8_gemm.fixed_splits(7168, 16384) == 2 and fp8_gemm.fixed_splits(129280, 7168) == 1
