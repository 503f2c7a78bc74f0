"""Run by torchrun from test_parallel.py: logits and greedy tokens of a sliced model, written by rank 0."""

import json
import sys

import torch

import dsv3
from dsv3.checkpoint import load_model
from dsv3.parallel import init_from_env

path, out = sys.argv[1], sys.argv[2]
par = init_from_env()
model = load_model(path, dtype=torch.float32, par=par, progress=False)
ids = torch.tensor(json.loads(sys.argv[3]))
with torch.no_grad():
    logits = model(ids)
del model
llm = dsv3.LLM(path, dtype="float32", device="cpu", num_blocks=64, block_size=4)
if not llm.follower:
    outs = llm.generate(ids.tolist(), dsv3.SamplingParams(max_tokens=8, temperature=0))
    llm.close()
    json.dump({"logits": logits.tolist(), "tokens": [o.token_ids for o in outs],
               "par": [par.tp_size, par.ep_size], "llm_par": [llm.par.tp_size, llm.par.ep_size]}, open(out, "w"))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
