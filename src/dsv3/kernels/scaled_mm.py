"""FP8 linear through torch._scaled_mm (cuBLASLt) with DeepSeek's block scales; reference.fp8_linear defines it.

cuBLASLt on Hopper takes activations scaled per 1x128 block and weights per 128x128 block: DeepSeek's
own scheme (inference/kernel.py act_quant + fp8_gemm). Measured on an H100 (bench/results/
2026-11-22-NVIDIA-H100-80GB-HBM3-kernels.md) it runs 1250 TFLOP/s at M >= 2048 and beats the Triton
kernel in fp8_gemm.py at every M it accepts. It refused M = 1 (CUBLAS_STATUS_NOT_SUPPORTED) and
ran at M = 64, 2048 and 8192, so rows are padded to a multiple of 64; at M = 64 it was still faster
than the Triton kernel at M = 1.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
HAS_TRITON = importlib.util.find_spec("triton") is not None
ROW_MULTIPLE = 64


def supported(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> bool:
    """Where the measured call applies: bf16 on sm90 with torch's blockwise scaling, whole 128 blocks, and
    K / 128 a multiple of 4 (the scales' leading dimension; every V3 and R1 projection has it)."""
    n, k = weight.shape
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(F, "ScalingType")
            and torch.cuda.get_device_capability(x.device) == (9, 0)
            and n % 128 == 0 and k % 512 == 0 and tuple(scale_inv.shape) == (n // 128, k // 128)
            and weight.is_contiguous() and scale_inv.is_contiguous() and scale_inv.dtype == torch.float32)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> e4m3 (M, K) and float32 scales (M, K/128), amax / 448 per 1x128 block (DeepSeek's act_quant).

    The scales come column-major, as cuBLASLt reads them.
    """
    m, k = x.shape
    blocks = x.float().view(m, k // 128, 128)
    scale = blocks.abs().amax(-1).clamp(min=1e-12) / 448.0                            # (M, K/128)
    q = (blocks / scale[..., None]).clamp(-448.0, 448.0).to(FP8).view(m, k)
    return q, scale.t().contiguous().t()


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """y = x W^T for an e4m3 W (N, K) with (N/128, K/128) scales, where `supported`. On the GPU the padding and
    the activations' quantization are one Triton kernel (fp8_gemm.quantize_rows): in PyTorch they were ~11
    kernels, ~28 us before each GEMM at batch 1 (v3-slice timeline, bench/NOTES.md)."""
    flat = x.reshape(-1, x.shape[-1])                                                 # (M, K)
    rows = flat.shape[0]
    padded = -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE
    if flat.is_cuda and HAS_TRITON:
        from dsv3.kernels.fp8_gemm import quantize_rows
        xq, xs = quantize_rows(flat if flat.stride(-1) == 1 else flat.contiguous(), padded)
    else:
        if padded != rows:
            flat = F.pad(flat, (0, 0, 0, padded - rows))
        xq, xs = quantize_activations(flat)
    y = torch._scaled_mm(xq, weight.t(), xs, scale_inv.t(), out_dtype=x.dtype)        # (padded, N)
    return y[:rows].view(*x.shape[:-1], weight.shape[0])
