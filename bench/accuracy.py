"""Teacher-forced accuracy of bf16 against transformers in float32, on the embedded model (issue 21).

    PYTHONPATH=src:bench python3 bench/accuracy.py --out $OUT

Prompts are windows of The Tempest (held out from the model's training). The float32 reference is transformers'
DeepseekV3ForCausalLM on the same checkpoint. Each bf16 system is scored at the same positions of the same
token sequences, each position given the same prefix (teacher-forced):

- transformers bf16 and dsv3 bf16 (`model(ids)`, the expanded form): one forward over each whole sequence;
- dsv3 engine (LLMEngine, greedy; on the GPU with CUDA graphs and the Triton kernels): the prompt is prefilled
  and each next token decoded on the paged latent cache (absorbed MLA). Its own greedy tokens extend the
  sequence, so the float32 reference is then run on prompt + the engine's tokens, and each engine token is
  compared with the float32 argmax after the same prefix. The other systems are scored on those sequences too.

Per position: agree = the system's argmax is the float32 argmax; at a divergence the gap is how much lower the
float32 logit of the system's pick is than the float32 maximum (0 would be a tie). Also the relative error of each
layer's hidden state (the residual stream after the block) against float32, to show where precision goes.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
from pathlib import Path

import torch

from dsv3.checkpoint import load_model
from dsv3.default_model import default_model_path
from dsv3.engine.llm import LLMEngine
from dsv3.engine.sampling import SamplingParams
from dsv3.tokenizer import Tokenizer

HELD_OUT = Path(__file__).parents[1] / "tests" / "data" / "shakespeare" / "tempest.txt.gz"


def prompts(tokenizer: Tokenizer, n: int, length: int) -> list[list[int]]:
    ids = tokenizer.encode(gzip.open(HELD_OUT, "rt").read(), add_special_tokens=False)
    stride = (len(ids) - length) // n
    return [[tokenizer.bos_token_id] + ids[i * stride:i * stride + length - 1] for i in range(n)]


def transformers_model(path: Path, dtype: torch.dtype, device: str):
    import transformers

    transformers.logging.set_verbosity_error()  # the MTP layer's weights, which it does not load
    transformers.logging.disable_progress_bar()

    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return hf.to(device).eval()


def score(choice: torch.Tensor, reference: torch.Tensor) -> dict:
    """choice (P,) token ids; reference (P, V) float32 logits at the same positions."""
    best = reference.argmax(-1)
    diverged = choice != best
    gaps = (reference.gather(-1, best[:, None]) - reference.gather(-1, choice[:, None]))[:, 0][diverged]
    return dict(positions=choice.numel(), agreement=1 - diverged.float().mean().item(), divergences=int(diverged.sum()),
                max_gap=gaps.max().item() if gaps.numel() else 0.0, mean_gap=gaps.mean().item() if gaps.numel() else 0.0)


@torch.inference_mode()
def engine_tokens(model, tokenizer, batch: list[list[int]], new: int, block_size: int) -> list[list[int]]:
    engine = LLMEngine(model, tokenizer, max_num_seqs=len(batch), block_size=block_size,
                       max_model_len=len(batch[0]) + new + 8, num_blocks=len(batch) * -(-(len(batch[0]) + new + 8)
                                                                                        // block_size) + 8)
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in batch]
    while engine.has_unfinished():
        engine.step()
    return [list(s.output_token_ids) for s in seqs]


@torch.inference_mode()
def dsv3_hidden(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """dsv3's logits and the residual stream after each block but the last, then the final norm's output, as
    transformers' hidden_states (float32 copies)."""
    hidden = []
    hooks = [layer.register_forward_hook(lambda m, i, o: hidden.append((o[0].float() + o[1].float())))
             for layer in model.model.layers[: model.config.num_hidden_layers - 1]]
    hooks.append(model.model.norm.register_forward_hook(lambda m, i, o: hidden.append(o[0].float())))
    try:
        logits = model(ids).float()
    finally:
        for h in hooks:
            h.remove()
    return logits, hidden


