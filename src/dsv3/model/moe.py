"""DeepSeekMoE (V3 §2.1.2): a sigmoid router with auxiliary-loss-free bias, packed routed experts, shared experts."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.kernels import dispatch
from dsv3.model.layers import FP8, ColumnParallelLinear, RowParallelLinear, make_weight
from dsv3.parallel import SINGLE, Parallel, Shard


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense first layers and the shared experts. Split over tensor-parallel ranks."""

    def __init__(self, dim: int, inter: int, par: Parallel = SINGLE, dtype: torch.dtype = torch.bfloat16,
                 quant=None, reduce: bool = True):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(dim, inter, par, dtype=dtype, quant=quant)
        self.up_proj = ColumnParallelLinear(dim, inter, par, dtype=dtype, quant=quant)
        self.down_proj = RowParallelLinear(inter, dim, par, reduce=reduce, dtype=dtype, quant=quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(dispatch.silu_mul(self.gate_proj(x), self.up_proj(x)))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate, up and down weights as stored, for kernels that run this MLP themselves."""
        return self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight


class Gate(nn.Module):
    """Chooses num_experts_per_tok experts per token (V3 §2.1.2, Eq. 13-16; §2.1.2 'auxiliary-loss-free').

    Affinities are sigmoid scores. The correction bias only steers the choice; the gating weights come
    from the unbiased scores. Experts fall in n_group groups, each scored by the sum of its two best
    biased scores; only the best topk_group groups stay eligible (DeepSeek sets the rest to -inf).
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=dtype))
        # Updated by the trainer after each step (bias_i += gamma * sign(mean_load - load_i)), never by gradients.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, D) -> gating weights (N, k) float32, expert ids (N, k), scores (N, E) float32 (reference.route)."""
        return dispatch.route(x, self.weight, self.e_score_correction_bias, self.top_k, self.n_group,
                              self.topk_group, self.norm_topk_prob, self.scaling)


