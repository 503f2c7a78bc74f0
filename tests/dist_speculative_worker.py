"""Run by torchrun from test_speculative.py: the embedded model on two ranks, greedy, k drafts (argv[3], 1 if
not given), every step speculating; rank 0 writes the tokens and how many asynchronous steps verified how many drafts."""

import json
import sys

import torch

import dsv3
from dsv3.engine.speculative import SpeculationPolicy

out, prompts = sys.argv[1], json.loads(sys.argv[2])
k = int(sys.argv[3]) if len(sys.argv) > 3 else 1
llm = dsv3.LLM(dtype="float32", device="cpu", num_blocks=64, block_size=8, speculative_tokens=k)
if not llm.follower:
    engine = llm.engine
    engine.spec_policy = SpeculationPolicy(32, clock=None)
    steps, launch = [], engine._speculative_async_step
    engine._speculative_async_step = lambda: steps.append(1) or launch()
    outs = llm.generate(prompts, dsv3.SamplingParams(max_tokens=24, temperature=0))
    llm.close()
    json.dump({"tokens": [o.token_ids for o in outs], "async_steps": len(steps),
               "accepted": engine.stats["spec_accepted"]}, open(out, "w"))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
