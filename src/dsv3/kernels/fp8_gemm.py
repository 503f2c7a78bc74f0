"""Block-scaled GEMM for FP8 checkpoints (Triton); reference.fp8_linear and reference.fp8_dequantize define it.

Weights are e4m3 with one float32 scale per 128x128 block (V3 §3.3.2, "fine-grained quantization").
One kernel serves the dense linear and the grouped GEMM of the routed experts:

- quantize_activations=True is DeepSeek's own scheme (inference/kernel.py act_quant + fp8_gemm):
  each token's activations are scaled per 128 columns to e4m3 on the fly (amax / 448), so the
  product runs on the FP8 tensor cores and the two scales multiply the partial sum of each K block.
- quantize_activations=False keeps the activations in bf16 and upcasts the weight tile instead; it
  computes the reference's function (W dequantized, then x W^T) up to the order of summation.

The K tile is the scale block, so each K step needs one weight scale per output column. The grouped
form reads rows of A through an index (the tokens routed to an expert, in blocks of BLOCK_M rows
that all belong to one expert) and takes that expert's weight; blocks marked -1 do nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3.kernels import pdl

from dsv3.kernels.reference import block_length

E4M3_MAX = 448.0


@triton.jit
def _k_step(x, w, scale, QUANTIZE_A: tl.constexpr, HAS_SCALE: tl.constexpr):
    """One BLOCK_K step of x w^T, times the weight block's scale (per output column) when FP8."""
    if QUANTIZE_A:
        # DeepSeek's act_quant: one scale per token per 128 columns, amax / 448.
        xf = x.to(tl.float32)
        x_scale = tl.maximum(tl.max(tl.abs(xf), 1), 1e-12) / 448.0
        part = tl.dot((xf / x_scale[:, None]).to(w.dtype), tl.trans(w)) * x_scale[:, None]
    else:
        part = tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_SCALE:
        part = part * scale[None, :]
    return part


