"""Tensor / expert parallel against one GPU, on the same random weights (shared/BENCH.md, issue 6).

    python bench/parallel.py --tag dsv3                                   # one GPU: the reference
    DSV3_EXPERTS=ep torchrun --nproc-per-node 2 bench/parallel.py --tag dsv3-ep2
    DSV3_EXPERTS=tp torchrun --nproc-per-node 2 bench/parallel.py --tag dsv3-tp2

Every rank builds only its slices, each cut from a full random tensor seeded by the parameter's name,
so every layout holds the same model. Rank 0 appends its rows (decode tokens/s at batch 1/64/256,
prefill throughput, the greedy tokens of batch 1 and 64) to a JSON file; the last run compares tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zlib
from pathlib import Path

import torch

from bench import SHAPES, agreement, dsv3_decode, dsv3_prefill, random_prompts, weight_bytes
from dsv3.config import ModelConfig
from dsv3.engine.llm import LLMEngine
from dsv3.engine.sampling import SamplingParams
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.parallel import init_from_env


@torch.no_grad()
def same_random_weights(model: DeepseekV3ForCausalLM, std: float) -> None:
    """normal(0, std) matrices, unit norms, zero biases: each rank's slice of one full tensor per name."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
            continue
        shard = getattr(p, "shard", None)
        full = list(p.shape)
        if shard is not None:
            full[shard.dim] *= shard.count
        g = torch.Generator(device=p.device).manual_seed(zlib.crc32(name.encode()))
        t = torch.randn(full, generator=g, device=p.device, dtype=p.dtype) * std
        if shard is not None and name.endswith("gate_up_proj") and shard.dim == 1:
            # experts split by their intermediate dim: this rank holds its part of gate, then its part of up
            t = torch.cat([half.narrow(1, shard.index * p.shape[1] // 2, p.shape[1] // 2) for half in t.chunk(2, 1)], 1)
        elif shard is not None:
            t = t.narrow(shard.dim, shard.index * p.shape[shard.dim], p.shape[shard.dim])
        p.copy_(t)


def check(args, par) -> None:
    """Across layouts the sliced model must give the one-GPU logits and tokens, up to bf16 sums in another order."""
    cfg = ModelConfig.from_dict({**SHAPES[args.model], "num_hidden_layers": 4, "num_nextn_predict_layers": 0})
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM(cfg, par=par, dtype=torch.bfloat16).eval()
    same_random_weights(model, 0.1)  # larger weights than at init: peaked logits, so greedy choices are clear
    ids = torch.tensor(random_prompts(2, 64, cfg.vocab_size, seed=5), device="cuda")
    with torch.inference_mode():
        logits = model(ids)
    engine = LLMEngine(model, None, par=par, block_size=16, num_blocks=64, max_num_seqs=4, max_model_len=128)
    if par.rank != 0:
        engine.runner.follow()
    else:
        params = SamplingParams(max_tokens=32, temperature=0)
        seqs = [engine.add_request(p, params) for p in random_prompts(4, 40, cfg.vocab_size, seed=6)]
        while engine.has_unfinished():
            engine.step()
        if par.distributed:
            engine.runner.broadcast(None)
        tokens = [s.output_token_ids for s in seqs]
        saved = Path("/tmp/dsv3-parallel-check.pt")
        if not par.distributed:
            torch.save({"logits": logits.cpu(), "tokens": tokens}, saved)
            print("one GPU: reference saved", flush=True)
        else:
            ref = torch.load(saved)
            err = ((logits.float().cpu() - ref["logits"].float()).norm() / ref["logits"].float().norm()).item()
            top1 = (logits.cpu().argmax(-1) == ref["logits"].argmax(-1)).float().mean().item()
            print(f"{args.tag} bf16, 4 layers: logits rel err vs one GPU {err:.2e}, top-1 agreement {top1:.3f}, "
                  f"greedy agreement {agreement(tokens, ref['tokens']):.3f}", flush=True)
    # The engine's CUDA graphs hold NCCL collectives: destroy_process_group hangs while they live (pytorch#115388;
    # session 8 saw this check hang there, at 9ddc5ae as at 4190d36). main's phases delete theirs before it too.
    del engine
    torch.cuda.synchronize()
    if par.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="moonlight-16b", choices=list(SHAPES))
    ap.add_argument("--tag", required=True)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--check", action="store_true",
                    help="4 layers, peaked logits: logits and greedy tokens against the one-GPU run, then stop")
    args = ap.parse_args()
    par = init_from_env()
    if args.check:
        return check(args, par)
    cfg = ModelConfig.from_dict({**SHAPES[args.model], "num_nextn_predict_layers": 0})
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM(cfg, par=par, dtype=torch.bfloat16).eval()
    same_random_weights(model, cfg.initializer_range)
    batches = [int(b) for b in args.batches.split(",")]
    rows, tokens = [], {}

    def phase(fn, **options):
        engine = LLMEngine(model, None, par=par, block_size=64, max_num_batched_tokens=16384, **options)
        if par.rank == 0:
            fn(engine)
            if par.distributed:
                engine.runner.broadcast(None)
        else:
            engine.runner.follow()
        del engine
        torch.cuda.empty_cache()

    def decode(engine):
        for b in batches:
            step, outs = dsv3_decode(engine, b, 128, 128, cfg.vocab_size)
            tokens[b] = outs
            rows.append(dict(system=args.tag, workload="decode", batch=b, prompt=128, new=128,
                             tokens_per_s=b / step, ms_per_token=step * 1e3,
                             weight_bytes_per_gpu=weight_bytes(cfg, b)[0] / par.tp_size))
            print(rows[-1], flush=True)

    def prefill(engine):
        seconds = dsv3_prefill(engine, 8, 2048, cfg.vocab_size)
        rows.append(dict(system=args.tag, workload="prefill", batch=8, prompt=2048, tokens_per_s=8 * 2048 / seconds,
                         seconds=seconds))
        print(rows[-1], flush=True)

    t0 = time.perf_counter()
    phase(decode, max_num_seqs=max(batches), max_model_len=128 + 128 + 8, num_blocks=1024)
    phase(prefill, max_num_seqs=8, max_model_len=2048 + 8, num_blocks=300, cuda_graphs=False)
    if par.rank == 0:
        path = Path(args.out) / f"parallel-{args.model}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        result = json.loads(path.read_text()) if path.exists() else {"gpu": torch.cuda.get_device_name(),
                                                                      "torch": torch.__version__, "runs": {}}
        result["runs"][args.tag] = {"world_size": par.tp_size, "rows": rows,
                                    "tokens": {str(b): t for b, t in tokens.items()},
                                    "seconds": time.perf_counter() - t0}
        reference = result["runs"].get("dsv3")
        if reference is not None and args.tag != "dsv3":
            for b, t in tokens.items():
                ref = reference["tokens"].get(str(b))
                if ref is not None:
                    same = agreement(t, ref)  # bf16 sums in another order may part the two late
                    print(f"{args.tag} batch {b}: greedy agreement with one GPU {same:.1%}", flush=True)
                    result["runs"][args.tag].setdefault("greedy_agreement_with_one_gpu", {})[str(b)] = same
        path.write_text(json.dumps(result))
    if par.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
