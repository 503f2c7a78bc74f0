"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1).

Keys and values are compressed into one latent per token: c_kv = RMSNorm(W_DKV x) (kv_lora_rank
values) plus one rotary key k_pe shared by all heads (qk_rope_head_dim values). Only those
576 values per token per layer are cached.

Two forms of the same function:
- expanded: k_nope, v = W_UK c_kv, W_UV c_kv for every head, then ordinary attention. Cheapest when
  many queries share the keys (prefill, training).
- absorbed: W_UK moves into the query (q_latent = q_nope W_UK) and W_UV into the output, so attention
  runs straight on the latent cache. Cheapest for decode, where the expanded keys would be rebuilt
  for one query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.kernels import dispatch
from dsv3.kernels.reference import apply_rotary
from dsv3.model.layers import FP8, ColumnParallelLinear, Linear, RMSNorm, RowParallelLinear
from dsv3.parallel import SINGLE, Parallel


@dataclass
class PagedBatch:
    """A flat batch of N new tokens from S sequences, and where their latents live in the paged cache.

    The engine fills it; the model only reads it. Tokens of sequence s are rows
    query_starts[s]:query_starts[s+1] of the flat batch, the last ones of its context_lens[s] tokens.
    """
    query_starts: list[int]          # (S+1,) host-side offsets of each sequence's new tokens
    context_lens: torch.Tensor       # (S,) tokens in the cache after this step, int32
    block_tables: torch.Tensor       # (S, max_blocks) block ids, int32
    slot_mapping: torch.Tensor       # (N,) flat cache slot of each new token, int64
    latent_caches: list[torch.Tensor]  # per layer: (num_blocks, block_size, kv_lora_rank + rope)
    decode_only: bool = False        # every sequence brings exactly one token: the absorbed path
    context_lens_host: list[int] | None = None  # context_lens on the host, when the engine has them
    # Rows mode with prompt rows: each attention row's sequence's first row in the step. The rows of a prompt that
    # starts in the step then attend in the expanded form (MLA.rows_attention); None: every row absorbed.
    first_rows: torch.Tensor | None = None

    def host_context_lens(self) -> list[int]:
        """context_lens as a list, read from the device at most once per batch (a read waits for the GPU)."""
        if self.context_lens_host is None:
            self.context_lens_host = self.context_lens.tolist()
        return self.context_lens_host

    def fresh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """With first_rows: which rows are fresh (their prompt's first row in the step is at position 0, so their
        whole context is in the step), and the contexts the absorbed attention takes (0 for the fresh rows). Made
        on the device once per batch, by its first layer (inside a graph's capture: the replays remake them); the
        runner makes a batch per step."""
        if not hasattr(self, "_fresh"):
            fresh = self.context_lens[self.first_rows.long()] == 1
            self._fresh = fresh, torch.where(fresh, 0, self.context_lens)
        return self._fresh

    def plan(self) -> PrefillPlan:
        """How a step that is not decode-only splits, made once per step (every layer splits the same way)."""
        if not hasattr(self, "_plan"):
            self._plan = PrefillPlan.of(self)
        return self._plan