@triton.jit
def _block_scaled_matmul(a, b, b_scale, c, a_rows, block_group, M, N, K, scale_block_n,
                         stride_am, stride_bg, stride_bn, stride_sg, stride_sn, stride_sk, stride_cm,
                         stride_ah, stride_bk, stride_ch,
                         HAS_SCALE: tl.constexpr, QUANTIZE_A: tl.constexpr, GATHER: tl.constexpr, SWIGLU: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         USE_GDC: tl.constexpr, SPLIT_K: tl.constexpr = 1):
    """c[m] = a[rows[m]] @ b[g]^T, g the group of m's block; b (G, N, K), its scales (G, N/bn, K/BLOCK_K).
    SWIGLU: b is (G, 2N, K), gate rows then up rows, and c[m] = silu(gate) * up, each rounded to c's dtype
    first as reference.silu_mul rounds them (the experts' SwiGLU product without a kernel of its own).
    Programs (., h) take head h: a, b and c start at h times their head strides (per_head's batched products).
    SPLIT_K > 1 (plain rows only): programs (., s) take the s-th of SPLIT_K parts of K, K / SPLIT_K columns rounded
    up to BLOCK_K, and store their float32 sums at c + s * stride_ch (a and b given head strides 0)."""
    pdl.start(USE_GDC)
    head = tl.program_id(1).to(tl.int64)
    a += head * stride_ah
    b += head * stride_bg
    c += head * stride_ch
    # Blocks of GROUP_M row tiles sweep the columns together, so their B tiles are shared in L2.
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if GATHER:
        group = tl.load(block_group + pid_m).to(tl.int64)
        source = tl.load(a_rows + rows, mask=rows < M, other=-1)
        row_ok = source >= 0
        k_end = tl.where(group >= 0, K, 0)     # a block no expert owns skips the loop
        b += tl.maximum(group, 0) * stride_bg
        b_scale += tl.maximum(group, 0) * stride_sg
    else:
        source = rows
        row_ok = rows < M
        k_end = K
    k_start = 0
    if SPLIT_K > 1:
        k_part = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_start = tl.program_id(1) * k_part
        k_end = tl.minimum(K, k_start + k_part)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a + source.to(tl.int64)[:, None] * stride_am + ks[None, :]                   # (BLOCK_M, BLOCK_K)
    b_ptrs = b + cols.to(tl.int64)[:, None] * stride_bn + ks[None, :] * stride_bk         # (BLOCK_N, BLOCK_K)
    s_ptrs = b_scale + (cols // scale_block_n) * stride_sn                                # (BLOCK_N,)
    up_ptrs = b_ptrs + N * stride_bn                                                      # SWIGLU's up rows
    up_s_ptrs = b_scale + ((cols + N) // scale_block_n) * stride_sn

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    scale = tl.full([BLOCK_N], 1.0, tl.float32)                                           # FP8: per column
    up_scale = tl.full([BLOCK_N], 1.0, tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = ks < K - k0
        x = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(b_ptrs + k0 * stride_bk, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_SCALE:
            scale = tl.load(s_ptrs + (k0 // BLOCK_K) * stride_sk, mask=col_ok, other=0.0)
        acc += _k_step(x, w, scale, QUANTIZE_A, HAS_SCALE)
        if SWIGLU:
            w_up = tl.load(up_ptrs + k0 * stride_bk, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if HAS_SCALE:
                up_scale = tl.load(up_s_ptrs + (k0 // BLOCK_K) * stride_sk, mask=col_ok, other=0.0)
            acc_up += _k_step(x, w_up, up_scale, QUANTIZE_A, HAS_SCALE)
    dtype = c.dtype.element_ty
    if SWIGLU:
        gate = acc.to(dtype).to(tl.float32)
        acc = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)
    tl.store(c + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :], acc.to(dtype),
             mask=(rows < M)[:, None] & col_ok[None, :])


@triton.jit
def _sum_splits(part, out, numel, SPLITS: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    """out = part[0] + part[1] + ... in that order (float32), rounded once to out's dtype: each element's sum in
    the same order whatever the shape."""
    pdl.start(USE_GDC)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < numel
    acc = tl.load(part + i, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLITS):
        acc += tl.load(part + s * numel + i, mask=ok, other=0.0)
    tl.store(out + i, acc.to(out.dtype.element_ty), mask=ok)


def gemm_config(m: int, n: int) -> dict:
    """Tile shapes by the number of rows: decode is a stream of weight bytes, prefill a tensor-core workload."""
    if m <= 16:  # BLOCK_K (bf16 weights only; FP8's is the scale block): 128 measured 6% faster at batch 1-8
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


# The deterministic mode's one launch for every matmul, whatever its number of rows: each output row is then
# its own input row's product, summed in the same order in a tile of the same shape.
FIXED_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)
FIXED_PROGRAMS = 512  # fixed_splits' aim: about this many programs for one row (an H200 has 132 multiprocessors)


def fixed_splits(n: int, k: int, block_k: int = 128) -> int:
    """How many parts of K the deterministic mode's GEMM of an (n, k) weight sums separately, then adds in order:
    a function of the weight's shape alone, so every row gets the same sums whatever the batch. Where the output
    has few column tiles (o_proj and down: 224 programs for 7,168 columns), one row's product would run on few
    multiprocessors, each through a long loop over K; up to 4 parts, each of at least 8 BLOCK_K steps."""
    tiles = triton.cdiv(n, FIXED_CONFIG["BLOCK_N"])
    splits = min(4, max(1, FIXED_PROGRAMS // tiles), max(1, k // (8 * block_k)))
    return 1 << (splits.bit_length() - 1)  # a power of two


def block_scaled_matmul(a: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor | None, out_rows: int,
                        a_rows: torch.Tensor | None = None, block_group: torch.Tensor | None = None,
                        quantize_activations: bool = True, config: dict | None = None, swiglu: bool = False,
                        out_dtype: torch.dtype | None = None, heads: bool = False, split_k: int = 1) -> torch.Tensor:
    """(out_rows, N) = rows of a times weight[group]^T; weight (G, N, K) e4m3 with scales (G, N/bn, K/bk), or bf16.

    Without a_rows, row m of the output is row m of a and G = 1. With them, output row m is
    a[a_rows[m]] (left unwritten when -1) times weight[block_group[m // BLOCK_M]], and config must
    carry the BLOCK_M the rows were laid out for. swiglu: weight holds gate then up rows, and the
    result is silu(gate) * up, (out_rows, N / 2). heads (16 bits only): a is (M, H, K) and weight (H, N, K),
    the result (M, H, N), head h's rows times weight[h]^T. The weight's last two dims may have any strides
    (16 bits; W_UK^T is a transposed view). out_dtype: the result's (default a's), rounded once from float32.
    split_k > 1 (plain rows of one weight): K in that many parts, their float32 sums added in order (_sum_splits).
    """
    if a.stride(-1) != 1:
        a = a.contiguous()
    groups, n, k = weight.shape
    has_scale = scale_inv is not None
    if has_scale:
        if weight.stride(-1) != 1:
            raise ValueError("block_scaled_matmul needs an FP8 weight's last dim contiguous")
        bn, bk = block_length(n, scale_inv.shape[-2]), block_length(k, scale_inv.shape[-1])
        block_k = bk
        quantize = quantize_activations
    else:
        bn, block_k, quantize = n, (config or {}).get("BLOCK_K", 64), False
        scale_inv = weight                                       # never read
    if block_k & (block_k - 1) or block_k < 16:
        raise ValueError(f"the scale block along K must be a power of two >= 16, got {block_k}")
    config = {key: v for key, v in (config or gemm_config(out_rows, n)).items() if key != "BLOCK_K"}
    if swiglu:
        if n % 2:
            raise ValueError(f"swiglu needs gate and up rows of equal count, got {n} rows")
        n //= 2
    n_heads = a.shape[1] if heads else 1
    if heads and (has_scale or a.dim() != 3 or n_heads != groups):
        raise ValueError(f"heads: a (M, H, K) and a 16-bit weight (H, N, K); got {tuple(a.shape)} and "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if split_k > 1 and (heads or swiglu or a_rows is not None or groups != 1):
        raise ValueError("split_k takes plain rows of one weight (no heads, swiglu or gathered rows)")
    out = torch.empty(out_rows, *([n_heads] if heads else []), n, dtype=out_dtype or a.dtype, device=a.device)
    if out_rows == 0:
        return out
    # Split K: programs (., s) write part s of the sums into c = part (the kernel's head axis, a and b not moved).
    c = torch.empty(split_k, out_rows, n, dtype=torch.float32, device=a.device) if split_k > 1 else out
    grid = (triton.cdiv(out_rows, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]), max(n_heads, split_k))
    sg, sn, sk = (scale_inv.stride(0), scale_inv.stride(1), scale_inv.stride(2)) if has_scale else (0, 0, 0)
    _block_scaled_matmul[grid](
        a, weight, scale_inv, c, a_rows if a_rows is not None else a, block_group if block_group is not None else a,
        out_rows, n, k, bn, a.stride(0), 0 if split_k > 1 else weight.stride(0), weight.stride(1), sg, sn, sk,
        c.stride(1) if split_k > 1 else out.stride(0), a.stride(1) if heads else 0, weight.stride(2),
        c.stride(0) if split_k > 1 else out.stride(1) if heads else 0,
        HAS_SCALE=has_scale, QUANTIZE_A=quantize, GATHER=a_rows is not None, SWIGLU=swiglu, BLOCK_K=block_k,
        GROUP_M=8, SPLIT_K=split_k, **config,
        **pdl.launch(a))
    if split_k > 1:
        block = 1024
        _sum_splits[(triton.cdiv(out.numel(), block),)](c, out, out.numel(), SPLITS=split_k, BLOCK=block,
                                                         **pdl.launch(a))
    return out


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, quantize_activations: bool = True,
               config: dict | None = None) -> torch.Tensor:
    """y = x W^T for an e4m3 W (N, K) with block scales (N/128, K/128); see reference.fp8_linear."""
    flat = x.reshape(-1, x.shape[-1])                                                     # (M, K)
    y = block_scaled_matmul(flat, weight.unsqueeze(0), scale_inv.unsqueeze(0), flat.shape[0],
                            quantize_activations=quantize_activations, config=config)
    return y.view(*x.shape[:-1], weight.shape[0])


def fixed_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None, quantize_activations: bool = True) -> torch.Tensor:
    """x W^T for a 16-bit W (N, K), or an e4m3 one with its block scales, in FIXED_CONFIG's launch (the
    deterministic mode): F.linear's (reference.fp8_linear's) function, each row independent of the others."""
    flat = x.reshape(-1, x.shape[-1])                                                     # (M, K)
    n, k = weight.shape
    y = block_scaled_matmul(flat, weight.unsqueeze(0), None if scale_inv is None else scale_inv.unsqueeze(0),
                            flat.shape[0], quantize_activations=quantize_activations, config=FIXED_CONFIG,
                            out_dtype=out_dtype, split_k=fixed_splits(n, k))
    return y.view(*x.shape[:-1], n)


def fixed_per_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """reference.per_head (x (M, H, K), weight (H, N, K) -> (M, H, N)) in FIXED_CONFIG's launch."""
    return block_scaled_matmul(x, weight.to(x.dtype), None, x.shape[0], config=FIXED_CONFIG, heads=True)


@triton.jit
def _fp8_dequantize(w, s, out, R, C, block_r, block_c, stride_wl, stride_wr, stride_sl, stride_sr, stride_ol, stride_or,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c, pid_r, lead = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (r < R)[:, None] & (c < C)[None, :]
    lead = lead.to(tl.int64)
    x = tl.load(w + lead * stride_wl + r[:, None] * stride_wr + c[None, :], mask=ok, other=0.0)
    scale = tl.load(s + lead * stride_sl + (r // block_r)[:, None] * stride_sr + (c // block_c)[None, :], mask=ok, other=0.0)
    tl.store(out + lead * stride_ol + r[:, None] * stride_or + c[None, :], (x.to(tl.float32) * scale).to(out.dtype.element_ty),
             mask=ok)


def fp8_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Same arguments and result as reference.fp8_dequantize, for any number of leading dims."""
    *lead, rows, cols = weight.shape
    w = weight.reshape(-1, rows, cols)
    s = scale_inv.reshape(-1, *scale_inv.shape[-2:])
    if w.stride(-1) != 1:
        w = w.contiguous()
    if s.stride(-1) != 1:
        s = s.contiguous()
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    block_r, block_c = block_length(rows, s.shape[-2]), block_length(cols, s.shape[-1])
    grid = (triton.cdiv(cols, 128), triton.cdiv(rows, 32), w.shape[0])
    _fp8_dequantize[grid](w, s, out, rows, cols, block_r, block_c, w.stride(0), w.stride(1), s.stride(0), s.stride(1),
                          out.stride(0), out.stride(1), BLOCK_R=32, BLOCK_C=128, num_warps=4)
    return out.view(*lead, rows, cols)


@triton.jit
def _quantize_rows(x, q, scale, M, stride_x, stride_q, stride_sm, stride_sk, USE_GDC: tl.constexpr):
    """Program (m, b): row m's columns b*128... as e4m3 and their scale amax / 448 (DeepSeek's act_quant);
    rows m >= M (padding) are zeros, as a zero row quantizes. Divisions round as PyTorch's do (div_rn)."""
    pdl.start(USE_GDC)
    m, b = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = b * 128 + tl.arange(0, 128)
    v = tl.load(x + m * stride_x + cols, mask=tl.where(m < M, cols >= 0, False), other=0.0).to(tl.float32)
    s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(v), 0), 1e-12), 448.0)
    quantized = tl.minimum(tl.maximum(tl.math.div_rn(v, s), -448.0), 448.0)
    tl.store(q + m * stride_q + cols, quantized.to(q.dtype.element_ty))
    tl.store(scale + m * stride_sm + b * stride_sk, s)


def quantize_rows(x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> e4m3 (rows, K) and float32 scales (rows, K/128), column-major, rows >= M padded with zero
    rows: scaled_mm.quantize_activations of x padded to `rows`, in one kernel instead of ~11."""
    m, k = x.shape
    if k % 128 or x.stride(-1) != 1:
        raise ValueError(f"quantize_rows needs whole 128-column blocks, contiguous: got {k} columns")
    q = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(k // 128, rows, dtype=torch.float32, device=x.device).t()        # column-major
    _quantize_rows[(rows, k // 128)](x, q, scale, m, x.stride(0), q.stride(0), scale.stride(0), scale.stride(1),
                                     num_warps=1, **pdl.launch(x))
    return q, scale
