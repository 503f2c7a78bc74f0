"""The elementwise glue of a decoder layer, each piece one Triton kernel; reference.py defines each.

A decode step of a small batch is launch-bound: inside a CUDA graph each kernel costs about 2.5 us
however little it does (bench/NOTES.md), and PyTorch spends several on each piece here (casts, the
copies behind complex views, one kernel per op). Each kernel computes in float32 and rounds to 16 bits
where its reference rounds, so the two agree up to float rounding. Shapes alone fix every launch and
nothing is read back to the host, so all of them can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3.kernels import pdl


def _warps(block: int) -> int:
    return min(max(block // 512, 1), 16)


@triton.jit
def _scaled_norm(v, weight, cols, ok, dim, eps):
    """weight * RMSNorm(v) of one row, in float32: normalised in float32 and rounded to v's dtype first."""
    vf = v.to(tl.float32)
    normed = (vf * tl.rsqrt(tl.sum(vf * vf, 0) / dim + eps)).to(v.dtype)
    return normed.to(tl.float32) * tl.load(weight + cols, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _rms_norm(x, residual, weight, out, summed, dim, eps, stride_x, stride_r, stride_o, stride_s,
              HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    pdl.start(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    v = tl.load(x + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual + row * stride_r + cols, mask=ok, other=0.0)
        v = (r.to(tl.float32) + v.to(tl.float32)).to(summed.dtype.element_ty)
        tl.store(summed + row * stride_s + cols, v, mask=ok)
    tl.store(out + row * stride_o + cols, _scaled_norm(v, weight, cols, ok, dim, eps), mask=ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, last dim) with unit stride along the last dim, a view where it can be."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same arguments and result as reference.rms_norm: one program a row."""
    rows, dim = _rows(x), x.shape[-1]
    if residual is None:
        res = summed = rows                                                     # never read or written
        normed_dtype = x.dtype
    else:
        res = _rows(residual)
        normed_dtype = torch.promote_types(x.dtype, residual.dtype)
        summed = torch.empty(x.shape, dtype=normed_dtype, device=x.device)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, normed_dtype), device=x.device)
    block = triton.next_power_of_2(dim)
    _rms_norm[(rows.shape[0],)](rows, res, weight, out, summed, dim, eps, rows.stride(0), res.stride(0), dim, dim,
                                HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_warps(block),
                                **pdl.launch(x))
    return out if residual is None else (out, summed)


@triton.jit
def _rotated(src, first, second, ok, cos, sin):
    """The pairs (src[first], src[second]) times cos + i sin, in float32 as the reference's complex product."""
    a = tl.load(src + first, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(src + second, mask=ok, other=0.0).to(tl.float32)
    return a * cos - b * sin, a * sin + b * cos


@triton.jit
def _mla_rope_and_cache(q_pe, kv, rope, norm_weight, cache, slot_mapping, q_out, heads, block_size, eps,
                        stride_qn, stride_qh, stride_kv, stride_rope, stride_cb, stride_ct, stride_on, stride_oh,
                        C: tl.constexpr, HALF: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HALF: tl.constexpr,
                        BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr, USE_GDC: tl.constexpr):
    """Program (n, b): token n's heads b * BLOCK_H...; program (n, 0) also writes the token's cache row."""
    pdl.start(USE_GDC)
    n = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    pair_ok = i < HALF
    cos = tl.load(rope + n * stride_rope + 2 * i, mask=pair_ok, other=0.0)
    sin = tl.load(rope + n * stride_rope + 2 * i + 1, mask=pair_ok, other=0.0)
    if INTERLEAVED:                      # DeepSeek's pairs (2i, 2i + 1)
        first, second = 2 * i, 2 * i + 1
    else:                                # transformers' rope_interleave=False: (i, i + rope/2)
        first, second = i, i + HALF

    # The token's cache row: the normed latent, then the rotated k_pe, each rounded to kv's dtype first.
    if tl.program_id(1) == 0:
        dtype = kv.dtype.element_ty
        slot = tl.load(slot_mapping + n)
        row = cache + (slot // block_size) * stride_cb + (slot % block_size) * stride_ct
        cols = tl.arange(0, BLOCK_C)
        ok = cols < C
        latent = tl.load(kv + n * stride_kv + cols, mask=ok, other=0.0)
        tl.store(row + cols, _scaled_norm(latent, norm_weight, cols, ok, C, eps).to(dtype), mask=ok)
        re, im = _rotated(kv + n * stride_kv + C, first, second, pair_ok, cos, sin)
        tl.store(row + C + first, re.to(dtype), mask=pair_ok)
        tl.store(row + C + second, im.to(dtype), mask=pair_ok)

    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = (h < heads)[:, None] & pair_ok[None, :]
    q_re, q_im = _rotated(q_pe + n * stride_qn + h[:, None] * stride_qh, first[None, :], second[None, :],
                          head_ok, cos[None, :], sin[None, :])
    dst = q_out + n * stride_on + h[:, None] * stride_oh
    tl.store(dst + first[None, :], q_re.to(q_out.dtype.element_ty), mask=head_ok)
    tl.store(dst + second[None, :], q_im.to(q_out.dtype.element_ty), mask=head_ok)


HEADS_A_PROGRAM = 16


def mla_rope_and_cache(q_pe: torch.Tensor, kv: torch.Tensor, rope: torch.Tensor, norm_weight: torch.Tensor,
                       eps: float, cache: torch.Tensor, slot_mapping: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Same arguments and result as reference.mla_rope_and_cache: a program per token and 16 heads. One program
    a token for all of V3's 128 heads took 16 us (H100, eager): a short kernel is latency, not bytes."""
    tokens, heads, rope_dim = q_pe.shape
    c = norm_weight.shape[0]
    if kv.shape[-1] != c + rope_dim or cache.shape[-1] != c + rope_dim:
        raise ValueError(f"mla_rope_and_cache: kv rows have {kv.shape[-1]} values and cache rows "
                         f"{cache.shape[-1]}, both should have kv_lora_rank + rope = {c} + {rope_dim}")
    if kv.stride(-1) != 1 or q_pe.stride(-1) != 1 or cache.stride(-1) != 1:
        raise ValueError("mla_rope_and_cache needs kv, q_pe and the cache contiguous along their last dim")
    angles = torch.view_as_real(rope)                                         # (N, rope/2, 2) cos, sin
    q_out = torch.empty(q_pe.shape, dtype=q_pe.dtype, device=q_pe.device)
    half = rope_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(heads), HEADS_A_PROGRAM)
    _mla_rope_and_cache[(tokens, triton.cdiv(heads, block_h))](
        q_pe, kv, angles, norm_weight, cache, slot_mapping, q_out, heads, cache.shape[1], eps,
        q_pe.stride(0), q_pe.stride(1), kv.stride(0), angles.stride(0), cache.stride(0), cache.stride(1),
        q_out.stride(0), q_out.stride(1), C=c, HALF=half, BLOCK_C=triton.next_power_of_2(c),
        BLOCK_HALF=block_half, BLOCK_H=block_h, INTERLEAVED=interleaved, num_warps=4, **pdl.launch(kv))
    return q_out


@triton.jit
def _router_logits(x, weight, logits, rows, n_experts, dim, split_len, stride_x, stride_w, stride_ls, stride_l,
                   UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                   ONE_TILE: tl.constexpr, USE_GDC: tl.constexpr):
    """x W^T in float32 straight from 16-bit x and W: their products are exact in float32 and the sums run
    in float32, which is the reference's x.float() @ W.float()^T without a float32 copy of W each step.
    Program (m, e, s) sums the s-th split_len columns into partial s (decode: more programs read W).
    ONE_TILE (split_len == BLOCK_K): the program's weights load before it waits for the kernel ahead."""
    pid_m, pid_e, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    first = split * split_len
    if ONE_TILE:
        if USE_GDC:
            tl.extra.cuda.gdc_launch_dependents()
        k_ok = (k < split_len) & (k < dim - first)
        b = tl.load(weight + e[:, None] * stride_w + first + k[None, :], mask=(e < n_experts)[:, None] & k_ok[None, :],
                    other=0.0)
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
        a = tl.load(x + m.to(tl.int64)[:, None] * stride_x + first + k[None, :],
                    mask=(m < rows)[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    else:
        pdl.start(USE_GDC)
        for k0 in range(first, tl.minimum(first + split_len, dim), BLOCK_K):
            k_ok = k < dim - k0
            a = tl.load(x + m.to(tl.int64)[:, None] * stride_x + k0 + k[None, :],
                        mask=(m < rows)[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(weight + e[:, None] * stride_w + k0 + k[None, :], mask=(e < n_experts)[:, None] & k_ok[None, :],
                        other=0.0)
            if UPCAST:                       # mixed dtypes
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")         # float32 inputs: no TF32
    tl.store(logits + split * stride_ls + m.to(tl.int64)[:, None] * stride_l + e[None, :], acc,
             mask=(m < rows)[:, None] & (e < n_experts)[None, :])


@triton.jit
def _route(logits, bias, scores, weights, ids, stride_ls, stride_l, stride_s, scaling, SPLITS: tl.constexpr,
           GROUPS: tl.constexpr, PER_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
           NORM: tl.constexpr, G_POW2: tl.constexpr, PER_POW2: tl.constexpr, K_POW2: tl.constexpr,
           USE_GDC: tl.constexpr):
    """One token: its experts laid out (group, expert in group); top-k by repeated arg-max (ties: lowest id).
    Its logits are the sum of SPLITS partial sums, added in order."""
    pdl.start(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G_POW2)
    j = tl.arange(0, PER_POW2)
    expert = g[:, None] * PER_GROUP + j[None, :]
    valid = (g < GROUPS)[:, None] & (j < PER_GROUP)[None, :]
    logit = tl.load(logits + row * stride_l + expert, mask=valid, other=0.0)
    for split in tl.static_range(1, SPLITS):
        logit += tl.load(logits + split * stride_ls + row * stride_l + expert, mask=valid, other=0.0)
    # Padding slots (E/G not a power of two) repeat the next group's ids: they must add nothing below.
    s = tl.where(valid, tl.sigmoid(logit), 0.0)
    tl.store(scores + row * stride_s + expert, s, mask=valid)
    biased = tl.where(valid, s + tl.load(bias + expert, mask=valid, other=0.0).to(tl.float32), float("-inf"))
    if TOPK_GROUP < GROUPS:
        # A group's score is the sum of its two best biased scores (a tie for the best counts twice).
        best = tl.max(biased, 1)
        first = tl.min(tl.where(biased == best[:, None], j[None, :], PER_POW2), 1)
        second = tl.max(tl.where(j[None, :] == first[:, None], float("-inf"), biased), 1)
        group_score = tl.where(g < GROUPS, best + second, float("-inf"))
        keep = g < 0
        for _ in tl.static_range(TOPK_GROUP):
            pick = tl.min(tl.where(group_score == tl.max(group_score, 0), g, G_POW2), 0)
            keep = keep | (g == pick)
            group_score = tl.where(g == pick, float("-inf"), group_score)
        biased = tl.where(keep[:, None], biased, float("-inf"))
    slot = tl.arange(0, K_POW2)
    chosen = tl.zeros([K_POW2], tl.int64)
    weight = tl.zeros([K_POW2], tl.float32)
    for t in tl.static_range(TOP_K):
        top = tl.max(tl.max(biased, 1), 0)
        pick = tl.min(tl.min(tl.where(biased == top, expert, GROUPS * PER_GROUP), 1), 0)
        chosen = tl.where(slot == t, pick, chosen)
        weight = tl.where(slot == t, tl.sum(tl.sum(tl.where(expert == pick, s, 0.0), 1), 0), weight)
        biased = tl.where(expert == pick, float("-inf"), biased)
    if NORM:
        weight = weight / (tl.sum(weight, 0) + 1e-20)
    tl.store(weights + row * TOP_K + slot, weight * scaling, mask=slot < TOP_K)
    tl.store(ids + row * TOP_K + slot, chosen, mask=slot < TOP_K)


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
          norm_topk_prob: bool, scaling: float, fixed: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same arguments and result as reference.route: the logits GEMM, then one program a token. fixed (the
    deterministic mode): the decode launch for every number of rows, so each token's logits are summed in
    the same order whatever the batch."""
    x, weight = _rows(x), _rows(weight)
    rows, dim = x.shape
    n_experts = weight.shape[0]
    # Decode: W spread over programs, also along K (moonlight: 4 programs took 7.4 us of a 2.4 us read), one
    # tile of K a program, loaded before the wait.
    small = rows <= 16 or fixed
    block_m, block_e, block_k = (16, 16, 128) if small else (64, 16 if rows <= 1024 else 64, 64)
    splits = max(1, min(8, dim // 256)) if rows <= 1024 or fixed else 1
    split_len = triton.cdiv(triton.cdiv(dim, splits), block_k) * block_k
    splits = triton.cdiv(dim, split_len)
    one_tile = small and split_len <= 512
    block_k = triton.next_power_of_2(split_len) if one_tile else block_k
    logits = torch.empty(splits, rows, n_experts, dtype=torch.float32, device=x.device)
    _router_logits[(triton.cdiv(rows, block_m), triton.cdiv(n_experts, block_e), splits)](
        x, weight, logits, rows, n_experts, dim, split_len, x.stride(0), weight.stride(0), logits.stride(0),
        logits.stride(1), UPCAST=x.dtype != weight.dtype, BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_K=block_k,
        ONE_TILE=one_tile, num_warps=4, **pdl.launch(x))
    scores = torch.empty(rows, n_experts, dtype=torch.float32, device=x.device)
    weights = torch.empty(rows, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(rows, top_k, dtype=torch.int64, device=x.device)
    per_group = n_experts // n_group
    experts_pow2 = triton.next_power_of_2(n_group) * triton.next_power_of_2(per_group)
    _route[(rows,)](logits, bias, scores, weights, ids, logits.stride(0), logits.stride(1), scores.stride(0),
                    scaling, SPLITS=splits, GROUPS=n_group, PER_GROUP=per_group, TOPK_GROUP=topk_group,
                    TOP_K=top_k, NORM=norm_topk_prob, G_POW2=triton.next_power_of_2(n_group), PER_POW2=triton.next_power_of_2(per_group),
                    K_POW2=triton.next_power_of_2(top_k), num_warps=1 if experts_pow2 <= 512 else 4,
                    **pdl.launch(x))
    return weights, ids, scores


@triton.jit
def _silu_mul(gate, up, out, cols, stride_g, stride_u, stride_o, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    pdl.start(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < cols
    g = tl.load(gate + row * stride_g + c, mask=ok, other=0.0)
    u = tl.load(up + row * stride_u + c, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)                             # F.silu, rounded to gate's dtype
    tl.store(out + row * stride_o + c, act.to(tl.float32) * u.to(tl.float32), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Same arguments and result as reference.silu_mul; gate and up may be column slices of one tensor."""
    g, u = _rows(gate), _rows(up)
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    cols = gate.shape[-1]
    _silu_mul[(g.shape[0], triton.cdiv(cols, 1024))](g, u, out, cols, g.stride(0), u.stride(0), cols, BLOCK=1024,
                                                       **pdl.launch(gate))
    return out


@triton.jit
def _moe_combine(routed, shared, out, cols, stride_r, stride_s, stride_o, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    pdl.start(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < cols
    r = tl.load(routed + row * stride_r + c, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(shared + row * stride_s + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + row * stride_o + c, r + s, mask=ok)


def moe_combine(routed: torch.Tensor, shared: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Same arguments and result as reference.moe_combine."""
    r, s = _rows(routed), _rows(shared)
    out = torch.empty(routed.shape, dtype=dtype, device=routed.device)
    cols = routed.shape[-1]
    _moe_combine[(r.shape[0], triton.cdiv(cols, 1024))](r, s, out, cols, r.stride(0), s.stride(0), cols, BLOCK=1024,
                                                          **pdl.launch(routed))
    return out


# ---- a step's edges: its pending tokens in, its greedy tokens out -------------------------------------------

@triton.jit
def _fill_pending(ids, sources, last, out, n, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    pdl.start(USE_GDC)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    src = tl.load(sources + i, mask=ok, other=-1)
    own = tl.load(ids + i, mask=ok, other=0)
    pending = tl.load(last + tl.maximum(src, 0), mask=ok & (src >= 0), other=0)
    tl.store(out + i, tl.where(src >= 0, pending, own), mask=ok)


def fill_pending(ids: torch.Tensor, sources: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Same arguments and result as reference.fill_pending, in one kernel instead of PyTorch's four."""
    out = torch.empty_like(ids)
    n = ids.numel()
    _fill_pending[(triton.cdiv(n, 1024),)](ids, sources, last, out, n, BLOCK=1024, **pdl.launch(ids))
    return out


@triton.jit
def _continue_speculation(ids, positions, slots, context_lens, tables, continues, record, n, block_size, width,
                          stride_t, stride_r, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    """Each program: BLOCK rows; only the rows that continue are read further and written."""
    pdl.start(USE_GDC)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.load(continues + i, mask=i < n, other=-1)
    on = (i < n) & (c >= 0)
    pair = tl.maximum(c, 0) // 2
    shift = tl.load(record + pair * stride_r, mask=on, other=0)
    token = tl.load(record + pair * stride_r + 2 + tl.maximum(c, 0) % 2, mask=on, other=0)
    p = tl.load(positions + i, mask=on, other=0) + shift
    block = tl.minimum(p // block_size, width - 1)
    base = tl.load(tables + i.to(tl.int64) * stride_t + block, mask=on, other=0).to(tl.int64)
    tl.store(positions + i, p, mask=on)
    tl.store(context_lens + i, tl.load(context_lens + i, mask=on, other=0) + shift.to(tl.int32), mask=on)
    tl.store(slots + i, base * block_size + p % block_size, mask=on)
    tl.store(ids + i, token, mask=on)


def continue_speculation(ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, context_lens: torch.Tensor,
                         tables: torch.Tensor, continues: torch.Tensor, record: torch.Tensor, block_size: int) -> None:
    """Same arguments and effect as reference.continue_speculation, in one kernel instead of PyTorch's ~15."""
    n = ids.numel()
    _continue_speculation[(triton.cdiv(n, 1024),)](ids, positions, slots, context_lens, tables, continues, record, n,
                                                   block_size, tables.shape[1], tables.stride(0), record.stride(0),
                                                   BLOCK=1024, **pdl.launch(ids))


@triton.jit
def _record_speculation(ids, tokens, record, pairs, stride_k, stride_r, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    pdl.start(USE_GDC)
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = j < pairs
    draft = tl.load(ids + 2 * j + 1, mask=ok, other=0)
    at_token, at_draft = tl.load(tokens + 2 * j, mask=ok, other=0), tl.load(tokens + 2 * j + 1, mask=ok, other=0)
    next_at_token = tl.load(tokens + stride_k + 2 * j, mask=ok, other=0)
    next_at_draft = tl.load(tokens + stride_k + 2 * j + 1, mask=ok, other=0)
    stood = draft == at_token
    row = record + j * stride_r
    tl.store(row, stood.to(tl.int64), mask=ok)
    tl.store(row + 1, draft, mask=ok)
    tl.store(row + 2, tl.where(stood, at_draft, at_token), mask=ok)
    tl.store(row + 3, tl.where(stood, next_at_draft, next_at_token), mask=ok)


def record_speculation(ids: torch.Tensor, tokens: torch.Tensor, record: torch.Tensor) -> None:
    """Same arguments and effect as reference.record_speculation, in one kernel instead of PyTorch's ~10."""
    pairs = record.shape[0]
    _record_speculation[(triton.cdiv(max(pairs, 1), 1024),)](ids, tokens, record, pairs, tokens.stride(0),
                                                             record.stride(0), BLOCK=1024, **pdl.launch(ids))


ARGMAX_BLOCK = 2048  # columns a program of the first pass reduces: 80 programs a row for a 163,840 vocabulary


@triton.jit
def _argmax_parts(x, values, indices, cols, parts, stride_x, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    """Each program: the maximum of BLOCK columns of a row, and the first column that holds it."""
    pdl.start(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    c = part * BLOCK + tl.arange(0, BLOCK)
    ok = c < cols
    v = tl.load(x + row * stride_x + c, mask=ok, other=float("-inf")).to(tl.float32)
    best = tl.max(v, 0)
    tl.store(values + row * parts + part, best)
    tl.store(indices + row * parts + part, tl.min(tl.where(ok & (v == best), c, cols), 0).to(tl.int64))


@triton.jit
def _argmax_rows(values, indices, out, parts, cols, PARTS_POW2: tl.constexpr, USE_GDC: tl.constexpr):
    """The first part that holds the row's maximum gives its first column: parts are in column order."""
    pdl.start(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, PARTS_POW2)
    ok = p < parts
    v = tl.load(values + row * parts + p, mask=ok, other=float("-inf"))
    i = tl.load(indices + row * parts + p, mask=ok, other=cols)
    best = tl.max(v, 0)
    first = tl.min(tl.where(ok & (v == best), i, cols), 0)
    tl.store(out + row, tl.where(first < cols, first, 0))  # (a row of -inf only: column 0, as torch)


def argmax(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """reference.argmax of x (M, V) (rows without NaN), into out (M,) int64 if given: two passes of small
    kernels (PyTorch's reduction takes ~9 us for one row of 163,840 on an H100)."""
    rows, cols = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    parts = triton.cdiv(cols, ARGMAX_BLOCK)
    values = torch.empty(rows, parts, dtype=torch.float32, device=x.device)
    indices = torch.empty(rows, parts, dtype=torch.int64, device=x.device)
    out = torch.empty(rows, dtype=torch.int64, device=x.device) if out is None else out
    if rows:
        _argmax_parts[(rows, parts)](x, values, indices, cols, parts, x.stride(0), BLOCK=ARGMAX_BLOCK,
                                     num_warps=4, **pdl.launch(x))
        _argmax_rows[(rows,)](values, indices, out, parts, cols, PARTS_POW2=triton.next_power_of_2(parts),
                              **pdl.launch(x))
    return out

