"""`dsv3 generate | chat | serve | bench | convert | train | train-tokenizer | train-classifier`."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
from contextlib import contextmanager

from dsv3 import __version__
from dsv3.engine.config import add_model_options, build_llm


def add_sampling_options(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling(args):
    from dsv3.engine.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop)


def bench_sampling(args):
    from dsv3.engine.sampling import SamplingParams

    return SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)


def on_rank_zero(params_of):
    """Under torchrun, build the LLM on every rank; only rank 0 runs the command, the others follow its
    steps inside LLM() and return when rank 0 closes it. params_of(args) is checked before the model loads."""
    def wrap(command):
        def run(args) -> int:
            params = params_of(args)
            llm = build_llm(args)
            if llm.follower:
                return 0
            try:
                return command(args, llm, params)
            finally:
                llm.close()
        return run
    return wrap


@on_rank_zero(sampling)
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


CHAT_COMMANDS = {"/clear": "forget the conversation", "/exit": "quit (also Ctrl-D)", "/help": "list these commands"}


@contextmanager
def interrupt_flag():
    """Ctrl-C sets the yielded event instead of raising, so a reply stops between engine steps: a
    KeyboardInterrupt raised inside a step would leave the scheduler and the cache half-updated."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@on_rank_zero(sampling)
def cmd_chat(args, llm, params) -> int:
    if llm.tokenizer is None:
        raise ValueError(f"chat needs a tokenizer and {llm.path} has no tokenizer.json")
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("dsv3 chat: /help lists the commands; Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        command = line.strip()
        if command == "/exit":
            return 0
        if command == "/clear":
            history = history[:1] if args.system else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if command == "/help":
            print("\n".join(f"{name:8} {what}" for name, what in CHAT_COMMANDS.items()), file=sys.stderr)
            continue
        if command.startswith("/"):
            print(f"(unknown command {command.split()[0]}: /help lists the commands)", file=sys.stderr)
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        # A reply stopped by Ctrl-C stays in the conversation as far as it was printed: that is what the
        # user saw, and the next turn can refer to it ("go on", "shorter").
        reply, stream = "", llm.stream(llm.chat_prompt(history), params)
        with interrupt_flag() as stop:
            for piece in stream:
                if isinstance(piece, str):
                    print(piece, end="", flush=True)
                    reply += piece
                if stop.is_set():
                    stream.close()  # aborts the request: its cache blocks are freed
                    print("\n(reply stopped)", end="", file=sys.stderr)
                    break
        print()
        history.append({"role": "assistant", "content": reply})


@on_rank_zero(bench_sampling)
def cmd_bench(args, llm, params) -> int:
    """Throughput of this checkpoint on this machine: random prompts, greedy, fixed lengths. Each batch
    runs once unmeasured first: a process's first steps of a shape compile kernels and fill caches."""
    import dataclasses
    import time

    import torch

    engine, vocab = llm.engine, llm.model.config.vocab_size
    warm_up = dataclasses.replace(params, max_tokens=min(params.max_tokens, 4))
    generator = torch.Generator().manual_seed(0)

    def run(prompts, params):
        seqs = [engine.add_request(p, params) for p in prompts]
        start = time.perf_counter()
        while any(not s.output_token_ids for s in seqs):  # prefill (sampling reads each step's result)
            engine.step()
        # A step launched but not read yet (asynchronous scheduling) is the first decode step.
        prefilled, steps = time.perf_counter(), engine.stats["steps"] - (engine.in_flight is not None)
        while engine.has_unfinished():
            engine.step()
        for s in seqs:
            engine.release(s)
        return prefilled - start, time.perf_counter() - prefilled, engine.stats["steps"] - steps

    for batch in args.batch:
        # Other prompts for the warm-up, of the same shape: the same ones would be found in the prefix cache.
        warm, prompts = torch.randint(0, vocab, (2, batch, args.prompt_len), generator=generator).tolist()
        run(warm, warm_up)
        prefill, decode, steps = run(prompts, params)
        print(f"batch {batch}: prefill {batch * args.prompt_len / prefill:,.0f} tokens/s, "
              f"decode {batch * (params.max_tokens - 1) / max(decode, 1e-9):,.1f} tokens/s "
              f"({decode / max(steps, 1) * 1e3:.2f} ms per step)", flush=True)
    return 0


def cmd_convert(args) -> int:
    from dsv3.checkpoint import convert_fp8_to_bf16

    convert_fp8_to_bf16(args.input, args.output)
    print(f"wrote {args.output}")
    return 0


# Subcommands that live beside the code they drive; each module offers register(subparsers).
PLUGGED = ("dsv3.serve.command", "dsv3.train.command")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in Python")
    top.add_argument("--version", action="version", version=f"dsv3 {__version__}")
    sub = top.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt (or every line of a file)")
    add_model_options(g)
    add_sampling_options(g, temperature=0.0)
    prompts = g.add_mutually_exclusive_group(required=True)
    prompts.add_argument("prompt", nargs="?", metavar="PROMPT", help="the prompt text")
    prompts.add_argument("--input-file", help="one prompt per line; answers printed in order, one per line")
    g.add_argument("--jsonl", action="store_true", help="with --input-file: print JSON lines")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with the checkpoint's chat template")
    add_model_options(c)
    add_sampling_options(c, temperature=0.7)
    c.add_argument("--system", default=None, help="a system prompt")
    c.set_defaults(func=cmd_chat)

    b = sub.add_parser("bench", help="decode and prefill throughput of a checkpoint (random prompts)")
    add_model_options(b)
    b.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=128)
    b.set_defaults(func=cmd_bench)

    v = sub.add_parser("convert", help="convert a checkpoint (DeepSeek's fp8_cast_bf16.py)")
    v.add_argument("--fp8-to-bf16", action="store_true", required=True, help="the one conversion there is")
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
    top.subcommands = sub.choices  # name -> its parser, for main's usage errors
    return top


def main(argv: list[str] | None = None) -> int:
    try:
        top = parser()
    except ValueError as e:  # a bad setting read at import (DSV3_KERNELS, ...): one line, not a traceback
        print(f"dsv3: {e}", file=sys.stderr)
        return 2
    args, unknown = top.parse_known_args(argv)
    if unknown:  # argparse would blame the top-level parser and print its usage, not the subcommand's
        top.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"dsv3 {args.command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`dsv3 generate ... | head`): stop quietly. Python's recipe: point stdout at
        # devnull so that the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