@torch.inference_mode()
def hf_hidden(hf, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = hf(ids, output_hidden_states=True)
    # hidden_states: the embeddings, then each layer's output, the last one after the final norm.
    hidden = [h.float() for h in out.hidden_states[1:]]
    return out.logits.float(), hidden


def relative_errors(hidden: list[torch.Tensor], reference: list[torch.Tensor]) -> list[float]:
    return [((h - r).norm() / r.norm()).item() for h, r in zip(hidden, reference)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=None, help="default: 64 on the GPU, 16 on the CPU")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128, help="tokens the engine decodes after each prompt")
    ap.add_argument("--label", default="", help="a name for this run in the file name and the table")
    args = ap.parse_args()
    device = args.device
    n = args.prompts or (64 if device == "cuda" else 16)
    path = default_model_path()
    tokenizer = Tokenizer.from_dir(path)
    batch = prompts(tokenizer, n, args.prompt_len)

    dsv3 = load_model(path, dtype=torch.bfloat16, device=device, progress=False)
    generated = engine_tokens(dsv3, tokenizer, batch, args.new, 64 if device == "cuda" else 16)
    ids = torch.tensor([p + g for p, g in zip(batch, generated)], device=device)   # (B, P + new)
    engine_choice = torch.tensor(generated, device=device)                          # (B, new)
    decoded = slice(args.prompt_len - 1, args.prompt_len - 1 + args.new)            # rows that predicted them

    fp32 = transformers_model(path, torch.float32, device)
    ref_logits, ref_hidden = hf_hidden(fp32, ids)
    del fp32
    hf16 = transformers_model(path, torch.bfloat16, device)
    hf_logits, hf_states = hf_hidden(hf16, ids)
    del hf16
    ours_logits, ours_states = dsv3_hidden(dsv3, ids)

    # The positions the prompt's tokens predict (prefill) and those the engine decoded, apart.
    prefill = slice(0, args.prompt_len - 1)
    rows = []
    # dsv3's logits rounded to bf16 are what its LM head returned before e9e04c0 (cuBLAS and the GEMV rounded
    # their float32 sums): the same run, before and after that change.
    for system, logits in (("transformers bf16", hf_logits), ("dsv3 bf16 model(ids)", ours_logits),
                           ("dsv3 bf16 model(ids), logits rounded to bf16", ours_logits.bfloat16())):
        for where, s in (("prompt", prefill), ("decoded", decoded)):
            rows.append(dict(system=system, positions_of=where,
                             **score(logits[:, s].argmax(-1).flatten(), ref_logits[:, s].flatten(0, 1))))
    rows.append(dict(system="dsv3 bf16 engine", positions_of="decoded",
                     **score(engine_choice.flatten(), ref_logits[:, decoded].flatten(0, 1))))
    layers = dict(transformers_bf16=relative_errors(hf_states, ref_hidden),
                  dsv3_bf16=relative_errors(ours_states, ref_hidden))
    logits_error = {name: ((l - ref_logits).norm() / ref_logits.norm()).item()
                    for name, l in (("transformers_bf16", hf_logits), ("dsv3_bf16", ours_logits))}

    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if os.environ.get("DSV3_KERNELS") == "reference":
        args.label = "-".join(filter(None, [args.label, "reference-kernels"]))
    label = f"-{args.label}" if args.label else ""
    result = dict(date=datetime.date.today().isoformat(), device=gpu, torch=torch.__version__, label=args.label,
                  prompts=n, prompt_len=args.prompt_len, new=args.new, rows=rows, layer_relative_error=layers,
                  logits_relative_error=logits_error)
    lines = [f"# Teacher-forced accuracy against transformers float32 ({gpu}, {n} Tempest prompts of "
             f"{args.prompt_len} tokens + {args.new} decoded{', ' + args.label if args.label else ''})", "",
             "| system | positions | agreement with fp32 argmax | divergences | max gap | mean gap |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['positions_of']} ({r['positions']}) | {100 * r['agreement']:.2f}% | "
                     f"{r['divergences']} | {r['max_gap']:.3f} | {r['mean_gap']:.3f} |")
    lines += ["", "Relative error of the residual stream after each layer (the last: after the final norm) "
              "and of the logits:", "",
              "| layer | " + " | ".join(str(i) for i in range(len(layers["dsv3_bf16"]))) + " | logits |",
              "|---|" + "---|" * (len(layers["dsv3_bf16"]) + 1)]
    for name, errs in layers.items():
        lines.append(f"| {name} | " + " | ".join(f"{e:.2e}" for e in errs) + f" | {logits_error[name]:.2e} |")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{result['date']}-{gpu.replace(' ', '_')}-accuracy{label}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(text)


if __name__ == "__main__":
    main()
