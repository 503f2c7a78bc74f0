"""`dsv3 train`, `dsv3 train-tokenizer` and `dsv3 train-classifier`, registered into dsv3's CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from dsv3.train.trainer import TrainConfig

HELP = {
    "steps": "optimizer steps", "batch_size": "sequences per micro-batch per rank", "seq_len": "tokens per sequence",
    "grad_accum": "micro-batches per optimizer step", "lr": "peak learning rate (AdamW)",
    "bias_gamma": "expert-bias update speed gamma (V3 §2.1.2; 0 turns the update off)",
    "bias_gamma_until": "fraction of the steps with gamma > 0 (paper: 14.3T of 14.8T tokens)",
    "balance_alpha": "sequence-wise balance loss weight alpha (Eq. 17)",
    "mtp_lambda": "MTP loss weight lambda at first (Eq. 25)", "mtp_lambda_later": "MTP loss weight afterwards",
    "mtp_lambda_until": "fraction of the steps with the first lambda (paper: 10T of 14.8T tokens)",
    "passage_chars": "start a BOS every ~N characters of a document, at blank lines (0: only at its start)",
    "held_out": "fraction of the data held out for evaluation when no --eval-data is given",
    "eval_every": "evaluate every N steps, and at the end (0: only at the end)", "save_every": "checkpoint every N steps",
    "keep_checkpoints": "checkpoints kept (the newest)", "max_shard_mib": "largest safetensors shard of the final model",
    "device": "cpu, cuda, cuda:1 ... (default: cuda when available)",
}


def add_train_config_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field (--batch-size for batch_size), defaulting to the dataclass."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=HELP.get(f.name))
            continue
        kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
        p.add_argument(flag, type=kind, default=default, help=HELP.get(f.name, ""))


def cmd_train(args) -> int:
    from dsv3.train.trainer import Trainer

    try:
        import matplotlib  # noqa: F401  (the plots are drawn after the last step: check before the first)
    except ImportError as e:
        raise SystemExit(f"dsv3 train needs matplotlib for its plots ({e}); pip install 'dsv3[train]'") from None
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    trainer = Trainer(args.model_config, args.data, args.out, tokenizer=args.tokenizer, config=config,
                      eval_data=args.eval_data, resume=args.resume, init_from=args.init_from)
    final = trainer.run()
    if trainer.main and final:
        print(json.dumps(final), file=sys.stderr)
        print(f"model written to {args.out}", file=sys.stderr)
    return 0


def cmd_train_tokenizer(args) -> int:
    from dsv3.train.bpe import train_tokenizer

    tok = train_tokenizer(args.data, args.vocab_size, args.out, min_frequency=args.min_frequency)
    print(f"wrote {args.out}/tokenizer.json ({tok.vocab_size} tokens) and tokenizer_config.json", file=sys.stderr)
    return 0


def cmd_train_classifier(args) -> int:
    from dsv3.default_model import default_model_path
    from dsv3.tokenizer import Tokenizer
    from dsv3.train.classify import accuracy, classifier_from_lm, finetune_classifier, play_examples, split_examples

    path = args.model or default_model_path()
    tokenizer = Tokenizer.from_dir(path)
    examples = play_examples(args.data, tokenizer, max_tokens=args.max_tokens, seed=args.seed)
    train, test = split_examples(examples, args.test_fraction, args.seed)
    model = classifier_from_lm(path, len(args.data), tokenizer.pad_token_id)
    losses = finetune_classifier(model, train, steps=args.steps, lr=args.lr, train_backbone=args.train_backbone,
                                 seed=args.seed)
    result = {"labels": examples.names, "train_examples": len(train.labels), "test_examples": len(test.labels),
              "final_loss": losses[-1], "train_accuracy": accuracy(model, train), "test_accuracy": accuracy(model, test),
              "chance": 1 / len(args.data)}
    print(json.dumps(result, indent=2))
    if args.out:
        from dsv3.checkpoint import save_checkpoint

        save_checkpoint(model, model.config, args.out, progress=False)
    return 0


def register(subparsers) -> None:
    t = subparsers.add_parser("train", help="train a DeepSeek-V3 model with the paper's recipe",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--model-config", required=True, help="a Hugging Face DeepSeek-V3 config.json (vocab_size optional)")
    t.add_argument("--data", nargs="+", required=True, help="text or JSONL (field \"text\") files, .gz allowed")
    t.add_argument("--eval-data", nargs="+", default=None, help="held-out files (default: a slice of --data)")
    t.add_argument("--out", required=True, help="final model (Hugging Face layout), checkpoints/, metrics, plots/")
    t.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the embedded model's)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--init-from", default=None, help="start from this Hugging Face checkpoint's weights (fine-tuning)")
    add_train_config_options(t)
    t.set_defaults(func=cmd_train)

    k = subparsers.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer with DeepSeek's special tokens")
    k.add_argument("--data", nargs="+", required=True)
    k.add_argument("--vocab-size", type=int, required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--min-frequency", type=int, default=2)
    k.set_defaults(func=cmd_train_tokenizer)

    c = subparsers.add_parser("train-classifier",
                              help="fine-tune a sequence-classification head: which play is a speech from")
    c.add_argument("--data", nargs="+", required=True, help="one play per file (the label is the file)")
    c.add_argument("--model", default=None, help="causal-LM checkpoint for the backbone (default: the embedded model)")
    c.add_argument("--steps", type=int, default=300)
    c.add_argument("--lr", type=float, default=1e-2)
    c.add_argument("--max-tokens", type=int, default=64)
    c.add_argument("--test-fraction", type=float, default=0.25)
    c.add_argument("--train-backbone", action="store_true", help="fine-tune the backbone too, not only the head")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default=None, help="save the classifier here")
    c.set_defaults(func=cmd_train_classifier)
