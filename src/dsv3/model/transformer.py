"""Blocks, the backbone, and the heads: causal LM, multi-token prediction (V3 §2.2), sequence classification.

Parameter names follow the Hugging Face checkpoints (model.layers.{i}.self_attn.kv_b_proj.weight, ...),
so a state_dict maps onto the files one to one; only the routed experts are packed
(mlp.experts.gate_up_proj, as transformers v5 writes them). The MTP modules sit at
model.layers.{num_hidden_layers + j}, where DeepSeek's checkpoints keep them.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.layers import Linear, ParallelLMHead, RMSNorm, Rotary, VocabParallelEmbedding
from dsv3.model.mla import MLA, PagedBatch
from dsv3.model.moe import MLP, MoE
from dsv3.parallel import SINGLE, Parallel


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, par: Parallel = SINGLE, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.self_attn = MLA(cfg, layer_idx, par, dtype)
        self.mlp = (MoE(cfg, par, dtype) if cfg.is_moe_layer(layer_idx)
                    else MLP(cfg.hidden_size, cfg.intermediate_size, par, dtype, cfg.quant))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, batch: PagedBatch | None = None,
                attention_mask: torch.Tensor | None = None, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden state x, or the last block's two parts x + residual -> this block's two parts: its MLP's
        output and the residual stream. Each residual add is left to the next norm, as in vLLM: add and norm
        are one kernel on the GPU."""
        h, residual = (self.input_layernorm(x), x) if residual is None else self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, rope, batch, attention_mask), residual)
        return self.mlp(h), residual


class SharedHead(nn.Module):
    """The MTP module's output norm; its `head` is the main model's LM head (shared, §2.2)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class MTPLayer(Block):
    """One multi-token-prediction depth (V3 §2.2, Eq. 21-23): h' = M [RMSNorm(h); RMSNorm(Emb(t_{i+k}))],
    then one Transformer block. Embedding and output head are shared with the main model."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, par: Parallel = SINGLE, dtype: torch.dtype = torch.bfloat16):
        super().__init__(cfg, layer_idx, par, dtype)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, dtype=dtype)
        self.shared_head = SharedHead(cfg, dtype)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, rope: torch.Tensor,
                batch: PagedBatch | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden)], dim=-1))
        return self.shared_head.norm(*super().forward(x, rope, batch, attention_mask))[0]


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, par: Parallel = SINGLE, dtype: torch.dtype = torch.bfloat16,
                 mtp: bool = True):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, par, dtype)
        n = cfg.num_hidden_layers
        self.layers = nn.ModuleList([Block(cfg, i, par, dtype) for i in range(n)] +
                                    [MTPLayer(cfg, n + j, par, dtype) for j in range(cfg.num_nextn_predict_layers if mtp else 0)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.rotary = Rotary(cfg)
        self.num_hidden_layers = n

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, batch: PagedBatch | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) without a cache, or (N,) flat with a PagedBatch -> final normed hidden states."""
        if positions is None:  # (a whole sequence, maybe longer than the engine's rotary table)
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
            rope = self.rotary.rotations(positions)
        else:
            rope = self.rotary(positions)
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers[: self.num_hidden_layers]:
            x, residual = layer(x, rope, batch, attention_mask, residual)
        return self.norm(x, residual)[0]


def init_weights(module: nn.Module, std: float) -> None:
    """Random weights as transformers initialises them: normal(0, std) matrices, unit norms, zero biases."""
    for name, p in module.named_parameters():
        if p.dtype == torch.float8_e4m3fn or name.endswith("scale_inv"):
            continue
        with torch.no_grad():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith(("enorm.weight", "hnorm.weight")):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, par: Parallel = SINGLE, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.config, self.par = cfg, par
        self.model = Backbone(cfg, par, dtype)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, par, dtype)

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.layers[self.config.num_hidden_layers:])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, batch: PagedBatch | None = None,
                attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits (B, T, vocab) in float32; logits_to_keep=n computes only the last n positions."""
        hidden = self.model(input_ids, positions, batch, attention_mask)
        return self.logits(hidden[..., -logits_to_keep:, :] if logits_to_keep else hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def mtp_hidden(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor | None = None,
                   depth: int = 0, batch: PagedBatch | None = None,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Depth `depth` of MTP: hidden state h_i (of the main model, or of depth-1) and token t_{i+1+depth}
        give the hidden state that predicts t_{i+2+depth}."""
        if positions is None:
            positions = torch.arange(next_ids.shape[-1], device=next_ids.device).expand_as(next_ids)
            rope = self.model.rotary.rotations(positions)
        else:
            rope = self.model.rotary(positions)
        return self.mtp_layers[depth](hidden, self.model.embed_tokens(next_ids), rope, batch, attention_mask)

    def mtp_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-next-token logits (B, T-1, vocab) of the first MTP depth for a full sequence: row i predicts
        token i+2 from tokens 0..i+1."""
        if not self.mtp_layers:
            raise ValueError("this checkpoint has no MTP module (num_nextn_predict_layers is 0)")
        hidden = self.model(input_ids)
        return self.logits(self.mtp_hidden(hidden[:, :-1], input_ids[:, 1:]))


class DeepseekV3ForSequenceClassification(nn.Module):
    """The backbone with a `score` head, pooled at each row's last non-pad token (as transformers does)."""

    def __init__(self, cfg: ModelConfig, par: Parallel = SINGLE, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, par, dtype, mtp=False)
        self.score = Linear(cfg.hidden_size, cfg.num_labels, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.score(self.model(input_ids, attention_mask=attention_mask))  # (B, T, labels)
        pad = self.config.pad_token_id
        if pad is None:
            if input_ids.shape[0] != 1:
                raise ValueError("pooling a batch of several rows needs pad_token_id in the config")
            last = torch.full((1,), input_ids.shape[1] - 1, device=input_ids.device)
        else:
            # The rightmost token that is not padding; works for left and right padding.
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (positions * (input_ids != pad)).argmax(-1)
        return logits[torch.arange(input_ids.shape[0], device=logits.device), last]
