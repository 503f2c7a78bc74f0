"""Kernels per decoder layer of a paged decode (or prefill) step: the launch count that bounds decode.

    PYTHONPATH=src python bench/count_kernels.py --device cuda [--batch 1] [--prefill]
    PYTHONPATH=src python bench/count_kernels.py              # CPU: aten ops of the reference path

moonlight-16b's attention and router shapes with a small vocabulary and small FFNs (the counts do not
depend on them), bf16, one dense layer then one MoE layer; each layer is run alone on a PagedBatch.
On a GPU it counts the CUDA kernels the profiler sees (warm: Triton compiled, cuBLAS set up); on the
CPU it counts the aten ops that are not views, a stand-in for the kernels of the reference path
(F.rms_norm is five ops there, one kernel on a GPU).
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench import SHAPES
from dsv3.config import ModelConfig
from dsv3.model import DeepseekV3ForCausalLM, PagedBatch, init_weights

FREE = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.detach.default"}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and str(func) not in FREE:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def paged_batch(cfg: ModelConfig, batch: int, tokens: int, context: int, device: str) -> PagedBatch:
    """`batch` sequences of `context` cached tokens each, `tokens` of them new; block size 64, each
    sequence's blocks consecutive."""
    blocks = -(-context // 64)
    cache = torch.zeros(batch * blocks + 1, 64, cfg.latent_dim, dtype=torch.bfloat16, device=device)
    tables = torch.arange(batch * blocks, dtype=torch.int32, device=device).view(batch, blocks)
    slots = (tables[:, :1].long() * 64 + torch.arange(context - tokens, context, device=device)).flatten()
    decode = tokens == 1
    return PagedBatch(query_starts=[i * tokens for i in range(batch + 1)],
                      context_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
                      block_tables=tables, slot_mapping=slots, latent_caches=[cache] * cfg.num_hidden_layers,
                      decode_only=decode)


def count(layer, x, rope, batch, device: str) -> tuple[int, Counter]:
    layer(x, rope, batch)                                                       # warm up
    if device == "cpu":
        with CountOps() as mode:
            layer(x, rope, batch)
        return sum(mode.ops.values()), mode.ops
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        layer(x, rope, batch)
        torch.cuda.synchronize()
    kernels = Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(kernels.values()), kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prefill", action="store_true", help="16 new tokens per sequence instead of 1")
    parser.add_argument("--verbose", action="store_true", help="list the kernels (ops) of each layer")
    args = parser.parse_args()

    raw = {**SHAPES["moonlight-16b"], "vocab_size": 1024, "intermediate_size": 512, "moe_intermediate_size": 128,
           "num_hidden_layers": 2, "num_nextn_predict_layers": 0}
    cfg = ModelConfig.from_dict(raw)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = DeepseekV3ForCausalLM(cfg, dtype=torch.bfloat16).eval()
    init_weights(model, 0.02)
    tokens = 16 if args.prefill else 1
    batch = paged_batch(cfg, args.batch, tokens, context=100, device=args.device)
    n = args.batch * tokens
    positions = torch.arange(100 - tokens, 100, device=args.device).repeat(args.batch)
    what = "CUDA kernels" if args.device != "cpu" else "aten ops (reference path)"
    with torch.no_grad():
        x = torch.randn(n, cfg.hidden_size, dtype=torch.bfloat16, device=args.device)
        rope = model.model.rotary(positions)
        for i, layer in enumerate(model.model.layers):
            total, names = count(layer, x, rope, batch, args.device)
            kind = "MoE" if cfg.is_moe_layer(i) else "dense"
            print(f"layer {i} ({kind}), {'prefill' if args.prefill else 'decode'} batch {args.batch}: {total} {what}")
            if args.verbose:
                for name, k in names.most_common():
                    print(f"    {k:3d}  {name[:100]}")


if __name__ == "__main__":
    main()
