"""The training loop: DeepSeek-V3's recipe on a causal LM, on one device or many (torchrun, DDP).

Per optimizer step: grad_accum micro-batches (bf16 autocast on the GPU, float32 on the CPU), gradient
clipping, AdamW at the scheduled learning rate, then the expert-bias update from the loads of the whole
step (§2.1.2). Checkpoints are atomic (checkpoints.py) and hold everything a resume needs to continue
exactly: on the CPU, at the same thread count, a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from dsv3.config import ModelConfig
from dsv3.model import DeepseekV3ForCausalLM, init_weights
from dsv3.tokenizer import Tokenizer
from dsv3.train import checkpoints
from dsv3.train.balance import update_expert_bias
from dsv3.train.data import BatchStream, PackedSequences, eval_batches, read_documents, split_held_out, tokenize_documents
from dsv3.train.losses import CausalLMObjective, evaluate
from dsv3.train.metrics import MetricsLog, plot_metrics
from dsv3.train.schedule import Schedules

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
MiB = 1 << 20


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8                # sequences per micro-batch per rank
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # The recipe (§2.1.2, §2.2, §4.2); the schedules' switch points are fractions of `steps`.
    bias_gamma: float = 0.001
    bias_gamma_until: float = 14.3 / 14.8
    balance_alpha: float = 1e-4
    mtp_lambda: float = 0.3
    mtp_lambda_later: float = 0.1
    mtp_lambda_until: float = 10.0 / 14.8
    passage_chars: int = 0             # > 0: a BOS every ~this many characters of a document (data.tokenize_documents)
    held_out: float = 0.02             # fraction of the data's sequences kept for evaluation (without eval files)
    eval_every: int = 100
    eval_batches: int = 16
    save_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    max_shard_mib: float = 15.0
    device: str | None = None          # None: cuda when available (the local rank's GPU under torchrun)
    progress: bool = True

    def schedules(self) -> Schedules:
        return Schedules(self.steps, self.warmup_steps, self.min_lr_ratio, self.bias_gamma, self.bias_gamma_until,
                         self.mtp_lambda, self.mtp_lambda_later, self.mtp_lambda_until)


def model_config_for(path_or_dict: str | Path | dict, tokenizer: Tokenizer) -> ModelConfig:
    """A Hugging Face config.json for training; vocab_size and the special token ids come from the tokenizer."""
    raw = dict(path_or_dict) if isinstance(path_or_dict, dict) else json.loads(Path(path_or_dict).read_text())
    vocab = raw.setdefault("vocab_size", tokenizer.vocab_size)
    if vocab < tokenizer.vocab_size:
        raise ValueError(f"the model config's vocab_size {vocab} is smaller than the tokenizer's {tokenizer.vocab_size}")
    raw.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return ModelConfig.from_dict(raw)


class Trainer:
    def __init__(self, model_config: str | Path | dict, data: list[str | Path], out_dir: str | Path,
                 tokenizer: str | Path | None = None, config: TrainConfig | None = None,
                 eval_data: list[str | Path] | None = None, resume: bool = False, init_from: str | Path | None = None):
        self.tc = tc = config or TrainConfig()
        self.out = Path(out_dir)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.distributed = self.world_size > 1
        self.device = self._init_device()
        self.main = self.rank == 0

        self.tokenizer_dir = self._tokenizer_dir(tokenizer, resume)
        self.tokenizer = Tokenizer.from_dir(self.tokenizer_dir)
        self.cfg = model_config_for(model_config, self.tokenizer)
        stream = PackedSequences(tokenize_documents(read_documents(data), self.tokenizer, tc.passage_chars), tc.seq_len)
        if eval_data:
            held = PackedSequences(tokenize_documents(read_documents(eval_data), self.tokenizer), tc.seq_len)
            train_idx, eval_set = torch.arange(len(stream)), (held, torch.arange(len(held)))
        else:
            train_idx, eval_idx = split_held_out(len(stream), tc.held_out, tc.seed)
            eval_set = (stream, eval_idx)
        self.batches = BatchStream(stream, train_idx, tc.seed, self.rank, self.world_size)
        self.eval_batches = eval_batches(*eval_set, tc.batch_size, tc.eval_batches) if len(eval_set[1]) else []

        torch.manual_seed(tc.seed)
        self.model = DeepseekV3ForCausalLM(self.cfg, dtype=torch.float32)
        init_weights(self.model, self.cfg.initializer_range)
        if init_from is not None:  # continue from a Hugging Face checkpoint's weights (fresh optimizer and schedule)
            from dsv3.checkpoint import load_state_into

            load_state_into(self.model, init_from, progress=False)
        self.model.to(self.device).train()
        self.objective = CausalLMObjective(self.model)
        self.step_fn = self.objective
        if self.distributed:
            # broadcast_buffers=False: each rank's expert_load counts its own tokens (summed in the bias update).
            self.step_fn = torch.nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[self.device] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8, fused=self.device.type == "cuda")
        self.schedules = tc.schedules()
        self.autocast = torch.bfloat16 if self.device.type == "cuda" else None
        self.step = 0
        self.last_eval: dict[str, float] = {}
        if resume and (latest := checkpoints.load_latest_state(self.out / "checkpoints")) is not None:
            self._load(*latest)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step) if self.main else None

    # ---- setup -----------------------------------------------------------------------------------
    def _init_device(self) -> torch.device:
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if self.tc.device is not None:
            return torch.device(self.tc.device)
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")

    def _tokenizer_dir(self, tokenizer: str | Path | None, resume: bool) -> Path:
        """--tokenizer, else the one a resumed run copied into out/, else the embedded model's; copied into out/."""
        if tokenizer is None and resume and (self.out / "tokenizer.json").is_file():
            return self.out
        if tokenizer is None:
            from dsv3.default_model import default_model_path
            tokenizer = default_model_path()
        tokenizer = Path(tokenizer)
        if self.rank == 0:
            copy_tokenizer(tokenizer, self.out)
        return tokenizer

    # ---- checkpoints -----------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "data": self.batches.state_dict(), "rng": checkpoints.rng_state(),
                "model_config": self.cfg.to_dict(), "train_config": dataclasses.asdict(self.tc)}

    def _load(self, path: Path, state: dict) -> None:
        if state["model_config"] != self.cfg.to_dict():
            raise ValueError(f"--model-config describes another model than the checkpoint {path} (resume with the "
                             "config and tokenizer the run started with)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["data"])
        checkpoints.set_rng_state(state["rng"])
        self.step = state["step"]

    def save(self) -> None:
        if self.main:
            checkpoints.save_checkpoint_atomic(self.out / "checkpoints", self.step, self._state(),
                                               self.tc.keep_checkpoints)
        if self.distributed:
            dist.barrier()

    # ---- one optimizer step ----------------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        with deterministic_on_cpu(self.device):
            return self._train_step()

    def _train_step(self) -> dict[str, torch.Tensor]:
        tc, step = self.tc, self.step
        lr = tc.lr * self.schedules.lr_factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mtp_lambda = self.schedules.mtp_weight(step)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(tc.grad_accum):
            tokens = self.batches.next_batch(tc.batch_size).to(self.device, non_blocking=True)
            sync = not self.distributed or micro == tc.grad_accum - 1
            with (self.step_fn.no_sync() if not sync else contextlib.nullcontext()), \
                    torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                                   enabled=self.autocast is not None):
                out = self.step_fn(tokens, mtp_lambda, tc.balance_alpha)
                (out["loss"] / tc.grad_accum).backward()
            for k, v in out.items():
                sums[k] = sums.get(k, 0) + v.detach() / tc.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # §2.1.2: bias_i += gamma * sign(mean_load - load_i), loads of this whole step across all ranks.
        load_ratio = update_expert_bias(self.objective.moes, self.schedules.gamma(step), self.distributed)
        self.step += 1
        return {**sums, "grad_norm": grad_norm, "load_max_over_mean": load_ratio,
                "lr": lr, "mtp_lambda": mtp_lambda, "gamma": self.schedules.gamma(step)}

    # ---- the loop --------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.eval_batches, self.device, self.autocast) if self.eval_batches else {}

    def run(self, stop_after: int | None = None) -> dict[str, float]:
        """Train to config.steps (or stop after `stop_after` more steps, as a killed run would, keeping its
        checkpoints); then write the final model at the top of out/ and return the held-out metrics."""
        tc = self.tc
        tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum * self.world_size
        end = tc.steps if stop_after is None else min(tc.steps, self.step + stop_after)
        bar = tqdm(total=tc.steps, initial=self.step, disable=not (tc.progress and self.main), desc="train",
                   unit="step", dynamic_ncols=True)
        window: list[dict] = []
        t0 = time.perf_counter()
        while self.step < end:
            window.append(self.train_step())
            bar.update()
            last = self.step == tc.steps
            record = None
            if self.step % tc.log_every == 0 or last:
                elapsed = time.perf_counter() - t0
                record = self._summary(window, tokens_per_step * len(window) / max(elapsed, 1e-9))
                window, t0 = [], time.perf_counter()
                bar.set_postfix(loss=f"{record['ce']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if self.main and (last or (tc.eval_every and self.step % tc.eval_every == 0)):
                self.last_eval = self.evaluate()
                record = (record or {"step": self.step}) | {f"eval_{k}": v for k, v in self.last_eval.items()}
                t0 = time.perf_counter()  # evaluation time is not training throughput
            if record is not None and self.main:
                self.metrics.write(record)
            if (tc.save_every and self.step % tc.save_every == 0) or last:
                self.save()
        bar.close()
        if self.step < tc.steps:
            return {}
        if self.main:
            self.export(self.out)
            try:
                plot_metrics(self.out / "metrics.jsonl", self.out / "plots")
            except ImportError as e:  # the model is written: a missing plotting library must not fail the run
                warnings.warn(f"no plots drawn ({e}); pip install 'dsv3[train]', then dsv3.train.metrics.plot_metrics("
                              f"'{self.out / 'metrics.jsonl'}', '{self.out / 'plots'}') draws them", stacklevel=2)
        if self.distributed:
            dist.barrier()
        return self.last_eval

    def _summary(self, window: list[dict], tokens_per_s: float) -> dict:
        record = {"step": self.step, "tokens": self.step * self.tc.batch_size * self.tc.seq_len * self.tc.grad_accum
                  * self.world_size, "tokens_per_s": tokens_per_s}
        for key in ("loss", "ce", "mtp", "balance", "grad_norm"):
            if key in window[-1]:
                record[key] = torch.stack([w[key].float() for w in window]).mean().item()
        loads = [w["load_max_over_mean"] for w in window if len(w["load_max_over_mean"])]
        record["load_max_over_mean"] = torch.stack(loads).mean(0).tolist() if loads else []
        record.update(lr=window[-1]["lr"], mtp_lambda=window[-1]["mtp_lambda"], gamma=window[-1]["gamma"])
        return record

    def export(self, out_dir: str | Path) -> None:
        """The model in the Hugging Face layout (bf16 weights, float32 routing biases as DeepSeek stores them),
        with the tokenizer files."""
        from dsv3.checkpoint import save_checkpoint

        out_dir = Path(out_dir)
        model = DeepseekV3ForCausalLM(self.cfg, dtype=torch.bfloat16)  # the gate biases stay float32
        model.load_state_dict(self.model.state_dict())
        save_checkpoint(model, model.config, out_dir, max_shard_bytes=int(self.tc.max_shard_mib * MiB), progress=False)
        copy_tokenizer(self.tokenizer_dir, out_dir)


@contextlib.contextmanager
def deterministic_on_cpu(device: torch.device):
    """On the CPU, torch.use_deterministic_algorithms for the step: with 2 or more threads some backward
    reductions of the MoE layers otherwise add in a varying order, and two runs from the same seed part in the
    last bits after the first step (tests/test_train.py). Measured at no cost in step time on the CPU; on the
    GPU (atomics, cuBLAS workspaces) runs are not bit-identical and this is not asked of them."""
    if device.type != "cpu":
        yield
        return
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    if src.resolve() == dst.resolve():
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
