"""Expanded-MLA attention for the whole prompts of a rows-mode step (Triton); reference.prompt_attention defines it.

A rows-mode step (a CUDA graph's layout: every token its own attention row) attends each row over its own context
in the absorbed form (mla_decode.py), cheapest for a decode row. A row of a prompt that starts in the step (a fresh
row) has its whole context among the step's rows, so its keys and values can be expanded from the latents just
cached (one kv_b_proj GEMM over the step) and attended per head: 2 x (nope + rope + v) = 640 multiply-adds a key and
head at V3's dims, against 2 x (C + rope + C) = 2,176 in the latent space, and in light tiles (64 queries of one
head, head dims 192 and 128) that keep several programs on a multiprocessor. A program takes BLOCK_M adjacent rows
of one head; their keys are the rows from the first row of the first fresh row's prompt to the last fresh row, each
query masked to its own prompt and causal. Rows that are not fresh are left to the absorbed kernel (it gives them
their whole context; the caller zeroes the fresh rows' contexts there). No host synchronisation: the key range
follows from first_rows and fresh on the device, so the call can be captured in a graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3.kernels import pdl

LOG2_E = 1.4426950408889634


@triton.jit
def _prompt_attention(q_nope, q_pe, k_nope, k_pe, v, first_rows, fresh, out, softmax_scale,  # scale * log2(e)
                      num_rows, nope, rope, v_dim, stride_qn, stride_qh, stride_pn, stride_ph, stride_kn, stride_kh,
                      stride_en, stride_vn, stride_vh, stride_on, stride_oh,
                      NOPE: tl.constexpr, ROPE: tl.constexpr, V: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, USE_GDC: tl.constexpr):
    """NOPE, ROPE, V: the head dims, each rounded up to a power of two >= 16 in its tiles (the rest masked)."""
    pdl.start(USE_GDC)
    head, block = tl.program_id(0), tl.program_id(1)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    mine = tl.load(fresh + rows, mask=row_ok, other=0) != 0
    first = tl.load(first_rows + rows, mask=row_ok, other=0)
    lo = tl.min(tl.where(mine, first, num_rows), 0)                       # the block's keys: lo..hi-1
    hi = tl.max(tl.where(mine, rows + 1, 0), 0)
    d, r, e = tl.arange(0, NOPE), tl.arange(0, ROPE), tl.arange(0, V)
    d_ok, r_ok, e_ok = d < nope, r < rope, e < v_dim
    qn = tl.load(q_nope + rows[:, None] * stride_qn + head * stride_qh + d[None, :],
                 mask=mine[:, None] & d_ok[None, :], other=0.0)
    qp = tl.load(q_pe + rows[:, None] * stride_pn + head * stride_ph + r[None, :], mask=mine[:, None] & r_ok[None, :],
                 other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, V], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        kn = tl.load(k_nope + keys[:, None] * stride_kn + head * stride_kh + d[None, :],
                     mask=key_ok[:, None] & d_ok[None, :], other=0.0)       # (BLOCK_N, NOPE)
        kp = tl.load(k_pe + keys[:, None] * stride_en + r[None, :], mask=key_ok[:, None] & r_ok[None, :], other=0.0)
        vv = tl.load(v + keys[:, None] * stride_vn + head * stride_vh + e[None, :],
                     mask=key_ok[:, None] & e_ok[None, :], other=0.0)
        s = tl.dot(qn, tl.trans(kn)) + tl.dot(qp, tl.trans(kp))            # (BLOCK_M, BLOCK_N)
        visible = mine[:, None] & (keys[None, :] >= first[:, None]) & (keys[None, :] <= rows[:, None])
        s = tl.where(visible, s * softmax_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)                # a query that sees nothing yet
        alpha = tl.exp2(m - shift)
        p = tl.exp2(s - shift[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
        m = m_new
    result = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out + rows[:, None] * stride_on + head * stride_oh + e[None, :], result.to(out.dtype.element_ty),
             mask=mine[:, None] & e_ok[None, :])


def prompt_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                     v: torch.Tensor, first_rows: torch.Tensor, fresh: torch.Tensor, softmax_scale: float,
                     out: torch.Tensor, block_m: int = 64, block_n: int = 64, num_warps: int = 4,
                     num_stages: int = 2) -> torch.Tensor:
    """Same arguments and result as reference.prompt_attention (any strides but a contiguous last dim)."""
    n, heads, nope = q_nope.shape
    rope, v_dim = q_pe.shape[-1], v.shape[-1]
    for name, t in (("q_nope", q_nope), ("q_pe", q_pe), ("k_nope", k_nope), ("k_pe", k_pe), ("v", v), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"prompt_attention needs {name}'s last dim contiguous")

    def tile(dim: int) -> int:
        return max(16, triton.next_power_of_2(dim))

    _prompt_attention[(heads, triton.cdiv(n, block_m))](
        q_nope, q_pe, k_nope, k_pe, v, first_rows, fresh, out, softmax_scale * LOG2_E, n, nope, rope, v_dim,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), k_nope.stride(0), k_nope.stride(1),
        k_pe.stride(0), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        NOPE=tile(nope), ROPE=tile(rope), V=tile(v_dim), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        num_stages=num_stages, **pdl.launch(q_nope))
    return out
