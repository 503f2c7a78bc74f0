"""Absorbed-MLA decode over the paged latent cache (Triton); reference.mla_decode defines it.

One query token per sequence, H heads, each token's cache row = latent (C) + rope key (R). All heads
read the same rows (DeepSeek-V2 §2.1: the latent is both key and value), so a program takes BLOCK_H
heads of one sequence and loads each latent row once for all of them: scores = q_latent K^T +
q_rope K_rope^T and out = softmax(scores) K are two tensor-core products per tile of BLOCK_N tokens.

Split-KV (flash-decoding): each sequence's context is cut into `num_splits` parts that run in
parallel, each writing its normalised partial output and log-sum-exp; a second kernel merges them.
A batch of one with a long context then still fills the GPU. With one split the first kernel writes
the output directly. No host synchronisation: the split count follows from shapes alone, and each
program reads its sequence's length on the device, so the call can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dsv3.kernels import gemv, pdl, reference

LOG2_E = 1.4426950408889634   # scores are scaled into base 2, so the kernels use exp2


@triton.jit
def _attend(q, q_pe, latent, k_pe, tok_ok, m, l, acc, softmax_scale):
    """One tile of BLOCK_N cache rows into the online softmax of BLOCK_H heads (scores in base 2)."""
    s = tl.dot(q, tl.trans(latent)) + tl.dot(q_pe, tl.trans(k_pe))                      # (BLOCK_H, BLOCK_N)
    s = tl.where(tok_ok[None, :], s * softmax_scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(latent.dtype), latent)
    return m_new, l, acc


@triton.jit
def _mla_decode_split(q_latent, q_rope, cache, block_tables, context_lens, out, lse, softmax_scale,  # scale * log2(e)
                      num_heads, block_size, num_splits,
                      stride_qb, stride_qh, stride_rb, stride_rh, stride_cache_block, stride_cache_token,
                      stride_table, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                      C: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                      SPLIT: tl.constexpr, EARLY_TILE: tl.constexpr, USE_GDC: tl.constexpr):
    """EARLY_TILE: the split's first tile is read before the wait for the kernel ahead (pdl.py): the context
    lengths and block tables are the step's inputs, copied before the step's kernels ran, and the cache rows
    are earlier steps' work, except this step's new token (the last of the context), which the kernel ahead
    (mla_rope_and_cache) writes: that row is read after the wait. Only for a few programs (batch 1): with
    many, the tile held across the wait costs registers and the loop's pipelining. With the batch-1 launch
    below (64-token tiles, so the first tile holds most of a short context) it is worth 0.16 ms a step:
    moonlight-16b replays in 2.30 ms with it and 2.46 without (H100, same instance, twice each)."""
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    head_block, split, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    c, r = tl.arange(0, C), tl.arange(0, R)
    kv_dtype = cache.dtype.element_ty

    # This split's tokens: an equal share of this sequence's context, in whole tiles. The splits that
    # hold tokens come first; the graph's split count follows the longest context the cache allows, so
    # at short contexts most splits are empty and read nothing.
    context = tl.load(context_lens + seq)
    per_split = tl.cdiv(tl.cdiv(context, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, context)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, C], tl.float32)
    used = tl.where(start < end, head_ok, False)        # not &: the interpreter gives scalar & block no bool dtype

    if EARLY_TILE:
        tok = start + tl.arange(0, BLOCK_N)
        tok_ok = tok < end
        page = tl.load(block_tables + seq * stride_table + tok // block_size, mask=tok_ok, other=0)
        row = cache + page.to(tl.int64) * stride_cache_block + (tok % block_size) * stride_cache_token
        old = tok_ok & (tok < context - 1)
        latent = tl.load(row[:, None] + c[None, :], mask=old[:, None], other=0.0)      # (BLOCK_N, C)
        k_pe = tl.load(row[:, None] + C + r[None, :], mask=old[:, None], other=0.0)    # (BLOCK_N, R)
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
        new = tok_ok & (tok == context - 1)
        latent = tl.where(new[:, None], tl.load(row[:, None] + c[None, :], mask=new[:, None], other=0.0), latent)
        k_pe = tl.where(new[:, None], tl.load(row[:, None] + C + r[None, :], mask=new[:, None], other=0.0), k_pe)
        q = tl.load(q_latent + seq * stride_qb + heads[:, None] * stride_qh + c[None, :],
                    mask=used[:, None], other=0.0).to(kv_dtype)                      # (BLOCK_H, C)
        q_pe = tl.load(q_rope + seq * stride_rb + heads[:, None] * stride_rh + r[None, :],
                       mask=used[:, None], other=0.0).to(kv_dtype)                   # (BLOCK_H, R)
        m, l, acc = _attend(q, q_pe, latent, k_pe, tok_ok, m, l, acc, softmax_scale)
        first = start + BLOCK_N
    else:
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
        q = tl.load(q_latent + seq * stride_qb + heads[:, None] * stride_qh + c[None, :],
                    mask=used[:, None], other=0.0).to(kv_dtype)
        q_pe = tl.load(q_rope + seq * stride_rb + heads[:, None] * stride_rh + r[None, :],
                       mask=used[:, None], other=0.0).to(kv_dtype)
        first = start
    for n0 in range(first, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        tok_ok = tok < end
        page = tl.load(block_tables + seq * stride_table + tok // block_size, mask=tok_ok, other=0)
        row = cache + page.to(tl.int64) * stride_cache_block + (tok % block_size) * stride_cache_token
        latent = tl.load(row[:, None] + c[None, :], mask=tok_ok[:, None], other=0.0)
        k_pe = tl.load(row[:, None] + C + r[None, :], mask=tok_ok[:, None], other=0.0)
        m, l, acc = _attend(q, q_pe, latent, k_pe, tok_ok, m, l, acc, softmax_scale)

    # An empty split writes only its log-sum-exp, -inf: the merges read the partials of the others alone.
    # Unsplit, an empty context writes zeros.
    has = l > 0
    result = acc / tl.where(has, l, 1.0)[:, None]
    if SPLIT:
        written = head_ok & has
    else:
        written = head_ok
    tl.store(out + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + c[None, :],
             result.to(out.dtype.element_ty), mask=written[:, None])
    if SPLIT:
        tl.store(lse + seq * stride_lb + heads * stride_lh + split,
                 tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf")), mask=head_ok)


@triton.jit
def _mla_decode_merge(partial, lse, out, num_splits, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                      stride_ob, stride_oh, C: tl.constexpr, SPLITS_POW2: tl.constexpr, USE_GDC: tl.constexpr):
    """out = sum_s w_s partial_s / sum_s w_s with w_s = 2^(lse_s - max lse): the softmax over all splits."""
    pdl.start(USE_GDC)
    head, seq = tl.program_id(0), tl.program_id(1)
    splits = tl.arange(0, SPLITS_POW2)
    lses = tl.load(lse + seq * stride_lb + head * stride_lh + splits, mask=splits < num_splits,
                   other=float("-inf"))
    top = tl.max(lses, 0)
    top = tl.where(top == float("-inf"), 0.0, top)   # an empty context gives zeros, not NaN
    weights = tl.exp2(lses - top)
    c = tl.arange(0, C)
    acc = tl.zeros([C], tl.float32)
    used = tl.sum((lses > float("-inf")).to(tl.int32), 0)             # the splits with tokens come first
    for s0 in range(0, used, 4):                # four rows a turn, loads issued together (gemv._merged_row)
        for j in tl.static_range(4):
            s = s0 + j
            w = tl.sum(tl.where(splits == s, weights, 0.0), 0)
            acc += w * tl.load(partial + seq * stride_pb + head * stride_ph + s * stride_ps + c,
                               mask=tl.where(s < used, c < C, False), other=0.0)
    total = tl.sum(weights, 0)
    tl.store(out + seq * stride_ob + head * stride_oh + c, (acc / tl.where(total > 0, total, 1.0)).to(out.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def choose_splits(batch: int, head_blocks: int, max_context: int, device: torch.device,
                  min_tokens_per_split: int = 32, max_splits: int = 64, per_sm: int = 2) -> int:
    """Enough parts to give every multiprocessor about per_sm programs (2: rounded up, 1: down), none shorter
    than min_tokens_per_split. (bench/tune_decode.py, H100, 16 heads: batch 1 over 256 tokens took 14.6 us
    in 3 parts of at least 128 tokens and 7.6 us in 8.)"""
    programs = batch * head_blocks
    wanted = -(-2 * _multiprocessors(device) // programs) if per_sm == 2 else _multiprocessors(device) // programs
    return max(1, min(wanted, -(-max_context // min_tokens_per_split), max_splits))


def mla_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, latent_cache: torch.Tensor, block_tables: torch.Tensor,
               context_lens: torch.Tensor, kv_lora_rank: int, softmax_scale: float, *,
               num_splits: int | None = None, block_h: int | None = None, block_n: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None, w_uv: torch.Tensor | None = None,
               early_tile: bool | None = None) -> torch.Tensor:
    """Same arguments and result as reference.mla_decode; the keywords after * tune the launch. Given w_uv
    (H, v, C): the output projected per head, reference.per_head(result, w_uv), with the merge of the
    splits inside that product at decode sizes (gemv.per_head_merged)."""
    batch, heads, c = q_latent.shape
    r = q_rope.shape[-1]
    if c != kv_lora_rank or latent_cache.shape[-1] != c + r:
        raise ValueError(f"mla_decode: q_latent has {c} latent dims and q_rope {r}, so the cache rows should have "
                         f"{c} + {r} values (kv_lora_rank={kv_lora_rank}); they have {latent_cache.shape[-1]}")
    for name, n in (("kv_lora_rank", c), ("rope dims", r)):
        if n & (n - 1) or n < 16:
            raise ValueError(f"the Triton mla_decode needs {name} to be a power of two >= 16, got {n}")
    q_latent = q_latent if q_latent.stride(-1) == 1 else q_latent.contiguous()
    q_rope = q_rope if q_rope.stride(-1) == 1 else q_rope.contiguous()
    if latent_cache.stride(-1) != 1:
        raise ValueError("mla_decode needs the latent cache's last dim contiguous")
    # Measured on an H100 (bench/results/2026-11-22-*-kernels.md), C = 512: at 128 heads, 64 a program
    # ran batch 64 x 4096 tokens in 530 us against 790 for 16 (batch 1: 28 against 24 us).
    block_h = block_h or (64 if heads >= 64 else 16)  # tl.dot needs 16 rows
    head_blocks = triton.cdiv(heads, block_h)
    max_context = block_tables.shape[1] * latent_cache.shape[1]
    few = block_h <= 16 and batch * head_blocks <= 4
    early_tile = few if early_tile is None else early_tile
    if few and block_n is None:
        # A chain of batch-1 decodes with the W_UV product, 16 heads, under PDL (tune_decode.py --mla-chain,
        # H100): 64-token tiles, 8 warps and one stage took 7.0 us a link over 170 tokens (3 splits with
        # tokens) and 9.7 over 1000 (16 splits), against 7.9 and 12.3 for 32-token tiles, 4 warps, two
        # stages and 32 splits.
        block_n, num_warps, num_stages = 64, num_warps or 8, num_stages or 1
    per_sm = 2
    if not few and block_h <= 16 and batch * head_blocks >= 32:
        # 16 heads, 200 tokens of a 1024-token graph (tune_decode.py --mla, H100): a split and its merge cost
        # more than they spread. Batch 64: 13.1 us in 2 splits of 64-token tiles, 8 warps, against 16.2 in 3
        # of 32; batch 128: 18.0 in one against 30.4; batch 256: 37.4 in one of 32-token tiles, 4 warps
        # (two programs an SM), against 47.3. Batch 32: within 1% of the best. Below, the older rule (batch
        # 8: 7.6 us in 8 splits of 32 tokens, against 8.6 in 16 of 64 this way). The older settings at 64 and
        # 128 were timed first in their run, which reads high (bench/NOTES.md): their gains may be smaller.
        one_wave = batch * head_blocks <= _multiprocessors(q_latent.device)
        block_n, num_warps, per_sm = block_n or (64 if one_wave else 32), num_warps or (8 if one_wave else 4), 1
    block_n = block_n or 32
    num_warps = num_warps or (8 if block_h >= 64 else 4)
    num_stages = num_stages or 2
    splits = num_splits or choose_splits(batch, head_blocks, max_context, q_latent.device,
                                         max_splits=16 if few else 64, per_sm=per_sm)

    out = torch.empty(batch, heads, c, dtype=q_latent.dtype, device=q_latent.device)  # (B, H, C)
    if splits == 1:
        partial, lse = out, out                                       # written directly; lse unused
        stride_ps, stride_lb, stride_lh = 0, 0, 0
    else:
        partial = torch.empty(batch, heads, splits, c, dtype=torch.float32, device=q_latent.device)
        lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q_latent.device)
        stride_ps, stride_lb, stride_lh = partial.stride(2), lse.stride(0), lse.stride(1)
    _mla_decode_split[(head_blocks, splits, batch)](
        q_latent, q_rope, latent_cache, block_tables, context_lens, partial, lse, softmax_scale * LOG2_E,
        heads, latent_cache.shape[1], splits,
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        latent_cache.stride(0), latent_cache.stride(1), block_tables.stride(0),
        partial.stride(0), partial.stride(1), stride_ps, stride_lb, stride_lh,
        C=c, R=r, BLOCK_H=block_h, BLOCK_N=block_n, SPLIT=splits > 1, EARLY_TILE=early_tile, num_warps=num_warps,
        num_stages=num_stages,
        **pdl.launch(q_latent))
    project = w_uv is not None and gemv.applies(q_latent, w_uv)
    if splits > 1 and project:
        return gemv.per_head_merged(partial, lse, w_uv)
    if splits > 1:
        _mla_decode_merge[(heads, batch)](
            partial, lse, out, splits, partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0),
            lse.stride(1), out.stride(0), out.stride(1), C=c, SPLITS_POW2=triton.next_power_of_2(splits),
            **pdl.launch(q_latent))
    if w_uv is None:
        return out
    return gemv.per_head(out, w_uv) if project else reference.per_head(out, w_uv)


# The deterministic mode's split count, whatever the batch: four parts of each row's context, merged in order.
DETERMINISTIC_SPLITS = 4


def mla_decode_fixed(q_latent: torch.Tensor, q_rope: torch.Tensor, latent_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, kv_lora_rank: int, softmax_scale: float
                     ) -> torch.Tensor:
    """reference.mla_decode in one launch for every batch size (the deterministic mode): DETERMINISTIC_SPLITS
    splits of 32-token tiles, merged by _mla_decode_merge, so a row's result depends on its own context alone
    (mla_decode chooses splits, tiles and warps by the batch). A prompt token prefilled as a row gets the same
    values as when it is decoded."""
    return mla_decode(q_latent, q_rope, latent_cache, block_tables, context_lens, kv_lora_rank, softmax_scale,
                      num_splits=DETERMINISTIC_SPLITS, block_n=32, num_stages=2, early_tile=False)
