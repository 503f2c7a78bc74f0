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

    def host_context_lens(self) -> list[int]:
        """context_lens as a list, read from the device at most once per batch (a read waits for the GPU)."""
        if self.context_lens_host is None:
            self.context_lens_host = self.context_lens.tolist()
        return self.context_lens_host

    def decode_part(self) -> tuple[torch.Tensor, PagedBatch, list[int]] | None:
        """A step that mixes decoding sequences (one new token each) with prefilling ones: the decoding
        rows, a decode-only batch of them, and the other sequences; None when the step does not mix.
        Made once per step: every layer splits the same way."""
        if not hasattr(self, "_decode_part"):
            starts = self.query_starts
            ones = [s for s in range(len(starts) - 1) if starts[s + 1] - starts[s] == 1]
            part = None
            if ones and len(ones) < len(starts) - 1:
                device = self.slot_mapping.device
                rows = torch.tensor([starts[s] for s in ones], device=device)
                seqs = torch.tensor(ones, device=device)
                decode = PagedBatch(list(range(len(ones) + 1)), self.context_lens[seqs], self.block_tables[seqs],
                                    self.slot_mapping[rows], self.latent_caches, decode_only=True)
                part = (rows, decode, sorted(set(range(len(starts) - 1)) - set(ones)))
            self._decode_part = part
        return self._decode_part


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
            out = self.absorbed_decode(q_nope, q_pe, batch) if batch.decode_only else self.paged_prefill(
                q_nope, q_pe, batch)
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
        """Each sequence's new tokens attend to its whole cached context, expanded (chunked prefill too).

        When no sequence has earlier tokens in the cache (whole prompts, the usual prefill), the keys and
        values of every token come from one gather and one kv_b_proj GEMM over the step, and sequences of
        one length share one attention call; otherwise each sequence reads its context from its blocks."""
        cache = batch.latent_caches[self.layer_idx]
        starts, ctx_lens = batch.query_starts, batch.host_context_lens()
        lengths = [hi - lo for lo, hi in zip(starts, starts[1:])]
        if lengths != ctx_lens:
            mixed = batch.decode_part()
            if mixed is None:
                return torch.cat([self.sequence_prefill(q_nope[lo:hi], q_pe[lo:hi], cache, batch.block_tables[s], ctx)
                                  for s, (lo, hi, ctx) in enumerate(zip(starts, starts[1:], ctx_lens))])
            # Decoding sequences beside prefilling ones (continuous batching): their rows take the absorbed
            # decode kernel together, as in a decode step, instead of a prefill pass each.
            rows, decode, others = mixed
            out = q_nope.new_empty(*q_nope.shape[:2], self.v_dim)
            out[rows] = self.absorbed_decode(q_nope[rows], q_pe[rows], decode)
            for s in others:
                lo, hi = starts[s], starts[s + 1]
                out[lo:hi] = self.sequence_prefill(q_nope[lo:hi], q_pe[lo:hi], cache, batch.block_tables[s], ctx_lens[s])
            return out
        kv = cache.view(-1, cache.shape[-1])[batch.slot_mapping].to(q_nope.dtype)   # (N, C + rope), as cached
        latent, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k, v = self.expand_keys(latent, k_pe)                                       # (N, H, *)
        q = torch.cat([q_nope, q_pe], dim=-1)
        if len(set(lengths)) == 1:                                                  # one call: (S, H, T, *)
            t = lengths[0]

            def heads_first(x: torch.Tensor) -> torch.Tensor:
                return x.unflatten(0, (len(lengths), t)).transpose(1, 2)

            out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), is_causal=True,
                                                 scale=self.softmax_scale)
            return out.transpose(1, 2).flatten(0, 1)                                # (N, H, v)
        outs = [F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1), k[lo:hi].transpose(0, 1),
                                               v[lo:hi].transpose(0, 1), is_causal=True, scale=self.softmax_scale)
                for lo, hi in zip(starts, starts[1:])]
        return torch.cat(outs, dim=1).transpose(0, 1)

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

    def absorbed_decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """One query per sequence, attention computed in the latent space (no keys or values expanded)."""
        w_uk, w_uv = self.absorbed_weights()
        q_latent = dispatch.per_head(q_nope, w_uk.to(q_nope.dtype).transpose(1, 2))  # (S, H, C)
        return dispatch.mla_decode(q_latent, q_pe, batch.latent_caches[self.layer_idx], batch.block_tables,
                                   batch.context_lens, self.kv_lora_rank, self.softmax_scale,
                                   w_uv=w_uv.to(q_latent.dtype))                   # (S, H, v)

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