@dataclass
class PrefillPlan:
    """A prefilling step's sequences in three kinds, each attended its cheapest way:
    - decoding (one new token): the absorbed decode kernel, all together, as in a decode step;
    - fresh (a whole prompt from position 0): keys from one gather and one kv_b_proj over all their tokens,
      one attention call per distinct prompt length;
    - continuing (a later chunk of a chunked prefill): each over its context read from its blocks.
    Continuous batching mixes all three in one step; before, every sequence of a mixed step took its own
    pass (a few dozen kernels a sequence a layer, host-bound)."""
    decode: tuple[torch.Tensor, PagedBatch] | None            # (rows, a decode-only batch of them)
    fresh_rows: torch.Tensor | None                           # (F,) the fresh sequences' rows; None: every row
    fresh_groups: list[tuple[int, torch.Tensor | slice]]      # (length, its rows within fresh_rows' order)
    continuing: list[int]                                     # sequence indices

    @staticmethod
    def of(batch: PagedBatch) -> PrefillPlan:
        starts, ctx = batch.query_starts, batch.host_context_lens()
        device = batch.slot_mapping.device
        ones, fresh, continuing = [], [], []
        for s, (lo, hi) in enumerate(zip(starts, starts[1:])):
            (ones if hi - lo == 1 else fresh if hi - lo == ctx[s] else continuing).append(s)
        decode = None
        if ones:
            rows, seqs = torch.tensor([starts[s] for s in ones], device=device), torch.tensor(ones, device=device)
            decode = rows, PagedBatch(list(range(len(ones) + 1)), batch.context_lens[seqs], batch.block_tables[seqs],
                                      batch.slot_mapping[rows], batch.latent_caches, decode_only=True)
        # Fresh rows in their order in the step; each length's rows as positions in that order.
        everything = len(fresh) == len(starts) - 1
        offsets, at, by_length = [], 0, {}
        for s in fresh:
            n = starts[s + 1] - starts[s]
            offsets.append(at)
            by_length.setdefault(n, []).append(at)
            at += n
        groups = []
        for n, firsts in by_length.items():
            if len(by_length) == 1:
                groups.append((n, slice(None)))
            else:
                groups.append((n, torch.tensor([f + i for f in firsts for i in range(n)], device=device)))
        fresh_rows = None if everything else torch.tensor(
            [r for s in fresh for r in range(starts[s], starts[s + 1])], device=device, dtype=torch.long)
        return PrefillPlan(decode, fresh_rows, groups if fresh else [], continuing)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, par: Parallel = SINGLE, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = par.split(cfg.num_attention_heads, "num_attention_heads")  # heads on this rank
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        kw = dict(dtype=dtype, quant=cfg.quant)
        q_out = cfg.num_attention_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(cfg.hidden_size, q_out, par, **kw)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias, **kw)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype)
            self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, q_out, par, **kw)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.latent_dim, bias=cfg.attention_bias, **kw)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, dtype)
        self.kv_b_proj = ColumnParallelLinear(cfg.kv_lora_rank, cfg.num_attention_heads * (self.nope + self.v_dim),
                                              par, **kw)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * self.v_dim, cfg.hidden_size, par,
                                        bias=cfg.attention_bias, **kw)
        self.interleaved = cfg.rope_interleave

    def forward(self, x: torch.Tensor, rope: torch.Tensor, batch: PagedBatch | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D) and rope (B, T, rope/2) with no cache, or (N, D) and (N, rope/2) with a PagedBatch;
        rope holds the rotation of each token's position (layers.Rotary)."""
        first = self.q_proj if hasattr(self, "q_proj") else self.q_a_proj
        kv_a = self.kv_a_proj_with_mqa                                      # -> (..., kv_lora_rank + rope)
        pair = (dispatch.linear_pair(x, first.weight, kv_a.weight)          # decode sizes: one launch for both
                if first.bias is None and kv_a.bias is None else None)
        if pair is not None:
            q, kv = pair
        else:
            with (fork := dispatch.Fork(x)):                                # else kv_a beside the query
                kv = kv_a(x)
            q = first(x)
            fork.join()
        if not hasattr(self, "q_proj"):
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.unflatten(-1, (self.n_heads, self.nope + self.rope_dim))      # (..., H, nope + rope)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)

        if batch is None:
            latent, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
            latent = self.kv_a_layernorm(latent)                            # (..., kv_lora_rank)
            q_pe = apply_rotary(q_pe, rope, self.interleaved)              # (..., H, rope)
            k_pe = apply_rotary(k_pe.unsqueeze(-2), rope, self.interleaved).squeeze(-2)  # (..., rope)
            out = self.expanded(q_nope, q_pe, latent, k_pe, causal_offset=0, key_mask=attention_mask)
        else:
            # The latent's norm, both rotations and the cache write: one kernel on the GPU.
            q_pe = dispatch.mla_rope_and_cache(q_pe, kv, rope, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps,
                                               batch.latent_caches[self.layer_idx], batch.slot_mapping,
                                               self.interleaved)
            if not batch.decode_only:
                out = self.paged_prefill(q_nope, q_pe, batch)
            elif batch.first_rows is not None and dispatch.OPTIONS.expand_prompts:
                out = self.rows_attention(q_nope, q_pe, batch)
            else:
                out = self.absorbed_decode(q_nope, q_pe, batch)
        return self.o_proj(out.flatten(-2))

    # ---- expanded form ---------------------------------------------------------------------------
    def expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                 causal_offset: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """q: (B, Tq, H, *) ; latent (B, Tk, C), k_pe (B, Tk, rope); query i sits at key position
        causal_offset + i. key_mask (B, Tk): 0 marks padding keys. Returns (B, Tq, H, v)."""
        k, v = self.expand_keys(latent, k_pe)                               # (B, Tk, H, *)
        q = torch.cat([q_nope, q_pe], dim=-1)
        tq, tk = q.shape[1], k.shape[1]
        if key_mask is None and causal_offset == 0 and tq == tk:  # plain causal: the flash kernel applies
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, scale=self.softmax_scale)
            return out.transpose(1, 2)
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(causal_offset)
        if key_mask is not None:
            # A padding query with no visible key would give NaN; let it see itself (its output is unused).
            diagonal = torch.eye(tq, tk, dtype=torch.bool, device=q.device).roll(causal_offset, dims=1)
            mask = (mask & key_mask.bool()[:, None, None, :]) | diagonal
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=self.softmax_scale)
        return out.transpose(1, 2)

    def expand_keys(self, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent (..., C), k_pe (..., rope) -> keys (..., H, nope + rope) and values (..., H, v)."""
        kv = self.kv_b_proj(latent).unflatten(-1, (self.n_heads, self.nope + self.v_dim))
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        return torch.cat([k_nope, k_pe.unsqueeze(-2).expand(*k_nope.shape[:-1], self.rope_dim)], dim=-1), v

    def paged_prefill(self, q_nope: torch.Tensor, q_pe: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """Each sequence's new tokens attend to its whole cached context (PrefillPlan: decoding, fresh and
        continuing sequences, each kind its own way). Returns (N, H, v)."""
        cache, plan = batch.latent_caches[self.layer_idx], batch.plan()
        if plan.fresh_rows is None and len(plan.fresh_groups) == 1:   # the usual prefill: whole prompts only
            return self.fresh_prefill(q_nope, q_pe, cache, batch.slot_mapping, plan.fresh_groups)
        out = q_nope.new_empty(*q_nope.shape[:2], self.v_dim)
        if plan.decode is not None:
            rows, decode = plan.decode
            out[rows] = self.absorbed_decode(q_nope[rows], q_pe[rows], decode)
        if plan.fresh_groups:
            rows = plan.fresh_rows if plan.fresh_rows is not None else slice(None)
            out[rows] = self.fresh_prefill(q_nope[rows], q_pe[rows], cache, batch.slot_mapping[rows], plan.fresh_groups)
        starts, ctx_lens = batch.query_starts, batch.host_context_lens()
        for s in plan.continuing:
            lo, hi = starts[s], starts[s + 1]
            out[lo:hi] = self.sequence_prefill(q_nope[lo:hi], q_pe[lo:hi], cache, batch.block_tables[s], ctx_lens[s])
        return out

    def fresh_prefill(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor,
                      groups: list[tuple[int, torch.Tensor | slice]]) -> torch.Tensor:
        """Whole prompts (their F tokens one after another): keys and values of every token from one gather
        of the latents just cached and one kv_b_proj GEMM; prompts of one length share one attention call."""
        kv = cache.view(-1, cache.shape[-1])[slots].to(q_nope.dtype)               # (F, C + rope), as cached
        latent, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k, v = self.expand_keys(latent, k_pe)                                       # (F, H, *)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = None if len(groups) == 1 else q.new_empty(*q.shape[:2], self.v_dim)
        for length, rows in groups:
            def heads_first(x: torch.Tensor) -> torch.Tensor:                       # (S, H, length, *)
                return x[rows].unflatten(0, (-1, length)).transpose(1, 2)

            o = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), is_causal=True,
                                               scale=self.softmax_scale).transpose(1, 2).flatten(0, 1)
            if out is None:
                return o
            out[rows] = o
        return out

    def sequence_prefill(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                         ctx: int) -> torch.Tensor:
        """One sequence's new tokens (the last of its ctx) over its context read from its cache blocks."""
        blocks = block_table[: -(-ctx // cache.shape[1])].long()
        kv = cache[blocks].flatten(0, 1)[:ctx].to(q_nope.dtype)                   # (ctx, C + rope)
        latent, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.expanded(q_nope[None], q_pe[None], latent[None], k_pe[None], causal_offset=ctx - len(q_nope))[0]

    # ---- absorbed form ---------------------------------------------------------------------------
    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head into W_UK (H, nope, C) and W_UV (H, v, C). An FP8 kv_b_proj is
        dequantized once and kept (as vLLM does after loading), not at every decode step: at V3's size
        that is 16 MB read and 33 MB written a layer a step, for 33 MB kept a layer."""
        weight = self.kv_b_proj.weight
        if weight.dtype == FP8 and not torch.is_grad_enabled():
            key = (weight.data_ptr(), weight._version, self.kv_b_proj.weight_scale_inv._version)
            if getattr(self, "_dequantized", (None,))[0] != key:
                self._dequantized = (key, self.kv_b_proj.dense_weight())
            w = self._dequantized[1]
        else:
            w = self.kv_b_proj.dense_weight()
        w = w.unflatten(0, (self.n_heads, self.nope + self.v_dim))
        return w[:, : self.nope], w[:, self.nope:]

    def absorbed_decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, batch: PagedBatch,
                        context_lens: torch.Tensor | None = None) -> torch.Tensor:
        """One query per sequence (or attention row), attention computed in the latent space (no keys or values
        expanded), over batch.context_lens or the context_lens given."""
        w_uk, w_uv = self.absorbed_weights()
        q_latent = dispatch.per_head(q_nope, w_uk.to(q_nope.dtype).transpose(1, 2))  # (S, H, C)
        return dispatch.mla_decode(q_latent, q_pe, batch.latent_caches[self.layer_idx], batch.block_tables,
                                   batch.context_lens if context_lens is None else context_lens, self.kv_lora_rank,
                                   self.softmax_scale, w_uv=w_uv.to(q_latent.dtype))  # (S, H, v)

    def rows_attention(self, q_nope: torch.Tensor, q_pe: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """A rows-mode step with prompt rows (batch.first_rows): the rows of prompts that start in the step
        (fresh) attend their prompt's rows in the expanded form, keys and values from one kv_b_proj GEMM over the
        latents just cached (kernels/mla_prompt.py); the others (decode rows, later chunks) in the absorbed form
        over their whole context, into which the fresh rows, with no context there, bring zeros and are then
        overwritten. Returns (N, H, v)."""
        fresh, absorbed_lens = batch.fresh()
        cache = batch.latent_caches[self.layer_idx]
        out = self.absorbed_decode(q_nope, q_pe, batch, absorbed_lens)
        kv = cache.view(-1, cache.shape[-1])[batch.slot_mapping].to(q_nope.dtype)   # (N, C + rope), as cached
        latent, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_nope, v = self.kv_b_proj(latent).unflatten(-1, (self.n_heads, self.nope + self.v_dim)).split(
            [self.nope, self.v_dim], dim=-1)
        return dispatch.prompt_attention(q_nope, q_pe, k_nope, k_pe, v, batch.first_rows, fresh, self.softmax_scale,
                                         out)

    def absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                 causal_offset: int = 0) -> torch.Tensor:
        """The absorbed form on contiguous (B, T) tensors: the definition tests compare with `expanded`."""
        w_uk, w_uv = self.absorbed_weights()
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk.to(q_nope.dtype))
        scores = torch.einsum("bthc,bsc->bhts", q_latent, latent) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)
        tq, tk = q_nope.shape[1], latent.shape[1]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=latent.device).tril(causal_offset)
        probs = (scores.float() * self.softmax_scale).masked_fill(~mask, float("-inf")).softmax(-1)
        out_latent = torch.einsum("bhts,bsc->bthc", probs.to(latent.dtype), latent)
        return torch.einsum("bthc,hvc->bthv", out_latent, w_uv.to(latent.dtype))
