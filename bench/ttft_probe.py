"""Engine-only time to first token, as the server's levels see it: `concurrency` random 128-token prompts added
at once to an engine made as `dsv3 serve` makes it, stepped until each has its first token; two waves.

    PYTHONPATH=src:bench python bench/ttft_probe.py [--concurrency 1,8,64]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench import SHAPES, random_prompts
from dsv3.config import ModelConfig
from dsv3.engine.llm import LLMEngine
from dsv3.engine.sampling import SamplingParams
from dsv3.model import DeepseekV3ForCausalLM, init_weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,8,64")
    args = ap.parse_args()
    cfg = ModelConfig.from_dict({**SHAPES["moonlight-16b"], "num_nextn_predict_layers": 0})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM(cfg, dtype=torch.bfloat16).eval()
    init_weights(model, cfg.initializer_range)
    engine = LLMEngine(model, None, max_num_seqs=256)
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    for c in [int(x) for x in args.concurrency.split(",")]:
        for wave in range(3):
            seqs = [engine.add_request(p, params) for p in random_prompts(c, 128, cfg.vocab_size, seed=wave + c)]
            t0, first, steps, kinds = time.perf_counter(), {}, 0, []
            while engine.has_unfinished():
                before = time.perf_counter()
                engine.step()
                steps += 1
                if len(first) < c:
                    kinds.append(f"{(time.perf_counter() - before) * 1e3:.1f}")
                for s in seqs:
                    if s.output_token_ids and s.seq_id not in first:
                        first[s.seq_id] = (time.perf_counter() - t0, steps)
            total = time.perf_counter() - t0
            ttft = sorted(v[0] for v in first.values())
            print(f"concurrency {c} wave {wave}: TTFT min {ttft[0] * 1e3:.1f} / max {ttft[-1] * 1e3:.1f} ms "
                  f"(steps {max(v[1] for v in first.values())}; step ms until then {' '.join(kinds[:12])}), "
                  f"{c * 128 / total:.0f} tok/s over {total:.2f} s", flush=True)
            engine.requests.clear()


if __name__ == "__main__":
    main()
