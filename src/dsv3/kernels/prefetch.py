"""Weights read into the GPU's L2 cache ahead of the kernel that needs them (Hopper's bulk L2 prefetch).

At batch 1 a MoE layer is two halves: the attention is a chain of short dependent kernels that moves little
(moonlight-16b on an H100: ~20 MB in ~23 us), then the experts stream ~140 MB at the bandwidth limit. The
shared experts' weights are known before the router runs, so a kernel on a side stream asks the memory
system to bring them into L2 while the attention chain runs, and the expert GEMVs then read them from L2
(bench/NOTES.md has what it measured). A prefetch changes no value anywhere: it is a hint to the cache.

`cp.async.bulk.prefetch.L2` takes an address and a byte count and returns at once, so one warp issues
megabytes; SLEEP_NS between rounds spreads them out, so they leave bandwidth to the chain beside them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

CHUNK = 16384       # bytes one lane asks for at a time
LANES = 32          # one warp a program

_ASM = tl.constexpr("{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }")
_ASM_EVICT_LAST = tl.constexpr("{ .reg .pred p; .reg .b64 pol; setp.gt.s32 p, $2, 0; "
                   "createpolicy.fractional.L2::evict_last.b64 pol, 1.0; "
                   "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; mov.u32 $0, 0; }")


@triton.jit
def _prefetch_l2(base0, bytes0, base1, bytes1, base2, bytes2, CHUNK: tl.constexpr, LANES: tl.constexpr,
                 ROUNDS: tl.constexpr, SLEEP_NS: tl.constexpr, EVICT_LAST: tl.constexpr):
    """Program (p, t) asks for chunks (r * P + p) * LANES + lane of tensor t, r = 0..ROUNDS-1: round 0 of
    every program covers the tensor's first bytes, which its reader needs first."""
    t = tl.program_id(1)
    if t == 0:
        base, nbytes = base0.to(tl.int64), bytes0
    elif t == 1:
        base, nbytes = base1.to(tl.int64), bytes1
    else:
        base, nbytes = base2.to(tl.int64), bytes2
    lane = tl.arange(0, LANES).to(tl.int64)
    for r in range(ROUNDS):
        start = ((r * tl.num_programs(0) + tl.program_id(0)) * LANES + lane) * CHUNK
        size = tl.minimum(tl.maximum(nbytes - start, 0), CHUNK).to(tl.int32)
        if EVICT_LAST:
            tl.inline_asm_elementwise(_ASM_EVICT_LAST, "=r,l,r", [base + start, size], dtype=tl.int32, is_pure=False,
                                      pack=1)
        else:
            tl.inline_asm_elementwise(_ASM, "=r,l,r", [base + start, size], dtype=tl.int32, is_pure=False, pack=1)
        if SLEEP_NS > 0:
            tl.inline_asm_elementwise("nanosleep.u32 $1; mov.u32 $0, 0;", "=r,r", [tl.full([LANES], SLEEP_NS, tl.int32)],
                                      dtype=tl.int32,
                                      is_pure=False, pack=1)


@functools.lru_cache(maxsize=None)
def supported(device: torch.device) -> bool:
    """Hopper or later (the bulk prefetch is sm_90's)."""
    return torch.cuda.get_device_capability(device)[0] >= 9


def prefetch_l2(tensors: list[torch.Tensor], max_bytes: int, programs: int = 8, sleep_ns: int = 0,
                evict_last: bool = True) -> int:
    """Ask for the first max_bytes of tensors (contiguous, in order) to be read into L2 -> bytes asked for.
    Queued on the current stream; it returns as soon as the requests are issued."""
    spans = []
    for t in tensors:
        if max_bytes <= 0 or len(spans) == 3:
            break
        if not t.is_contiguous() or t.data_ptr() % 16:
            raise ValueError("prefetch_l2 takes contiguous tensors at 16-byte aligned addresses")
        nbytes = min(t.numel() * t.element_size(), max_bytes) // 16 * 16
        spans.append((t.view(torch.uint8) if t.dtype != torch.uint8 else t, nbytes))
        max_bytes -= nbytes
    if not spans:
        return 0
    rounds = triton.cdiv(triton.cdiv(max(n for _, n in spans), CHUNK), programs * LANES)
    args = [a for span in spans + [spans[0]] * (3 - len(spans)) for a in span]
    _prefetch_l2[(programs, len(spans))](*args, CHUNK=CHUNK, LANES=LANES, ROUNDS=rounds, SLEEP_NS=sleep_ns,
                                         EVICT_LAST=evict_last, num_warps=1)
    return sum(n for _, n in spans)
