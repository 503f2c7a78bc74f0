"""Shared by the tests: a tiny DeepSeek-V3 config and checkpoints made from it (transformers' or ours)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_config(**overrides) -> dict:
    """A valid tiny DeepSeek-V3 config.json dict: 3 layers (the first dense), 8 routed experts in 4
    groups, 1 MTP layer. Every dim is a multiple of 8."""
    cfg = dict(
        model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_nextn_predict_layers=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=24,
        n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=128,
        rope_theta=10000.0, rms_norm_eps=1e-6, pad_token_id=None, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return cfg


def varied_prompts() -> list[list[int]]:
    """Four token-id prompts of different lengths (5, 17, 30, 9), the engine tests' usual batch."""
    return [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17, 30, 9)]


def confident_model():
    """The tiny model with large weights (confident, varied greedy choices), no EOS, and a correction bias."""
    from dsv3.config import ModelConfig
    from dsv3.model import DeepseekV3ForCausalLM, init_weights

    torch.manual_seed(0)
    m = DeepseekV3ForCausalLM(ModelConfig.from_dict(tiny_config(eos_token_id=None)), dtype=torch.float32).eval()
    init_weights(m, 0.2)
    for layer in m.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return m


def random_bias(model: torch.nn.Module, seed: int = 0) -> None:
    """A nonzero e_score_correction_bias everywhere, so tests see the bias steer routing."""
    gen = torch.Generator().manual_seed(seed)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.rand(buf.shape, generator=gen) * 0.2 - 0.1)


def make_hf_checkpoint(tmp_path: Path, architecture: str = "DeepseekV3ForCausalLM", seed: int = 0, **overrides):
    """transformers' model (float32, random weights, random bias) saved with save_pretrained: no MTP
    tensors, per-expert keys. Returns (path, hf_model)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(**tiny_config(**overrides))
    model = getattr(transformers, architecture)(config).float().eval()
    random_bias(model, seed)
    path = Path(tmp_path) / f"hf-{architecture}"
    model.save_pretrained(path)
    return path, model


def make_dsv3_checkpoint(tmp_path: Path, fp8: bool = False, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                         name: str = "dsv3", **overrides) -> Path:
    """Our model with random weights, MTP layer and random bias, saved in DeepSeek's layout (per-expert
    keys, MTP copies of embedding and head); fp8=True quantizes the linear weights as DeepSeek's files
    hold them (block from overrides' quantization_config, else 128x128)."""
    from dsv3.checkpoint import save_checkpoint
    from dsv3.config import ModelConfig
    from dsv3.model import DeepseekV3ForCausalLM, init_weights

    raw = tiny_config(**overrides)
    if fp8:
        raw.setdefault("quantization_config", {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                               "weight_block_size": [128, 128]})
    cfg = ModelConfig.from_dict(raw)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(ModelConfig.from_dict({**raw, "quantization_config": None}), dtype=dtype)
    init_weights(model, cfg.initializer_range)
    random_bias(model, seed)
    path = Path(tmp_path) / name
    save_checkpoint(model, cfg, path, fp8=fp8, progress=False)
    return path
