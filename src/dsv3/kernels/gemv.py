"""y = x W^T for a few rows of x (decode), 16-bit weights (Triton); F.linear defines it. FP8 weights with their
block scales too (reference.fp8_linear defines that): held as FP8 across the wait, dequantized in registers.

At batch 1 every projection of a decode step is a stream of weight bytes, and the chain of them is
latency-bound: a 2-12 MB GEMV costs ~6 us in cuBLAS or a tiled Triton GEMM, of which ~1-4 us moves
bytes (`bench/tune_decode.py --dense`). This kernel is built to overlap that latency instead: each
program loads its whole slice of W (BLOCK_N rows, all of K) before it waits for the kernel ahead of
it to finish (programmatic dependent launch, `pdl.py`), so the weight reads of the next projection run
while the previous kernel's tail does. Each row of x is reduced in float32, independently of the others.

The same kernel runs one token's routed experts (`routed`: each group's weights are the expert the router
chose, so they load after the wait), with the shared experts as more groups of the same launch (`Extra`),
whose weights do load before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dsv3.kernels import pdl, reference

# Above this, cuBLAS: moonlight-16b decode on an H100 tied at batch 2 and lost at 4 (5.9 ms a step against 5.35).
MAX_ROWS = 2
TILE_ELEMENTS = 8192     # weight elements a program holds: 16 KB of bf16 over NUM_WARPS warps
NUM_WARPS = 4
FP8 = torch.float8_e4m3fn
# FP8: 32 KB held as loaded, over 8 warps, so that every DeepSeek-V3 shape gets 2 rows a program or more. One row a
# program ran the experts' gate and up at 0.47 TB/s (497 us for 8 experts, 2 rows each of 7168 columns) against 3.04
# with two (H100, bench/results/*-fp8-gemv-tiles-26b817c.txt); o_proj (16384 columns) 2.70 against 2.95.
FP8_TILE_ELEMENTS = 32768


@triton.jit
def _merged_row(partial, lse, num_splits, k, K, stride_ps, SPLITS_POW2: tl.constexpr):
    """One (token, head) of the split MLA decode merged as mla_decode._mla_decode_merge merges it:
    sum_s 2^(lse_s - max) partial_s / sum_s 2^(lse_s - max), in float32."""
    splits = tl.arange(0, SPLITS_POW2)
    lses = tl.load(lse + splits, mask=splits < num_splits, other=float("-inf"))
    top = tl.max(lses, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.exp2(lses - top)
    acc = tl.zeros([k.shape[0]], tl.float32)
    used = tl.sum((lses > float("-inf")).to(tl.int32), 0)             # the splits with tokens come first
    # Four partial rows a turn, their loads issued together (one at a time, each waited for its load: ~0.4 us a
    # split). In split order, as before: a split past the last adds exactly 0.
    for s0 in range(0, used, 4):
        for j in tl.static_range(4):
            s = s0 + j
            w = tl.sum(tl.where(splits == s, weights, 0.0), 0)
            acc += w * tl.load(partial + s * stride_ps + k, mask=tl.where(s < used, k < K, False), other=0.0)
    total = tl.sum(weights, 0)
    return acc / tl.where(total > 0, total, 1.0)


@triton.jit
def _scaled_dot(w, scales, xv, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_K: tl.constexpr):
    """Rows of FP8 w (BLOCK_N, BLOCK_K) times xv, each block of SCALE_K columns summed, then scaled."""
    prod = tl.reshape(w.to(tl.float32) * xv[None, :], (BLOCK_N, BLOCK_K // SCALE_K, SCALE_K))
    return tl.sum(tl.sum(prod, 2) * scales, 1)


@triton.jit
def _gemv(x, w, bias, out, ids, M, N, K, stride_xm, stride_xg, stride_wg, stride_wn, stride_wk, stride_om, stride_og,
          lse, num_splits, stride_xs, stride_lm, stride_lg, extra, extra_up, routed_groups, extra_groups, stride_ej,
          stride_en, second, first_blocks, N2, stride_2n, scale, stride_sg, stride_sn, stride_sk,
          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS_POW2: tl.constexpr,
          ROUTED: tl.constexpr, SWIGLU: tl.constexpr, PAIR: tl.constexpr, SCALE_N: tl.constexpr,
          SCALE_K: tl.constexpr, USE_GDC: tl.constexpr):
    """out[m, g, n] = sum_k x[m, g, k] w[g, n, k] (+ bias[n]); program (i, g) makes columns i*BLOCK_N... of group g.
    SPLITS_POW2 > 0: x[m, g] is the merge of num_splits partial rows x[m, g, s] by their log-sum-exps
    lse[m, g, s], rounded to out's dtype as the merge kernel would store it.
    ROUTED: group g < routed_groups takes the weights w[ids[g]] (an expert the router chose), so they load
    after the wait; group routed_groups + j takes extra + j * stride_ej, rows stride_en apart (and its up
    rows from extra_up): the shared experts, as more experts of the same launch. Their programs come first
    in the grid and load their weights before the wait, while the kernels ahead finish.
    SWIGLU: w[.] holds gate rows then up rows (2N of them) and out = silu(gate) * up, each rounded to out's
    dtype first, as fp8_gemm's SWIGLU epilogue and reference.silu_mul round them.
    PAIR (one group, no bias): a second matrix `second` (N2 rows stride_2n apart) after w: programs from
    first_blocks on make its rows, into out's columns N... (two projections of the same x, one launch).
    SCALE_N > 0: w is FP8 e4m3 with one float32 scale a SCALE_N x SCALE_K block (scale[g or expert, n // SCALE_N,
    k // SCALE_K], strides stride_s*): each row's products summed per block of SCALE_K columns, times that
    block's scale (the weights dequantized in float32, activations kept in 16 bits: reference.fp8_linear's
    function). The FP8 tile is held as loaded across the wait: half the registers of a 16-bit one."""
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    one = tl.full([], 1, tl.int64)
    g = tl.program_id(1).to(tl.int64)
    if ROUTED:
        if g < extra_groups:                                    # grid order: the shared experts first
            base = extra + g * stride_ej
            up_base = extra_up + g * stride_ej
            row = stride_en * one
            scale_base = scale                                  # (16-bit only)
            g = routed_groups + g                               # their rows come after the routed ones
        else:
            g = g - extra_groups
            if USE_GDC:
                tl.extra.cuda.gdc_wait()                        # ids are the router's output
            expert = tl.load(ids + g).to(tl.int64)
            base = w + expert * stride_wg
            up_base = base + N * stride_wn
            row = stride_wn * one
            scale_base = scale + expert * stride_sg
    else:
        base = w + g * stride_wg
        up_base = base + N * stride_wn
        row = stride_wn * one
        scale_base = scale + g * stride_sg
    block, rows, col0 = tl.program_id(0), N, 0 * N
    if PAIR:
        if block >= first_blocks:                               # a row of the second matrix
            base = second
            row = stride_2n * one
            block, rows, col0 = block - first_blocks, N2, N
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    n_ok = n < rows
    offsets = n.to(tl.int64)[:, None] * row + k[None, :] * stride_wk
    w_ok = n_ok[:, None] & (k < K)[None, :]
    wt = tl.load(base + offsets, mask=w_ok, other=0.0)      # before the wait (a routed group's: after)
    if SWIGLU:
        wu = tl.load(up_base + offsets, mask=w_ok, other=0.0)
    if SCALE_N > 0:                                           # (BLOCK_N, BLOCK_K // SCALE_K) scales
        kb = tl.arange(0, BLOCK_K // SCALE_K)
        kb_ok = (kb < tl.cdiv(K, SCALE_K))[None, :]
        st = tl.load(scale_base + (n // SCALE_N)[:, None] * stride_sn + kb[None, :] * stride_sk,
                     mask=n_ok[:, None] & kb_ok, other=0.0)
        if SWIGLU:
            su = tl.load(scale_base + ((n + N) // SCALE_N)[:, None] * stride_sn + kb[None, :] * stride_sk,
                         mask=n_ok[:, None] & kb_ok, other=0.0)
    else:
        wt = wt.to(tl.float32)
        if SWIGLU:
            wu = wu.to(tl.float32)
    if HAS_BIAS:
        b = tl.load(bias + n, mask=n_ok, other=0.0).to(tl.float32)
    if USE_GDC:
        tl.extra.cuda.gdc_wait()                                                  # x is an earlier kernel's output
    for m in range(M):
        if SPLITS_POW2 > 0:
            xv = _merged_row(x + m * stride_xm + g * stride_xg, lse + m * stride_lm + g * stride_lg, num_splits,
                             k, K, stride_xs, SPLITS_POW2).to(out.dtype.element_ty).to(tl.float32)
        else:
            xv = tl.load(x + m * stride_xm + g * stride_xg + k, mask=k < K, other=0.0).to(tl.float32)
        if SCALE_N > 0:
            acc = _scaled_dot(wt, st, xv, BLOCK_N, BLOCK_K, SCALE_K)
        else:
            acc = tl.sum(wt * xv[None, :], axis=1)
        if HAS_BIAS:
            acc += b
        if SWIGLU:
            gate = acc.to(out.dtype.element_ty).to(tl.float32)
            if SCALE_N > 0:
                up = _scaled_dot(wu, su, xv, BLOCK_N, BLOCK_K, SCALE_K)
            else:
                up = tl.sum(wu * xv[None, :], axis=1)
            up = up.to(out.dtype.element_ty).to(tl.float32)
            acc = (gate / (1.0 + tl.exp(-gate))).to(out.dtype.element_ty).to(tl.float32) * up
        # (rounded to x's dtype first: a float32 out holds the 16-bit result, as F.linear(...).float() would)
        if out.dtype.element_ty == tl.float32:                  # the float32 sums themselves (the LM head's logits)
            tl.store(out + m * stride_om + g * stride_og + col0 + n, acc, mask=n_ok)
        else:
            tl.store(out + m * stride_om + g * stride_og + col0 + n, acc.to(out.dtype.element_ty), mask=n_ok)


def applies(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
    """x (..., K) against weight (N, K) or per group (G, N, K): few rows, 16-bit, K small enough for one tile;
    or FP8 weight with its block scales (scale_blocks) and 16-bit x."""
    rows = x.numel() // (x.shape[-1] * (weight.shape[0] if weight.dim() == 3 else 1))
    if weight.dtype == FP8:
        return (rows <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16) and scale is not None
                and triton.next_power_of_2(weight.shape[-1]) <= FP8_TILE_ELEMENTS
                and scale_blocks(weight, scale) is not None)
    return (rows <= MAX_ROWS and weight.dtype in (torch.bfloat16, torch.float16) and x.dtype == weight.dtype
            and triton.next_power_of_2(weight.shape[-1]) <= TILE_ELEMENTS)


def scale_blocks(weight: torch.Tensor, scale: torch.Tensor) -> tuple[int, int] | None:
    """The block shape of weight's scales (rows, columns), or None where the kernel cannot take it: the column
    blocks must be a power of two (DeepSeek's are 128) and every block dim must have its scale."""
    if scale.dim() != weight.dim() or scale.shape[:-2] != weight.shape[:-2] or scale.dtype != torch.float32:
        return None
    n, k = weight.shape[-2:]
    block_n, block_k = reference.block_length(n, scale.shape[-2]), reference.block_length(k, scale.shape[-1])
    if -(-n // block_n) != scale.shape[-2] or -(-k // block_k) != scale.shape[-1] or block_k & (block_k - 1):
        return None
    return block_n, min(block_k, triton.next_power_of_2(k))


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
            lse: torch.Tensor | None = None, ids: torch.Tensor | None = None, swiglu: bool = False,
            extra: Extra | None = None, second: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> None:
    """x (M, G, K), weight (G, N, K) any strides, out (M, G, N); with lse (M, G, S), x is (M, G, S, K) partials;
    with ids (G,), group g takes weight[ids[g]] (weight (E, N, K)), then come extra's groups; swiglu: weight
    rows are gate then up; second (N2, K): G = 1, out (M, 1, N + N2), its rows after weight's; scale: weight
    is FP8 with these block scales (G or E, ceil(N / bn), ceil(K / bk))."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    _, n, k = weight.shape
    groups = ids.numel() if ids is not None else weight.shape[0]
    n = n // 2 if swiglu else n
    if extra is not None and (extra.weight.dtype != weight.dtype or extra.weight.stride(-1) != weight.stride(-1)):
        raise ValueError("gemv: the extra groups' weights must have the routed weights' dtype and column stride")
    extra_args = ((extra.weight, extra.up if extra.up is not None else extra.weight, groups, extra.groups,
                   extra.stride_group, extra.stride_row) if extra is not None else (weight, weight, groups, 0, 0, 0))
    groups += extra.groups if extra is not None else 0
    if scale is not None and (extra is not None or second is not None):
        raise ValueError("gemv: FP8 weights take neither extra groups nor a second matrix")
    block_k = triton.next_power_of_2(k)
    tile = FP8_TILE_ELEMENTS if scale is not None else TILE_ELEMENTS
    block_n = max(1, min(64, tile // (block_k * (2 if swiglu else 1))))
    held = block_n * block_k * (2 if swiglu else 1)
    scale_n, scale_k = scale_blocks(weight, scale) if scale is not None else (0, 1)
    scaled = (scale, scale.stride(0), scale.stride(1), scale.stride(2)) if scale is not None else (weight, 0, 0, 0)
    splits = (lse.shape[-1], x.stride(2), lse.stride(0), lse.stride(1)) if lse is not None else (0, 0, 0, 0)
    blocks = triton.cdiv(n, block_n)
    pair = (second, blocks, second.shape[0], second.stride(0)) if second is not None else (weight, 0, 0, 0)
    _gemv[(blocks + (triton.cdiv(second.shape[0], block_n) if second is not None else 0), groups)](
        x, weight, bias if bias is not None else weight, out, ids if ids is not None else weight, x.shape[0], n, k,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), weight.stride(2), out.stride(0), out.stride(1),
        lse if lse is not None else x, *splits, *extra_args, *pair, *scaled, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLITS_POW2=triton.next_power_of_2(splits[0]) if lse is not None else 0,
        ROUTED=ids is not None, SWIGLU=swiglu, PAIR=second is not None, SCALE_N=scale_n, SCALE_K=scale_k,
        num_warps=NUM_WARPS if held <= TILE_ELEMENTS else 8, **pdl.launch(x))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., K) with at most MAX_ROWS rows; see `applies`. With scale, weight is
    FP8 and the result reference.fp8_linear's (plus bias). out_dtype float32: the float32 sums, unrounded
    (reference.linear_float32, the LM head's logits)."""
    flat = x.reshape(-1, 1, x.shape[-1])
    out = torch.empty(flat.shape[0], 1, weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    _launch(flat, weight.unsqueeze(0), bias, out, scale=scale.unsqueeze(0) if scale is not None else None)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_pair(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F.linear(x, first), F.linear(x, second)) in one launch, for two projections of one x (MLA's query and
    kv_a_proj): both prefetch their weights while the kernel ahead runs, where a second stream's kernel could
    not (moonlight-16b batch 1 on an H100: graph replay 2.30 -> 2.27 ms; the bench's whole step did not move,
    bench/NOTES.md). Views of one (..., N1 + N2) tensor."""
    if second.dtype != first.dtype or second.stride(-1) != first.stride(-1) or first.shape[1] != second.shape[1]:
        raise ValueError("gemv.linear_pair: both weights need the same dtype, K and column stride")
    flat = x.reshape(-1, 1, x.shape[-1])
    n1 = first.shape[0]
    out = torch.empty(flat.shape[0], 1, n1 + second.shape[0], dtype=x.dtype, device=x.device)
    _launch(flat, first.unsqueeze(0), None, out, second=second)
    y = out.view(*x.shape[:-1], out.shape[-1])
    return y[..., :n1], y[..., n1:]


def per_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[m, h] = weight[h] x[m, h]: x (M, H, K), weight (H, N, K) with any strides (the absorbed MLA's W_UK,
    transposed, and W_UV are views of kv_b_proj) -> (M, H, N)."""
    out = torch.empty(x.shape[0], weight.shape[0], weight.shape[1], dtype=x.dtype, device=x.device)
    _launch(x, weight, None, out)
    return out


def per_head_merged(partial: torch.Tensor, lse: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """per_head(merge(partial, lse), weight): the split MLA decode's merge (partial (M, H, S, C) float32, lse
    (M, H, S) base 2) done inside the W_UV product, one kernel instead of two. -> (M, H, N) in weight's dtype."""
    if lse.stride(-1) != 1:
        raise ValueError("per_head_merged needs lse contiguous along the splits")
    out = torch.empty(partial.shape[0], weight.shape[0], weight.shape[1], dtype=weight.dtype, device=partial.device)
    _launch(partial, weight, None, out, lse)
    return out


def routed_applies(x: torch.Tensor, weight: torch.Tensor, swiglu: bool = False, scale: torch.Tensor | None = None
                   ) -> bool:
    """One token against 16-bit experts (E, N, K) whose rows (gate and up: twice as many) fit one tile, or FP8
    experts with their block scales."""
    rows = triton.next_power_of_2(weight.shape[-1]) * (2 if swiglu else 1)
    if weight.dtype == FP8:
        return (x.numel() == x.shape[-1] and x.dtype in (torch.bfloat16, torch.float16) and scale is not None
                and rows <= FP8_TILE_ELEMENTS and scale_blocks(weight, scale) is not None)
    return (x.numel() == x.shape[-1] and weight.dtype in (torch.bfloat16, torch.float16) and x.dtype == weight.dtype
            and rows <= TILE_ELEMENTS)


@dataclass
class Extra:
    """Groups after the routed ones: group j's rows start at weight's element j * stride_group and lie
    stride_row apart (its up rows likewise in up, for SwiGLU)."""
    weight: torch.Tensor
    up: torch.Tensor | None
    groups: int
    stride_group: int
    stride_row: int

    @staticmethod
    def shared_experts(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, inter: int) -> tuple[Extra, Extra]:
        """The shared experts' MLP (gate and up (I_s, D), down (D, I_s)) as I_s / inter experts of the routed
        size: pseudo-expert j is rows j*inter... of gate and up and the same columns of down. -> the extras
        of the first and of the second routed GEMV."""
        groups = gate.shape[0] // inter
        if gate.stride() != up.stride():
            raise ValueError("gemv: the shared gate and up projections must have the same layout")
        return (Extra(gate, up, groups, inter * gate.stride(0), gate.stride(0)),
                Extra(down, None, groups, inter * down.stride(1), down.stride(0)))


def routed(x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, swiglu: bool = False,
           extra: Extra | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """One token's routed experts, a row each: out[j] = x[j] weight[ids[j]]^T, x (1, K) for every j or (k, K)
    a row each, ids (k,) -> (k, N); swiglu: weight (E, 2N, K) gate rows then up, out silu(gate) * up.
    extra: more groups after the k routed ones (Extra), with rows k... of out (and of x when one a row).
    scale: the experts are FP8 with these block scales (E, ., .) (no extra groups then).
    Batch 1 decode: every program loads its whole weight slice at once, where the tiled grouped GEMM
    streams it in K steps (moonlight-16b's two expert GEMMs, 104 MB: 31 + 15.5 us at ~2.2 TB/s that way,
    25 + 13 us this way, bench/NOTES.md)."""
    rows_out = ids.numel() + (extra.groups if extra is not None else 0)
    n = weight.shape[1] // 2 if swiglu else weight.shape[1]
    out = torch.empty(1, rows_out, n, dtype=x.dtype, device=x.device)
    rows = x.view(1, -1, x.shape[-1])
    if rows.shape[1] == 1:
        rows = rows.expand(1, rows_out, x.shape[-1])                              # stride 0: the same row
    _launch(rows, weight, None, out, ids=ids.view(-1), swiglu=swiglu, extra=extra, scale=scale)
    return out.view(rows_out, n)
