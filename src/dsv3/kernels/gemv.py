"""y = x W^T for a few rows of x (decode), bf16 weights (Triton); F.linear defines it.

At batch 1 every projection of a decode step is a stream of weight bytes, and the chain of them is
latency-bound: a 2-12 MB GEMV costs ~6 us in cuBLAS or a tiled Triton GEMM, of which ~1-4 us moves
bytes (`bench/tune_decode.py --dense`). This kernel is built to overlap that latency instead: each
program loads its whole slice of W (BLOCK_N rows, all of K) before it waits for the kernel ahead of
it to finish (programmatic dependent launch, `pdl.py`), so the weight reads of the next projection run
while the previous kernel's tail does. Each row of x is reduced in float32, independently of the others.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3.kernels import pdl

MAX_ROWS = 4             # above this, cuBLAS (a tensor-core GEMM) wins
TILE_ELEMENTS = 8192     # weight elements a program holds: 16 KB of bf16 over 4 warps


@triton.jit
def _gemv(x, w, bias, out, M, N, K, stride_xm, stride_wn, stride_om,
          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr):
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    n_ok = n < N
    wt = tl.load(w + n.to(tl.int64)[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & (k < K)[None, :],
                 other=0.0).to(tl.float32)                                   # the weights: before the wait
    if HAS_BIAS:
        b = tl.load(bias + n, mask=n_ok, other=0.0).to(tl.float32)
    if USE_GDC:
        tl.extra.cuda.gdc_wait()                                             # x is the previous kernel's output
    for m in range(M):
        xv = tl.load(x + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        acc = tl.sum(wt * xv[None, :], axis=1)
        if HAS_BIAS:
            acc += b
        tl.store(out + m * stride_om + n, acc.to(out.dtype.element_ty), mask=n_ok)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.numel() // x.shape[-1]
    return (rows <= MAX_ROWS and weight.dtype in (torch.bfloat16, torch.float16) and x.dtype == weight.dtype
            and weight.stride(-1) == 1 and triton.next_power_of_2(weight.shape[1]) <= TILE_ELEMENTS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, block_n: int | None = None
           ) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., K) with at most MAX_ROWS rows; see `applies`."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    n, k = weight.shape
    block_k = triton.next_power_of_2(k)
    block_n = block_n or max(1, min(64, TILE_ELEMENTS // block_k))
    out = torch.empty(flat.shape[0], n, dtype=x.dtype, device=x.device)
    _gemv[(triton.cdiv(n, block_n),)](flat, weight, bias if bias is not None else weight, out, flat.shape[0], n, k,
                                      flat.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                                      BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, **pdl.launch(x))
    return out.view(*x.shape[:-1], n)
