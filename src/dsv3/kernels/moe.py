"""Routed experts as two grouped GEMMs over the tokens sorted by expert (Triton); reference.routed_experts defines it.

As vLLM's fused_moe: the (token, choice) pairs are sorted by expert and each expert's run padded to
whole blocks of BLOCK_M rows, so a block of rows has one expert and the GEMM kernel reads only the
weights of experts that received tokens (FP8 weights stay FP8 in memory). Nothing here reads a
device value on the host: the padded layout has a size fixed by the shapes alone (every expert that
can be present may waste BLOCK_M - 1 rows), so a decode step can be captured in a CUDA graph. The
layout is two kernels (a counting sort: counts per chunk of pairs, then each chunk's rows; none for one
token), the first GEMM ends with the SwiGLU product, and one kernel makes each token's weighted sum over
its experts plus the shared experts' output: five kernels in all. One token with 16-bit experts takes two GEMV
launches instead (gemv.routed, `one_token_gemv`), the shared experts inside them, and the weighted sum: three.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from dsv3.kernels import gemv, pdl, reference
from dsv3.kernels.fp8_gemm import FIXED_CONFIG, block_scaled_matmul, gemm_config

# The layout's two kernels give each program CHUNK pairs, its counts one row of a (chunks, experts) table that
# every program of the second kernel reads whole: at most MAX_CHUNKS rows, so past MAX_CHUNKS * CHUNK pairs
# a program takes more.
MAX_CHUNKS = 64
# Up to this many pairs the two kernels lay them out: measured up to 4,608 (moonlight-16b, 768 tokens), the most the
# bf16 experts' fused path takes is 8,192. Past it (FP8 prefills: 65,536 pairs of DeepSeek-V3 at 8,192 tokens) the
# PyTorch layout, a few dozen parallel kernels, as before the two kernels; not measured against them there.
KERNEL_PAIRS = 8192


@triton.jit
def _expert_counts(ids, counts, token_at, row_at, pairs, n_experts, capacity, chunk,
                   E_POW2: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    """Program c: how many of pairs [c * chunk, (c + 1) * chunk) each expert got, into counts[c]; and its share of
    the padding marks (-1) of token_at and row_at, which the next kernel's rows then overwrite."""
    pdl.start(USE_GDC)
    c = tl.program_id(0)
    e = tl.arange(0, E_POW2)
    real = e < n_experts
    got = tl.zeros([E_POW2], tl.int32)
    for p0 in range(c * chunk, tl.minimum((c + 1) * chunk, pairs), BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        x = tl.load(ids + p, mask=p < pairs, other=-1)
        got += tl.sum(((x[:, None] == e[None, :]) & real[None, :]).to(tl.int32), 0)
    tl.store(counts + c * E_POW2 + e, got)
    step = tl.num_programs(0) * BLOCK
    for r0 in range(c * BLOCK, capacity, step):
        r = r0 + tl.arange(0, BLOCK)
        tl.store(token_at + r, -1, mask=r < capacity)
        tl.store(row_at + r, -1, mask=r < capacity)


@triton.jit
def _expert_rows(ids, counts, token_at, row_at, block_expert, row_of_pair, pairs, n_experts, capacity, chunk, chunks,
                 k, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, C_POW2: tl.constexpr, BLOCK: tl.constexpr,
                 USE_GDC: tl.constexpr):
    """Program c places pairs [c * chunk, (c + 1) * chunk): expert e's run starts at the padded runs of the experts
    before it, and within it, after the pairs of e that earlier programs hold (reference.expert_blocks' layout,
    pairs in order within each expert). The blocks' experts are shared out between the programs."""
    pdl.start(USE_GDC)
    c = tl.program_id(0)
    e = tl.arange(0, E_POW2)
    real = e < n_experts
    rows = tl.arange(0, C_POW2)
    table = tl.load(counts + rows[:, None] * E_POW2 + e[None, :], mask=(rows < chunks)[:, None], other=0)
    padded = (tl.sum(table, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    start = end - padded
    seen = tl.sum(tl.where((rows < c)[:, None], table, 0), 0)          # pairs of each expert in earlier chunks
    for p0 in range(c * chunk, tl.minimum((c + 1) * chunk, pairs), BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        x = tl.load(ids + p, mask=p < pairs, other=-1)
        hit = ((x[:, None] == e[None, :]) & real[None, :]).to(tl.int32)          # (BLOCK, E)
        before = tl.cumsum(hit, 0) - hit + seen[None, :]                         # earlier pairs of the same expert
        mine = tl.sum(hit, 1) > 0
        row = tl.where(mine, tl.sum(hit * (start[None, :] + before), 1), capacity).to(tl.int64)
        tl.store(row_of_pair + p, row, mask=p < pairs)
        tl.store(token_at + row, p // k, mask=mine)
        tl.store(row_at + row, row, mask=mine)
        seen += tl.sum(hit, 0)
    blocks = capacity // BLOCK_M
    for b0 in range(c * BLOCK, blocks, tl.num_programs(0) * BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        owner = tl.sum(((end[None, :] <= (b * BLOCK_M)[:, None]) & real[None, :]).to(tl.int32), 1)  # searchsorted
        tl.store(block_expert + b, tl.where(owner < n_experts, owner, -1), mask=b < blocks)


def expert_blocks(local_ids: torch.Tensor, n_experts: int, block_m: int, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same arguments and result as reference.expert_blocks: up to KERNEL_PAIRS pairs in two launches of up to
    MAX_CHUNKS programs (one program walking every pair took 53 us a layer of moonlight-16b's batch 256 on an H200,
    102 us at 512; the two, 12 us), past it the reference's PyTorch layout."""
    pairs = local_ids.numel()
    if pairs > KERNEL_PAIRS:
        return reference.expert_blocks(local_ids, n_experts, block_m, k)
    capacity = -(-(pairs + min(n_experts, pairs) * (block_m - 1)) // block_m) * block_m

    def empty(n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.int64, device=local_ids.device)

    token_at, row_at, block_expert, row_of_pair = (empty(capacity), empty(capacity), empty(capacity // block_m),
                                                   empty(pairs))
    e_pow2 = triton.next_power_of_2(n_experts)
    block = max(16, 4096 // e_pow2)                                  # a (BLOCK, experts) comparison at a time
    chunk = max(block, triton.cdiv(triton.cdiv(pairs, MAX_CHUNKS), block) * block)
    chunks = max(1, triton.cdiv(pairs, chunk))
    ids = local_ids.contiguous()
    counts = torch.empty(chunks, e_pow2, dtype=torch.int32, device=local_ids.device)
    launch, c_pow2 = pdl.launch(local_ids), max(2, triton.next_power_of_2(chunks))
    _expert_counts[(chunks,)](ids, counts, token_at, row_at, pairs, n_experts, capacity, chunk, E_POW2=e_pow2,
                              BLOCK=block, num_warps=4, **launch)
    _expert_rows[(chunks,)](ids, counts, token_at, row_at, block_expert, row_of_pair, pairs, n_experts, capacity,
                            chunk, chunks, k, BLOCK_M=block_m, E_POW2=e_pow2,
                            C_POW2=c_pow2, BLOCK=block, num_warps=8 if c_pow2 * e_pow2 > 4096 else 4, **launch)
    return token_at, row_at, block_expert, row_of_pair


@triton.jit
def _weighted_sum(y, row_of_pair, weights, shared, out, dim, capacity, stride_y, stride_sh, stride_o, K: tl.constexpr,
                  HAS_SHARED: tl.constexpr, EXTRA: tl.constexpr, ROWS_IN_ORDER: tl.constexpr, BLOCK: tl.constexpr,
                  USE_GDC: tl.constexpr):
    """out[t] = the sum over t's k choices of weight * y[row], in float32 and in choice order (batch-invariant,
    no atomics); choices on other ranks add 0. HAS_SHARED: plus shared[t], as reference.moe_combine adds it.
    EXTRA (one token): plus rows capacity... of y, EXTRA of them (the shared experts run as routed ones).
    ROWS_IN_ORDER: pair j of token t is row t * K + j (row_of_pair not read: one load less in the chain)."""
    pdl.start(USE_GDC)
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < dim
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(K):
        if ROWS_IN_ORDER:
            row = t * K + j
        else:
            row = tl.load(row_of_pair + t * K + j)
        w = tl.load(weights + t * K + j).to(tl.float32)
        on = row < capacity
        # tl.where, not ok & on: Triton's interpreter gives a scalar & block mask a non-boolean dtype.
        v = tl.load(y + row * stride_y + c, mask=tl.where(on, ok, False), other=0.0).to(tl.float32)
        acc += tl.where(on, v * w, 0.0)
    if HAS_SHARED:
        acc += tl.load(shared + t * stride_sh + c, mask=ok, other=0.0).to(tl.float32)
    for j in tl.static_range(EXTRA):
        acc += tl.load(y + (capacity + j) * stride_y + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + t * stride_o + c, acc, mask=ok)


def expert_sum(ys: torch.Tensor, order: torch.Tensor, mine: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Same arguments and result as reference.expert_sum: one pass that reads each token's rows where the
    grouped GEMM left them, instead of scaling, masking and index_add_-ing (pairs, D) float32 tensors
    (about 2.5 ms a layer on moonlight-16b's 16k-token prefill steps, as long as the GEMMs)."""
    tokens, k = weights.shape
    pairs = order.numel()
    row_of_pair = torch.empty_like(order).scatter_(0, order, torch.arange(pairs, device=order.device))
    row_of_pair = torch.where(mine, row_of_pair, pairs)                                # pairs: not on this rank
    out = torch.empty(tokens, ys.shape[1], dtype=torch.float32, device=ys.device)
    _weighted_sum[(tokens, triton.cdiv(ys.shape[1], 1024))](
        ys, row_of_pair, weights.contiguous(), ys, out, ys.shape[1], pairs, ys.stride(0), 0, out.stride(0), K=k,
        HAS_SHARED=False, EXTRA=0, ROWS_IN_ORDER=False, BLOCK=1024, **pdl.launch(ys))
    return out


@functools.lru_cache(maxsize=None)
def _one_token_layout(k: int, block_m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """token_at, row_at, row_of_pair of one token's k pairs, a block each (its k experts are distinct)."""
    rows = torch.arange(k, device=device) * block_m
    token_at = torch.full((k * block_m,), -1, dtype=torch.int64, device=device)
    return token_at.index_fill(0, rows, 0), token_at.index_copy(0, rows, rows), rows


# DeepSeek-V3's FP8 experts at 8,192 tokens (256 pairs an expert), H200: both GEMMs in 21.1 ms with these tiles,
# against 32.2 ms in 128-row blocks and over 30.7 ms in gemm_config(64)'s 64 x 64 tiles
# (bench/results/*-tune-moe-fp8-b8192-6550fd5.txt). Smaller prefills are not measured: they keep gemm_config's.
PREFILL_PAIRS = 256  # pairs an expert, on average, from which FP8 experts take PREFILL_FP8_CONFIG
PREFILL_FP8_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4)


def moe_block_m(pairs: int, n_experts: int, fp8: bool) -> int:
    """Rows a block of the fused MoE holds: 16 up to 4 pairs an expert in 16 bits, 8 in FP8, else 64; 16-bit experts
    past 64 pairs an expert 128 (a block reads its expert's weights: moonlight-16b at 768 tokens, 72 pairs an
    expert, H200: both GEMMs 363 us a layer in 128-row blocks against 455 in 64-row ones; 64 stays best at 512
    tokens, bench/results/*-tune-moe-b512-d04ab53.txt). DeepSeek-V3's FP8 experts at batch 256 (8 pairs an expert),
    H100: 4.04 ms a layer in 16-row blocks against 7.36 in 64-row ones
    (bench/results/*-tune-moe-fp8-b256-2aff41e.txt)."""
    if pairs <= (8 if fp8 else 4) * n_experts:
        return 16
    return 128 if not fp8 and pairs > 64 * n_experts else 64


def moe_config(block_m: int, n: int, pairs: int, n_experts: int, fp8: bool) -> dict:
    """The fused MoE's tiles: gemm_config's for block_m, except FP8 experts in a prefill of PREFILL_PAIRS pairs an
    expert or more, whose GEMMs are compute-bound."""
    if fp8 and block_m == PREFILL_FP8_CONFIG["BLOCK_M"] and pairs >= PREFILL_PAIRS * n_experts:
        return PREFILL_FP8_CONFIG
    return gemm_config(block_m, n)


def fused_experts(x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor,
                  gate_up: torch.Tensor, gate_up_scale: torch.Tensor | None,
                  down: torch.Tensor, down_scale: torch.Tensor | None, quantize_activations: bool = True,
                  block_m: int | None = None, all_local: bool = False, shared: torch.Tensor | None = None,
                  join: Callable[[], None] | None = None,
                  shared_mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  fixed: bool = False) -> torch.Tensor:
    """Same arguments and result as reference.routed_experts. all_local: every id is an expert of this
    rank (no expert parallel); one token then needs no layout kernel: its pair j is block j. shared: the
    shared experts' output, added in the weighted sum's kernel (reference.moe_combine, in x's dtype);
    join() runs before that kernel is queued (the shared experts may run on another stream).
    shared_mlp: instead, the shared experts' gate, up and down weights, run in the same launches as the
    routed experts (only where one_token_gemv applies), the result as with shared. fixed (the deterministic
    mode): both GEMMs in fp8_gemm.FIXED_CONFIG's launch whatever the batch, so a pair's row is the same product
    however many tokens share its expert (and never the one-token GEMV)."""
    tokens, k = local_ids.shape
    n_experts = gate_up.shape[0]
    pairs = tokens * k
    if fixed and shared_mlp is not None:
        raise ValueError("fused_experts: the fixed launch does not run the shared experts inside (shared_mlp)")
    if not fixed and one_token_gemv(x, gate_up, gate_up_scale, down, all_local, shared_mlp, down_scale):
        # Each expert's rows as a GEMV (gemv.routed), pair j's output in row j, the shared experts' after them.
        extra_up, extra_down = (gemv.Extra.shared_experts(*shared_mlp, inter=down.shape[2]) if shared_mlp is not None
                                else (None, None))
        act = gemv.routed(x, local_ids.view(-1), gate_up, swiglu=True, extra=extra_up,
                          scale=gate_up_scale)                                          # (k [+ s], I): SwiGLU'd
        y = gemv.routed(act, local_ids.view(-1), down, extra=extra_down, scale=down_scale)  # (k [+ s], D)
        return _sum(y, None, weights, k, x, shared, join, extra_down.groups if extra_down is not None else 0)
    block_m = FIXED_CONFIG["BLOCK_M"] if fixed else block_m or moe_block_m(pairs, n_experts, gate_up_scale is not None)
    if tokens == 1 and all_local:
        token_at, row_at, row_of_pair = _one_token_layout(k, block_m, x.device)
        block_expert = local_ids.view(-1)
    else:
        token_at, row_at, block_expert, row_of_pair = expert_blocks(local_ids.flatten(), n_experts, block_m, k)
    capacity = token_at.numel()
    config = (FIXED_CONFIG if fixed else                                                 # its BLOCK_M is block_m
              moe_config(block_m, gate_up.shape[1], pairs, n_experts, gate_up_scale is not None))

    act = block_scaled_matmul(x, gate_up, gate_up_scale, capacity, token_at, block_expert,
                              quantize_activations, config, swiglu=True)               # (capacity, I): SwiGLU'd
    y = block_scaled_matmul(act, down, down_scale, capacity, row_at, block_expert,
                            quantize_activations, config)                               # (capacity, D)

    return _sum(y, row_of_pair, weights, capacity, x, shared, join)


def one_token_gemv(x: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor | None, down: torch.Tensor,
                   all_local: bool, shared_mlp: tuple[torch.Tensor, ...] | None = None,
                   down_scale: torch.Tensor | None = None) -> bool:
    """One token, every expert here, 16-bit or FP8 experts (and, 16-bit only, shared experts, if given, of a whole
    number of routed experts' size) whose rows fit the GEMV's tile: fused_experts takes gemv.routed."""
    if not (x.numel() == x.shape[-1] and all_local and (gate_up_scale is None) == (down_scale is None)
            and gemv.routed_applies(x, gate_up, swiglu=True, scale=gate_up_scale)
            and gemv.routed_applies(x, down, scale=down_scale)):
        return False
    if shared_mlp is None:
        return True
    if gate_up_scale is not None:
        return False
    gate, up, shared_down = shared_mlp
    inter = down.shape[2]
    return (all(w.dtype == gate_up.dtype and w.stride(-1) == 1 for w in shared_mlp) and gate.shape == up.shape
            and gate.shape[0] % inter == 0 and gate.shape[1] == gate_up.shape[2]
            and shared_down.shape == (down.shape[1], gate.shape[0]))


def _sum(y: torch.Tensor, row_of_pair: torch.Tensor | None, weights: torch.Tensor, capacity: int, x: torch.Tensor,
         shared: torch.Tensor | None, join: Callable[[], None] | None, extra: int = 0) -> torch.Tensor:
    """Each token's weighted sum over its pairs' rows of y (rows >= capacity: not on this rank; row_of_pair
    None: pair j of token t is row t * k + j), plus shared, plus (one token) y's `extra` rows from capacity
    on: the shared experts' parts. With the shared experts, in x's dtype (reference.moe_combine), else float32."""
    if join is not None:
        join()
    tokens, k = weights.shape
    with_shared = shared is not None or extra > 0
    out = torch.empty(x.shape, dtype=x.dtype if with_shared else torch.float32, device=x.device)
    block = 256 if tokens == 1 else 1024                           # one token: more programs, fewer loads each
    _weighted_sum[(tokens, triton.cdiv(x.shape[1], block))](
        y, row_of_pair if row_of_pair is not None else y, weights.contiguous(), shared if shared is not None else y,
        out, x.shape[1], capacity, y.stride(0), shared.stride(0) if shared is not None else 0, out.stride(0), K=k,
        HAS_SHARED=shared is not None, EXTRA=extra, ROWS_IN_ORDER=row_of_pair is None, BLOCK=block, **pdl.launch(y))
    return out
