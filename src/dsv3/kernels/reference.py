"""Plain PyTorch definitions of every kernel: the ground truth each fast kernel is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def block_length(n: int, blocks: int) -> int:
    """The block length that cuts n values into `blocks` blocks, the last one possibly partial.

    ceil(n / blocks) is wrong when the edge block is partial (576 rows in 5 blocks of 128 would give
    116). Block sizes are powers of two (DeepSeek's 128) and exactly one power of two fits whenever
    there are two blocks or more; with one block any length >= n is the same.
    """
    least = -(-n // blocks)
    power = 1 << (least - 1).bit_length()
    return power if -(-n // power) == blocks else least


def fp8_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W = fp8 * scale, one scale per block of the last two dims (edge blocks partial).

    weight: (..., R, C) float8_e4m3fn; scale_inv: (..., ceil(R/br), ceil(C/bc)) float32.
    Computed in float32, so dtype=float32 is exact (DeepSeek inference/kernel.py weight_dequant).
    """
    *_, rows, cols = weight.shape
    br = block_length(rows, scale_inv.shape[-2])
    bc = block_length(cols, scale_inv.shape[-1])
    scale = scale_inv.repeat_interleave(br, dim=-2)[..., :rows, :].repeat_interleave(bc, dim=-1)[..., :cols]
    return (weight.float() * scale).to(dtype)


def fp8_quantize(weight: torch.Tensor, block: tuple[int, int] = (128, 128), ue8m0: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse: per-block amax / 448 scales (powers of two when ue8m0), as DeepSeek's checkpoints hold."""
    *lead, rows, cols = weight.shape
    br, bc = block
    nr, nc = -(-rows // br), -(-cols // bc)
    padded = F.pad(weight.float(), (0, nc * bc - cols, 0, nr * br - rows))
    blocks = padded.unflatten(-2, (nr, br)).unflatten(-1, (nc, bc))  # (..., nr, br, nc, bc)
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12)  # (..., nr, nc)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (blocks / scale[..., :, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    q = q.flatten(-4, -3).flatten(-2, -1)[..., :rows, :cols].contiguous()
    return q, scale.float()


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """y = x W^T with W dequantized; the fast kernel quantizes x per 1x128 block instead (DeepSeek's fp8_gemm)."""
    return F.linear(x, fp8_dequantize(weight, scale_inv, x.dtype))


def linear_float32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b) summed in float32 and returned unrounded: the LM head's logits. Rounded to bf16 they would move
    by up to 1/256 of their size (0.03 at 8) and flip close argmaxes (bench/accuracy.py on the CPU: 1.7% of the
    embedded model's greedy tokens differed from float32's with bf16 logits, 0.9% without the rounding)."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def grouped_mm(x: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by group, `counts[g]` rows for group g: y[rows of g] = x[rows of g] @ weights[g]^T.

    x: (M, K); weights: (G, N, K); counts: (G,). The plain definition gathers each row's weight.
    """
    group_of_row = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts, output_size=x.shape[0])
    return torch.bmm(weights[group_of_row], x.unsqueeze(-1)).squeeze(-1)


def per_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[m, h] = weight[h] x[m, h] for x (M, H, K) and weight (H, N, K) -> (M, H, N): the absorbed MLA's two
    per-head products. One batched GEMM over the heads, written straight into (M, H, N) order."""
    out = torch.empty(x.shape[0], weight.shape[0], weight.shape[1], dtype=x.dtype, device=x.device)
    torch.bmm(x.transpose(0, 1), weight.transpose(1, 2), out=out.transpose(0, 1))
    return out


def mla_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, latent_cache: torch.Tensor, block_tables: torch.Tensor,
               context_lens: torch.Tensor, kv_lora_rank: int, softmax_scale: float) -> torch.Tensor:
    """Absorbed MLA for one new token per sequence over the paged latent cache.

    q_latent: (B, H, kv_lora_rank) query already moved into the latent space through W_UK;
    q_rope: (B, H, rope); latent_cache: (num_blocks, block_size, kv_lora_rank + rope);
    block_tables: (B, max_blocks) int; context_lens: (B,) tokens in the cache, the new one included.
    Returns the attention output in latent space, (B, H, kv_lora_rank), float32 accumulation.
    """
    block_size = latent_cache.shape[1]
    max_len = int(context_lens.max())
    n_blocks = -(-max_len // block_size)
    kv = latent_cache[block_tables[:, :n_blocks].long()].flatten(1, 2)[:, :max_len].float()  # (B, S, D)
    scores = torch.einsum("bhc,bsc->bhs", q_latent.float(), kv[..., :kv_lora_rank])
    scores = scores + torch.einsum("bhr,bsr->bhs", q_rope.float(), kv[..., kv_lora_rank:])
    visible = torch.arange(max_len, device=kv.device) < context_lens[:, None]  # (B, S)
    scores = scores.mul(softmax_scale).masked_fill(~visible[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhs,bsc->bhc", probs, kv[..., :kv_lora_rank]).to(q_latent.dtype)


def prompt_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                     v: torch.Tensor, first_rows: torch.Tensor, fresh: torch.Tensor, softmax_scale: float,
                     out: torch.Tensor) -> torch.Tensor:
    """Expanded MLA for the rows of whole prompts in a flat step of N rows, one token a row: a fresh row r (its
    prompt's first row in the step is at position 0) attends the rows first_rows[r]..r, which are its whole
    context. q_nope (N, H, nope), q_pe (N, H, rope) rotated, keys k_nope (N, H, nope) and k_pe (N, rope) (one rope
    key for all heads), values v (N, H, v). Writes out[r] (N, H, v) for the fresh rows, leaves the others; returns
    out. float32 accumulation."""
    rows = torch.arange(q_nope.shape[0], device=q_nope.device)
    visible = (rows[None, :] >= first_rows[:, None]) & (rows[None, :] <= rows[:, None]) & fresh[:, None]   # (N, N)
    scores = (torch.einsum("rhd,jhd->hrj", q_nope.float(), k_nope.float())
              + torch.einsum("rhd,jd->hrj", q_pe.float(), k_pe.float()))
    probs = scores.mul(softmax_scale).masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num()
    result = torch.einsum("hrj,jhv->rhv", probs, v.float()).to(out.dtype)
    out[fresh] = result[fresh]
    return out


def routed_experts(x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor,
                   gate_up: torch.Tensor, gate_up_scale: torch.Tensor | None,
                   down: torch.Tensor, down_scale: torch.Tensor | None) -> torch.Tensor:
    """The routed experts of one rank: sum over each token's choices of weight * down(silu(gate x) * up x).

    x: (N, D); local_ids, weights: (N, k), ids outside [0, E) name other ranks' experts (they add 0);
    gate_up: (E, 2I, D) and down: (E, D, I), bf16, or e4m3 with their block scales. Products in x.dtype,
    the weighted sum in float32: (N, D).
    """
    w13 = gate_up if gate_up_scale is None else fp8_dequantize(gate_up, gate_up_scale, x.dtype)
    w2 = down if down_scale is None else fp8_dequantize(down, down_scale, x.dtype)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(len(w13)):
        token, choice = (local_ids == e).nonzero(as_tuple=True)
        gate, up = F.linear(x[token], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])
        out.index_add_(0, token, y.float() * weights[token, choice, None].float())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * RMSNorm(x), normalised in float32 and cast back before the scale, as transformers (the
    order matters in bf16). With the residual stream given: (that of h, h) for h = residual + x, the
    residual add and the next norm of a block (vLLM's fused_add_rms_norm)."""
    if residual is not None:
        h = residual + x
        return rms_norm(h, weight, eps), h
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def apply_rotary(x: torch.Tensor, rope: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the rope dims of x (..., n, rope) by `rope` (..., rope/2), broadcast over the n heads.

    DeepSeek pairs dims (0,1), (2,3), ... (interleaved, as its inference/model.py apply_rotary_emb);
    transformers' rope_interleave=False pairs (i, i + rope/2). One complex product in float32.
    """
    dtype, rope = x.dtype, rope.unsqueeze(-2)
    x = x.float()
    if interleaved:
        rotated = torch.view_as_complex(x.contiguous().unflatten(-1, (-1, 2))) * rope
        return torch.view_as_real(rotated).flatten(-2).to(dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.complex(x1.contiguous(), x2.contiguous()) * rope
    return torch.cat([rotated.real, rotated.imag], dim=-1).to(dtype)


def mla_rope_and_cache(q_pe: torch.Tensor, kv: torch.Tensor, rope: torch.Tensor, norm_weight: torch.Tensor,
                       eps: float, cache: torch.Tensor, slot_mapping: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """MLA's input side over a paged cache: the latent's RMSNorm and k_pe's rotation written to the
    cache rows at slot_mapping, and the rotated q_pe returned.

    q_pe: (N, H, rope); kv: (N, kv_lora_rank + rope), kv_a_proj's output; rope: (N, rope/2) complex;
    cache: (num_blocks, block_size, kv_lora_rank + rope); slot_mapping: (N,) flat slots.
    """
    latent, k_pe = kv.split([norm_weight.shape[0], q_pe.shape[-1]], dim=-1)
    latent = rms_norm(latent, norm_weight, eps)
    k_pe = apply_rotary(k_pe.unsqueeze(-2), rope, interleaved).squeeze(-2)
    cache.view(-1, cache.shape[-1])[slot_mapping] = torch.cat([latent, k_pe], -1).to(cache.dtype)
    return apply_rotary(q_pe, rope, interleaved)


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
          norm_topk_prob: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's router (V3 §2.1.2): x (N, D) -> gating weights (N, k) float32, expert ids (N, k),
    sigmoid scores (N, E) float32.

    Logits in float32. The bias only steers the choice: experts fall in n_group groups, each scored by
    the sum of its two best biased scores, only the best topk_group groups stay eligible, and the top_k
    biased scores among them are chosen; the weights are their unbiased scores, normalised when
    norm_topk_prob, times `scaling`.
    """
    scores = F.linear(x.float(), weight.float()).sigmoid()                   # (N, E)
    biased = scores + bias
    if n_group > 1:
        grouped = biased.unflatten(-1, (n_group, -1))                         # (N, G, E/G)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)                 # (N, G)
        keep = group_scores.topk(topk_group, dim=-1).indices
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        biased = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
    indices = biased.topk(top_k, dim=-1).indices                              # (N, k)
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, indices, scores


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's product, each op rounded to the inputs' dtype."""
    return F.silu(gate) * up


def expert_sum(ys: torch.Tensor, order: torch.Tensor, mine: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The routed sum after the grouped GEMMs: row i of ys is pair order[i] (pair p = token p // k, choice
    p % k); out[t] = sum over t's choices on this rank (mine) of weight * that pair's row, in float32. (N, D).
    Summed in choice order, as the kernel sums: a token's result does not depend on the other tokens."""
    n, k = weights.shape
    acc = torch.promote_types(ys.dtype, torch.float32)                            # float64 stays float64
    row_of_pair = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    w = torch.where(mine, weights.flatten(), 0.0).view(n, k, 1)
    y = ys[row_of_pair].to(acc).view(n, k, -1)                                    # (N, k, D), pairs in choice order
    out = torch.zeros(n, ys.shape[1], dtype=acc, device=ys.device)
    for j in range(k):
        out += torch.where(w[:, j] != 0, y[:, j] * w[:, j], 0.0)                 # rows of other ranks: 0
    return out


def moe_combine(routed: torch.Tensor, shared: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The routed experts' float32 sum plus the shared experts' output, added in float32."""
    return (routed + shared.float()).to(dtype)


def expert_blocks(local_ids: torch.Tensor, n_experts: int, block_m: int, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay the (token, choice) pairs out by expert in blocks of block_m rows, for the grouped GEMMs.

    local_ids: (P,) expert of each pair on this rank, pair p = token p // k; ids outside [0, n_experts)
    belong to other ranks. The layout has `capacity` rows, a size fixed by the shapes alone (every
    expert that can be present may waste block_m - 1 rows), pairs in order within each expert.
    Returns, int64: token_at (capacity,), the token of each row, -1 for padding; row_at (capacity,),
    the row itself, -1 for padding; block_expert (capacity / block_m,), the expert of each block, -1
    past the last; row_of_pair (P,), each pair's row, or `capacity` when not on this rank.
    """
    pairs = local_ids.numel()
    mine = (local_ids >= 0) & (local_ids < n_experts)
    expert = torch.where(mine, local_ids, n_experts)                                   # others sort last
    # torch.bincount would read the largest id back to the host; scatter_add_ stays on the device.
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=local_ids.device)
    counts = counts.scatter_add_(0, expert, torch.ones_like(expert))[:n_experts]       # (E,)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    capacity = -(-(pairs + min(n_experts, pairs) * (block_m - 1)) // block_m) * block_m

    order = torch.argsort(expert, stable=True)                                         # pairs by expert
    sorted_expert = expert[order].clamp(max=n_experts - 1)
    rank_in_expert = torch.arange(pairs, device=local_ids.device) - (torch.cumsum(counts, 0) - counts)[sorted_expert]
    row = torch.where(mine[order], (padded_end - padded)[sorted_expert] + rank_in_expert, capacity)
    pair_at = torch.full((capacity + 1,), -1, dtype=torch.long, device=local_ids.device)
    pair_at = pair_at.scatter_(0, row, order)[:capacity]
    row_of_pair = torch.empty_like(row).scatter_(0, order, row)
    block_start = torch.arange(0, capacity, block_m, device=local_ids.device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1)
    padding = pair_at < 0
    token_at = torch.where(padding, -1, pair_at // k)
    row_at = torch.where(padding, -1, torch.arange(capacity, device=local_ids.device))
    return token_at, row_at, block_expert, row_of_pair


def fill_pending(ids: torch.Tensor, sources: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """ids (N,) with ids[i] replaced by last[sources[i]] where sources[i] >= 0: a token the step before
    sampled on the device, which the host has not read yet."""
    return torch.where(sources >= 0, last[sources.clamp(min=0)], ids)


def continue_speculation(ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, context_lens: torch.Tensor,
                         tables: torch.Tensor, continues: torch.Tensor, record: torch.Tensor, block_size: int) -> None:
    """In place, the rows of a step (N,) that continue a speculative step (continues[i] >= 0: (k + 1) * its
    window + j, j = 0 for a sequence's token, j = 1..k for its drafts; record (P, 2k + 2) int64, k = 1: pairs)
    move record[window, 0] positions further, their cache slots (from their row of tables (N, W), int32) and
    context lengths (int32) with them, and take record[window, 1 + k + j] as their token; the other rows keep
    theirs."""
    k = (record.shape[1] - 2) // 2
    on = continues >= 0
    row = record[continues.clamp(min=0) // (k + 1)]                          # (N, 2k + 2): each row's window
    shift = row[:, 0] * on
    positions.add_(shift)
    context_lens.add_(shift.to(context_lens.dtype))
    block = (positions // block_size).clamp(max=tables.shape[1] - 1)
    moved = tables.gather(1, block[:, None])[:, 0].long() * block_size + positions % block_size
    slots.copy_(torch.where(on, moved, slots))
    token = row.gather(1, (1 + k + continues.clamp(min=0) % (k + 1))[:, None])[:, 0]
    ids.copy_(torch.where(on, token, ids))


def record_speculation(ids: torch.Tensor, tokens: torch.Tensor, record: torch.Tensor) -> None:
    """Greedy verification of P = len(record) windows of k + 1 rows (record (P, 2k + 2) int64; a sequence's
    token at (k+1)p, its drafts after it), written into record: the accepted count a (leading drafts that equal
    the main model's argmax tokens[0] at the row before), the k drafts, the token after the window (tokens[0] at
    row a of the window) and the k next drafts (tokens[1..k] at row a). tokens (1 + k, >= (k+1)P) int64."""
    windows, k = record.shape[0], (record.shape[1] - 2) // 2
    n = (k + 1) * windows
    target = tokens[0, :n].view(windows, k + 1)
    drafts = ids[:n].view(windows, k + 1)[:, 1:]
    accepted = (drafts == target[:, :k]).long().cumprod(dim=1).sum(dim=1)
    at = (torch.arange(windows, device=ids.device) * (k + 1) + accepted)
    record.copy_(torch.cat([accepted[:, None], drafts, tokens[0, at][:, None], tokens[1:, at].T], dim=1))


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's argmax over the last dim (the first index of its maximum), int64."""
    return x.argmax(dim=-1)

