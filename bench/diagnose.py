"""Where a decode step's time goes, and whether the GPU paths compute what the CPU-tested ones do.

    PYTHONPATH=src:bench python bench/diagnose.py

1. dsv3 vs transformers logits on small random models in float32 and bf16, with the fast kernels and
   with DSV3_KERNELS=reference: separates a kernel bug from bf16 rounding.
2. moonlight-16b (fewer layers) at batch 1: graph replay alone vs a whole engine step, and the
   kernels of one step by GPU time.
"""

from __future__ import annotations

import time

import torch
import transformers

from bench import SHAPES, hf_model, random_prompts
from overhead import replay_ms
from dsv3.config import ModelConfig
from dsv3.engine.llm import LLMEngine
from dsv3.engine.sampling import SamplingParams
from dsv3.engine.sequence import ScheduledItem
from dsv3.kernels import dispatch
from dsv3.model import DeepseekV3ForCausalLM, init_weights


def compare(raw: dict, dtype: torch.dtype, kernels: str, std: float) -> str:
    before = dispatch.configure(kernels=kernels)
    cfg = ModelConfig.from_dict(raw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM(cfg, dtype=dtype).eval()
    init_weights(model, std)
    hf = hf_model(model, raw)
    ids = torch.tensor(random_prompts(2, 64, cfg.vocab_size, seed=1), device="cuda")
    with torch.inference_mode():
        ours, theirs = model(ids).float(), hf(ids).logits.float()
    err = ((ours - theirs).norm() / theirs.norm()).item()
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    del model, hf
    torch.cuda.empty_cache()
    dispatch.configure(kernels=before.kernels)
    return f"{str(dtype):15} kernels={kernels:9} std={std}: logits rel err {err:.2e}, top-1 agreement {top1:.3f}"


def layer_by_layer(raw: dict, dtype: torch.dtype) -> None:
    """Feed both models' layers the same input and compare each layer's output."""
    cfg = ModelConfig.from_dict(raw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM(cfg, dtype=dtype).eval()
    init_weights(model, 0.02)
    hf = hf_model(model, raw)
    ids = torch.tensor(random_prompts(1, 32, cfg.vocab_size, seed=2), device="cuda")
    positions = torch.arange(32, device="cuda")[None]
    with torch.inference_mode():
        x = model.model.embed_tokens(ids)
        pe = hf.model.rotary_emb(x, positions)
        mask = transformers.masking_utils.create_causal_mask(config=hf.config, inputs_embeds=x, attention_mask=None,
                                                            past_key_values=None, position_ids=positions)
        for i in range(2):
            ours_layer, hf_layer = model.model.layers[i], hf.model.layers[i]
            a = ours_layer.self_attn(ours_layer.input_layernorm(x), model.model.rotary(positions))
            b = hf_layer.self_attn(hf_layer.input_layernorm(x), position_embeddings=pe, attention_mask=mask)[0]
            print(f"  layer {i} attention rel err {((a - b).float().norm() / b.float().norm()).item():.2e}")
            h = ours_layer.post_attention_layernorm(x + b)
            a, b = ours_layer.mlp(h), hf_layer.mlp(h)
            print(f"  layer {i} mlp/moe  rel err {((a - b).float().norm() / b.float().norm()).item():.2e}")
            x = hf_layer(x, position_embeddings=pe, attention_mask=mask)
            x = x[0] if isinstance(x, tuple) else x
    del model, hf
    torch.cuda.empty_cache()


def random_moonlight(layers: int) -> tuple[DeepseekV3ForCausalLM, ModelConfig]:
    """moonlight-16b's shape with fewer layers and no MTP, random bf16 weights on the GPU."""
    cfg = ModelConfig.from_dict({**SHAPES["moonlight-16b"], "num_hidden_layers": layers, "num_nextn_predict_layers": 0})
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM(cfg, dtype=torch.bfloat16).eval()
    init_weights(model, 0.02)
    return model, cfg


def profile_decode(layers: int) -> None:
    model, cfg = random_moonlight(layers)
    engine = LLMEngine(model, None, max_num_seqs=8, block_size=64, max_model_len=512, num_blocks=64)
    seq = engine.add_request(random_prompts(1, 128, cfg.vocab_size, seed=3)[0],
                             SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        engine.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) / 50 * 1e3
    replay = replay_ms(engine.runner.graphs[1])
    print(f"moonlight shape, {layers} layers, batch 1: engine step {step_ms:.2f} ms, graph replay {replay:.2f} ms "
          f"({replay / layers * 1e3:.0f} us a layer)")
    items = [ScheduledItem(seq, seq.num_cached_tokens, seq.all_token_ids[seq.num_cached_tokens:], 1)]
    step = engine.runner.pack(items, rows_mode=True)
    step.graph_size = 0  # eager, to see the kernels
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine.runner.execute(step)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"kernels per eager step: {sum(e.count for e in kernels) / 3:.0f}")


def profile_prefill(layers: int) -> None:
    model, cfg = random_moonlight(layers)
    engine = LLMEngine(model, None, max_num_seqs=8, block_size=64, max_model_len=2100, num_blocks=300,
                       max_num_batched_tokens=16384, cuda_graphs=False)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def prefill(seed: int):  # new prompts each time: a repeated one would come from the prefix cache
        for p in random_prompts(8, 2048, cfg.vocab_size, seed=seed):
            engine.add_request(p, params)
        while engine.has_unfinished():
            engine.step()
        engine.requests.clear()

    prefill(4)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        prefill(5)
        torch.cuda.synchronize()
    print(f"prefill 8 x 2048, {layers} layers")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))


def main() -> None:
    import sys
    if "--profile-only" in sys.argv:
        profile_decode(4)
        profile_prefill(4)
        return
    tiny = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                n_routed_experts=16, routed_scaling_factor=2.5, kv_lora_rank=64, q_lora_rank=None,
                qk_rope_head_dim=32, v_head_dim=64, qk_nope_head_dim=64, n_group=1, topk_group=1,
                num_experts_per_tok=4, first_k_dense_replace=1, max_position_embeddings=256,
                num_nextn_predict_layers=0)
    for dtype in (torch.float32, torch.bfloat16):
        for kernels in ("auto", "reference"):
            print(compare(tiny, dtype, kernels, 0.02), flush=True)
    moon2 = {**SHAPES["moonlight-16b"], "num_hidden_layers": 3, "num_nextn_predict_layers": 0}
    for kernels in ("auto", "reference"):
        print("moonlight 3 layers", compare(moon2, torch.bfloat16, kernels, 0.02), flush=True)
    print("moonlight 3 layers, bf16, layer by layer:")
    try:
        layer_by_layer(moon2, torch.bfloat16)
    except Exception as e:  # transformers' internals differ between versions: keep the profile below
        print(f"  layer by layer failed: {e!r}")
    profile_decode(4)


if __name__ == "__main__":
    main()
