"""`dsv3 generate | chat | serve | bench | convert | train | train-tokenizer | train-classifier`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys


def add_model_options(p: argparse.ArgumentParser, **defaults) -> None:
    """--model, then one flag per EngineConfig field (defaults: this command's, else the dataclass's)."""
    from dsv3.engine.config import add_engine_options

    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    add_engine_options(p, **defaults)


def add_sampling_options(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_llm(args):
    from dsv3.engine.config import EngineConfig
    from dsv3.engine.llm import LLM

    return LLM(args.model, EngineConfig.from_args(args), progress=True)


def sampling(args):
    from dsv3.engine.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop)


def on_rank_zero(command):
    """Under torchrun, build the LLM on every rank; only rank 0 runs the command, the others follow its
    steps inside LLM() and return when rank 0 closes it."""
    def run(args) -> int:
        params = sampling(args)
        llm = build_llm(args)
        if llm.follower:
            return 0
        try:
            return command(args, llm, params)
        finally:
            llm.close()
    return run


@on_rank_zero
def cmd_generate(args, llm, params) -> int:
    if args.prompt is not None:
        for piece in llm.stream(args.prompt, params):
            if isinstance(piece, str):
                print(piece, end="", flush=True)
        print()
        return 0
    with open(args.input_file, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        return 0
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        if args.jsonl:
            print(json.dumps({"prompt": prompt, "text": out.text, "finish_reason": out.finish_reason},
                             ensure_ascii=False), flush=True)
        else:
            print(out.text.replace("\n", "\\n"), flush=True)
    return 0


@on_rank_zero
def cmd_chat(args, llm, params) -> int:
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("dsv3 chat: /clear forgets the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/clear":
            history = history[:1] if args.system else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        answer = None
        for piece in llm.stream(llm.chat_prompt(history), params):
            if isinstance(piece, str):
                print(piece, end="", flush=True)
            else:
                answer = piece
        print()
        history.append({"role": "assistant", "content": answer.text})


@on_rank_zero
def cmd_bench(args, llm, params) -> int:
    """Throughput of this checkpoint on this machine: random prompts, greedy, fixed lengths."""
    import time

    import torch

    from dsv3.engine.sampling import SamplingParams

    engine, vocab = llm.engine, llm.model.config.vocab_size
    fixed = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    generator = torch.Generator().manual_seed(0)
    for batch in args.batch:
        prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=generator).tolist()
        seqs = [engine.add_request(p, fixed) for p in prompts]
        start = time.perf_counter()
        while any(not s.output_token_ids for s in seqs):  # prefill (sampling reads each step's result)
            engine.step()
        prefilled = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        done = time.perf_counter()
        for s in seqs:
            engine.release(s)
        decode = batch * (args.new_tokens - 1) / max(done - prefilled, 1e-9)
        print(f"batch {batch}: prefill {batch * args.prompt_len / (prefilled - start):,.0f} tokens/s, "
              f"decode {decode:,.1f} tokens/s ({(done - prefilled) / max(args.new_tokens - 1, 1) * 1e3:.2f} ms/token)",
              flush=True)
    return 0


def cmd_convert(args) -> int:
    from dsv3.checkpoint import convert_fp8_to_bf16

    if not args.fp8_to_bf16:
        raise SystemExit("dsv3 convert: say which conversion (--fp8-to-bf16)")
    convert_fp8_to_bf16(args.input, args.output)
    print(f"wrote {args.output}")
    return 0


# Subcommands that live beside the code they drive; each module offers register(subparsers).
PLUGGED = ("dsv3.serve.command", "dsv3.train.command")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in Python")
    sub = top.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt (or every line of a file)")
    add_model_options(g)
    add_sampling_options(g, temperature=0.0)
    g.add_argument("prompt", nargs="?", help="the prompt text")
    g.add_argument("--input-file", help="one prompt per line; answers printed in order, one per line")
    g.add_argument("--jsonl", action="store_true", help="with --input-file: print JSON lines")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with the checkpoint's chat template")
    add_model_options(c)
    add_sampling_options(c, temperature=0.7)
    c.add_argument("--system", default=None, help="a system prompt")
    c.set_defaults(func=cmd_chat)

    b = sub.add_parser("bench", help="decode and prefill throughput of a checkpoint (random prompts)")
    add_model_options(b)
    add_sampling_options(b, temperature=0.0)
    b.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=128)
    b.set_defaults(func=cmd_bench)

    v = sub.add_parser("convert", help="convert a checkpoint (DeepSeek's fp8_cast_bf16.py)")
    v.add_argument("--fp8-to-bf16", action="store_true")
    v.add_argument("input")
    v.add_argument("output")
    v.set_defaults(func=cmd_convert)

    for name in PLUGGED:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            # An optional dependency (fastapi, matplotlib, ...) is missing: leave that command out.
            if e.name is None or e.name == name or not e.name.startswith("dsv3"):
                continue
            raise
        module.register(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "generate" and (args.prompt is None) == (args.input_file is None):
        raise SystemExit("dsv3 generate: give either a PROMPT or --input-file F")
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"dsv3 {args.command}: {e}", file=sys.stderr)
        return 2
