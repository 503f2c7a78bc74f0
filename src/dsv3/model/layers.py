"""The small parts: RMSNorm, linears (BF16 or FP8 128x128 block-scaled, sliced for tensor parallel),
vocab-parallel embedding and LM head, and YaRN rotary embeddings in DeepSeek's interleaved layout."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig, QuantConfig
from dsv3.kernels import dispatch
from dsv3.parallel import SINGLE, Parallel, Shard

FP8 = torch.float8_e4m3fn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """As transformers (reference.rms_norm). Given the residual stream: (norm of residual + x,
        residual + x), the add and the norm in one kernel on the GPU."""
        return dispatch.rms_norm(x, self.weight, self.eps, residual)


def block_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """One scale per block over the last two dims; edge blocks are partial (ceil division)."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def make_weight(shape: tuple[int, ...], dtype: torch.dtype, quant: QuantConfig | None,
                shard: Shard | None = None) -> tuple[nn.Parameter, nn.Parameter | None]:
    """A weight and, for FP8, its float32 `weight_scale_inv` (the checkpoint's name: weight = fp8 * scale)."""
    if quant is None:
        weight = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=dtype.is_floating_point)
        scale = None
    else:
        weight = nn.Parameter(torch.empty(shape, dtype=FP8), requires_grad=False)
        scale = nn.Parameter(torch.ones(block_scale_shape(shape, quant.weight_block_size), dtype=torch.float32),
                             requires_grad=False)
        scale.shard = shard
        scale.block = quant.weight_block_size
    weight.shard = shard
    return weight, scale


class Linear(nn.Module):
    """y = x W^T (+ b). W is bf16/fp32, or FP8 e4m3 with one float32 scale per 128x128 block.

    `shard` records how this rank's W is cut from the full checkpoint tensor; the checkpoint loader
    reads only that slice. Subclasses name the split, as DeepSeek's inference code does.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.bfloat16,
                 quant: QuantConfig | None = None, shard: Shard | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight, scale = make_weight((out_features, in_features), dtype, quant, shard)
        if scale is not None:
            self.weight_scale_inv = scale
        else:
            self.register_parameter("weight_scale_inv", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype))
            self.bias.shard = shard if shard is not None and shard.dim == 0 else None
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == FP8:
            y = dispatch.fp8_linear(x, self.weight, self.weight_scale_inv)
            return y if self.bias is None else y + self.bias
        return dispatch.linear(x, self.weight, self.bias)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W as a plain matrix (dequantized when FP8): the absorbed MLA needs kv_b_proj this way."""
        if self.weight.dtype == FP8:
            return dispatch.fp8_dequantize(self.weight, self.weight_scale_inv, dtype or torch.bfloat16)
        return self.weight if dtype is None else self.weight.to(dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype}"


class ColumnParallelLinear(Linear):
    """Output features split over the tensor-parallel ranks; no communication."""

    def __init__(self, in_features: int, out_features: int, par: Parallel = SINGLE, **kw):
        local = par.split(out_features, f"output features of a column-parallel linear ({out_features})")
        super().__init__(in_features, local, shard=Shard(0, par.tp_rank, par.tp_size) if par.tp_size > 1 else None, **kw)


class RowParallelLinear(Linear):
    """Input features split over the ranks; the partial products are summed by one all-reduce."""

    def __init__(self, in_features: int, out_features: int, par: Parallel = SINGLE, reduce: bool = True, **kw):
        local = par.split(in_features, f"input features of a row-parallel linear ({in_features})")
        super().__init__(local, out_features, shard=Shard(1, par.tp_rank, par.tp_size) if par.tp_size > 1 else None, **kw)
        self.par, self.reduce = par, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return self.par.all_reduce(y) if self.reduce else y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over the ranks; each rank looks up its own ids and the results are summed."""

    def __init__(self, vocab_size: int, dim: int, par: Parallel = SINGLE, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.par = par
        local = par.split(vocab_size, "vocab_size")
        self.start = par.tp_rank * local
        self.weight = nn.Parameter(torch.empty(local, dim, dtype=dtype))
        self.weight.shard = Shard(0, par.tp_rank, par.tp_size) if par.tp_size > 1 else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.par.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y = y.masked_fill(outside.unsqueeze(-1), 0)
        return self.par.all_reduce(y)


class ParallelLMHead(ColumnParallelLinear):
    """The output projection, vocabulary split over the ranks; logits gathered to every rank in float32."""

    def __init__(self, dim: int, vocab_size: int, par: Parallel = SINGLE, dtype: torch.dtype = torch.bfloat16):
        super().__init__(dim, vocab_size, par=par, dtype=dtype)
        self.par = par

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.par.all_gather_last_dim(dispatch.linear(x, self.weight, self.bias, out_dtype=torch.float32))


# ---- rotary embeddings ---------------------------------------------------------------------------

def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary dims; YaRN blends interpolated and extrapolated ones.

    Same formula as DeepSeek's precompute_freqs_cis and transformers' _compute_yarn_parameters.
    """
    r, dim = cfg.rope, cfg.qk_rope_head_dim
    freqs = 1.0 / (r.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if r.type != "yarn":
        return freqs

    def correction_dim(rotations: float) -> float:
        return dim * math.log(r.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(r.theta))

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    return freqs / r.factor * (1 - extrapolate) + freqs * extrapolate


class Rotary(nn.Module):
    """Rotation angles by position, computed once per forward and shared by every layer: a complex
    tensor cos + i sin (times YaRN's cos/sin scale), (..., rope/2), that reference.apply_rotary applies."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.scale = cfg.rope.cos_sin_scale
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.table: torch.Tensor | None = None
        self.retired: list[torch.Tensor] = []

    def cache(self, positions: int) -> None:
        """Keep the rotations of positions 0..positions-1 (at least; the engine's max_model_len): a step then
        looks its positions up in one kernel, where computing them takes four (a decode step's head on a GPU).
        A table only grows, and one outgrown stays alive: CUDA graphs captured by an engine read it by address
        and would read freed memory once a second engine on the same model made a new one."""
        if self.table is not None and self.table.shape[0] >= positions:
            return
        if self.table is not None:
            self.retired.append(self.table)
        self.table = self.rotations(torch.arange(positions, device=self.inv_freq.device))

    def rotations(self, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.float().unsqueeze(-1) * self.inv_freq
        return torch.polar(torch.full_like(angles, self.scale), angles)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """The rotations of positions (any shape); with a table (`cache`), every position must be in it."""
        return self.table[positions] if self.table is not None else self.rotations(positions)

