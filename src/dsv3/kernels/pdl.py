"""Programmatic dependent launch (Hopper and later): a kernel starts while the one ahead of it in the
stream finishes, does the work that does not depend on it (loading weights), then waits for it.

A decode step at batch 1 is a chain of ~20 short kernels a layer, and each costs a few microseconds
of latency (launch, first loads, tail) beyond the bytes it moves. A kernel taking part:
- calls `gdc_launch_dependents()` first, so the next kernel may be scheduled as soon as all of this
  one's programs run;
- calls `gdc_wait()` before it reads anything an earlier kernel wrote, and before it writes anything.
  Since every such kernel waits, the one ahead finished only after its own predecessor had: the
  ordering is transitive, as without the launch attribute.
Before the wait a kernel reads only what no kernel of the step writes: weights, and the step's inputs
(context lengths, block tables), which the host copied before the step's first kernel ran, and the
cache rows of earlier steps (the MLA decode reads its first tile early, all but this step's new row).
A weight a kernel derives (the dequantized FP8 kv_b_proj, a dtype cast) is written by a kernel without
the attribute, and a taking-part kernel right after one of those starts only once it has finished (no
trigger means it triggers by finishing).
Kernels launched without the attribute (cuBLAS, PyTorch's) keep the plain stream order, and a kernel
with the instructions but without the attribute behaves as before (both are no-ops then).
DSV3_PDL=0 turns it off, for A/B runs.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("DSV3_PDL", "1") != "0"


@functools.lru_cache(maxsize=None)
def _supported(device: torch.device) -> bool:
    """Hopper or later, and a Triton that has the instructions (3.3 and later)."""
    return torch.cuda.get_device_capability(device)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait")


def launch(t: torch.Tensor) -> dict:
    """The launch options of a taking-part kernel for tensors on t's device: USE_GDC for the kernel's
    constexpr, and Triton's launch_pdl where the GPU has it (never in the interpreter)."""
    on = ENABLED and t.is_cuda and _supported(t.device)
    return dict(USE_GDC=True, launch_pdl=True) if on else dict(USE_GDC=False)


@triton.jit
def start(USE_GDC: tl.constexpr):
    """The first line of a taking-part kernel that needs its inputs at once: let the next kernel be
    scheduled, then wait for the previous one."""
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
