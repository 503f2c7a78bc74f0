"""Tensor and expert parallel on the CPU: torchrun, 2 processes, gloo. Logits and greedy tokens of the
sliced model equal the single-process model's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv3

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.mark.parametrize("experts", ["ep", "tp"])
def test_two_ranks_equal_one(chat_checkpoint, tmp_path, experts):
    checkpoint = chat_checkpoint
    ids = torch.randint(2, 129000, (2, 11), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "out.json"
    env = {**os.environ, "DSV3_EXPERTS": experts, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(checkpoint), str(out), json.dumps(ids.tolist())]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["par"] == got["llm_par"] == ([2, 2] if experts == "ep" else [2, 1])  # dsv3.LLM splits them alike
    model = dsv3.load_model(checkpoint, dtype=torch.float32, progress=False)
    with torch.no_grad():
        expected = model(ids)
    err = ((torch.tensor(got["logits"]) - expected).abs().max() / expected.abs().max()).item()
    print(f"{experts}=2 vs one process: max relative error {err:.2e}")
    assert err < 1e-5
    llm = dsv3.LLM(checkpoint, dtype="float32", device="cpu", num_blocks=64, block_size=4)
    alone = [o.token_ids for o in llm.generate(ids.tolist(), dsv3.SamplingParams(max_tokens=8, temperature=0))]
    assert got["tokens"] == alone