class Experts(nn.Module):
    """The routed experts of this rank, packed: gate_up_proj (E, 2I, D), down_proj (E, D, I).

    The forward sorts the (token, expert) pairs by expert and runs one grouped GEMM per projection,
    with no Python loop over experts. Expert parallel: this rank holds experts
    [first, first + n_local); pairs routed elsewhere contribute zero here. Tensor parallel (no expert
    parallel, several ranks): every rank holds every expert's slice of the intermediate dim (its part
    of gate and of up rows, its part of down's columns), and the partial sums meet in the MoE's all-reduce.
    """

    def __init__(self, cfg: ModelConfig, par: Parallel = SINGLE, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.n_local = par.split(cfg.n_routed_experts, "n_routed_experts", by=par.ep_size)
        self.first = par.ep_rank * self.n_local
        self.all_local = par.ep_size == 1       # every expert id the router gives is one of this rank's
        dim, inter = cfg.hidden_size, cfg.moe_intermediate_size
        if par.ep_size > 1:
            up_shard = down_shard = Shard(0, par.ep_rank, par.ep_size)
        elif par.tp_size > 1:
            inter = par.split(inter, "moe_intermediate_size")
            up_shard, down_shard = Shard(1, par.tp_rank, par.tp_size), Shard(2, par.tp_rank, par.tp_size)
        else:
            up_shard = down_shard = None
        self.gate_up_proj, scale = make_weight((self.n_local, 2 * inter, dim), dtype, cfg.quant, up_shard)
        self.register_parameter("gate_up_proj_scale_inv", scale)
        self.down_proj, scale = make_weight((self.n_local, dim, inter), dtype, cfg.quant, down_shard)
        self.register_parameter("down_proj_scale_inv", scale)

    def dense(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        w = getattr(self, name)
        if w.dtype == FP8:
            return dispatch.fp8_dequantize(w, getattr(self, name + "_scale_inv"), dtype)
        return w.to(dtype)

    def takes_shared(self, x: torch.Tensor, shared: MLP) -> bool:
        """Whether forward(shared_mlp=shared) runs the shared experts inside the routed experts' kernels here."""
        return dispatch.shared_experts_inline(x, self.gate_up_proj, self.gate_up_proj_scale_inv, self.down_proj,
                                              self.all_local, shared.weights())

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, shared: torch.Tensor | None = None,
                join: Callable[[], None] = lambda: None, shared_mlp: MLP | None = None) -> torch.Tensor:
        """x: (N, D), indices/weights: (N, k) -> (N, D) float32, the weighted sum over this rank's experts.
        Given the shared experts' output: that sum plus it, in x's dtype (dispatch.moe_combine), join()
        called before shared is read. Given the shared experts themselves (only where takes_shared): the same,
        computed in the routed experts' kernels."""
        if shared_mlp is not None:
            return dispatch.fused_experts(x, indices, weights, self.gate_up_proj, None, self.down_proj, None,
                                          all_local=True, shared_mlp=shared_mlp.weights())
        if dispatch.fused_experts_available(x, self.gate_up_proj, indices.numel()):
            local = indices - self.first if self.first else indices                  # rank 0: no subtraction kernel
            return dispatch.fused_experts(x, local, weights, self.gate_up_proj, self.gate_up_proj_scale_inv,
                                          self.down_proj, self.down_proj_scale_inv, all_local=self.all_local,
                                          shared=shared, join=join)
        k = indices.shape[1]
        local = (indices - self.first).flatten()                                # (N*k,)
        mine = (local >= 0) & (local < self.n_local)
        local = torch.where(mine, local, self.n_local)                            # others sort last
        # The narrowest key that holds an expert id: the GPU's radix sort makes one pass per key byte (moonlight
        # batch 256 on an H100: 29 us a layer with int64 keys).
        key = torch.uint8 if self.n_local < 256 else torch.int16 if self.n_local < 2**15 else torch.int32
        order = torch.argsort(local.to(key), stable=True)
        # scatter_add, not bincount: bincount reads the max back to the host, which a CUDA graph forbids.
        counts = torch.zeros(self.n_local + 1, dtype=torch.int64, device=x.device).scatter_add_(
            0, local, torch.ones_like(local))[: self.n_local]
        token = order // k
        # Under autocast (bf16 training on float32 weights) the grouped GEMMs run in the autocast dtype, as F.linear does.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        xs = x[token].to(dtype)                                                  # (N*k, D) grouped by expert
        gate, up = dispatch.grouped_mm(xs, self.dense("gate_up_proj", dtype), counts).chunk(2, dim=-1)
        ys = dispatch.grouped_mm(dispatch.silu_mul(gate, up), self.dense("down_proj", dtype), counts)  # (N*k, D)
        routed = dispatch.expert_sum(ys, order, mine, weights)
        if shared is None:
            return routed
        join()
        return dispatch.moe_combine(routed, shared, x.dtype)


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, top_k: int) -> torch.Tensor:
    """Complementary sequence-wise balance loss (V3 §2.1.2, Eq. 17-20), before the factor alpha.

    scores: (B, T, E) sigmoid affinities; indices: (B, T, k). f_i = E / (k T) * #tokens choosing i,
    P_i = mean over the sequence of the normalised affinity s_i / sum_j s_j; loss = sum_i f_i P_i, averaged over B.
    """
    n_experts, seq_len = scores.shape[-1], scores.shape[1]
    chosen = torch.zeros_like(scores).scatter_(-1, indices, 1.0)                # (B, T, E)
    f = chosen.sum(1) * n_experts / (top_k * seq_len)                           # (B, E)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)                          # (B, E)
    return (f * p).sum(-1).mean()


class MoE(nn.Module):
    """Routed experts weighted by the gate, plus the always-on shared experts; one all-reduce at the end."""

    def __init__(self, cfg: ModelConfig, par: Parallel = SINGLE, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.par, self.top_k = par, cfg.num_experts_per_tok
        self.gate = Gate(cfg, dtype)
        self.experts = Experts(cfg, par, dtype)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, par, dtype,
                                  cfg.quant, reduce=False)
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                                          # (N, D)
        if not self.training and self.experts.takes_shared(flat, self.shared_experts):  # one token: in the same kernels
            weights, indices, _ = self.gate(flat)
            out = self.experts(flat, indices, weights, shared_mlp=self.shared_experts)
            return self.par.all_reduce(out).view(shape)
        with (fork := dispatch.Fork(flat)):            # decode sizes: the shared experts beside the routed ones
            shared = self.shared_experts(flat)
        weights, indices, scores = self.gate(flat)
        if self.training:
            # Loads feed the bias update after the optimizer step; the balance loss is added by the trainer.
            self.expert_load.scatter_add_(0, indices.flatten(), torch.ones(indices.numel(), device=x.device))
            if len(shape) == 3:
                self.balance_loss = sequence_balance_loss(scores.view(*shape[:2], -1),
                                                          indices.view(*shape[:2], -1), self.top_k)
        out = self.experts(flat, indices, weights, shared, fork.join)               # routed + shared
        return self.par.all_reduce(out).view(shape)
