"""`EngineConfig`: every option of the engine in one dataclass. `dsv3.LLM`, `LLMEngine`, `dsv3 serve` and the CLI
all take it; the CLI's flags are made from its fields (`add_engine_options`), as `dsv3 train`'s are from
TrainConfig, so a new option is one field with its help text."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

FP8_CHOICES = ("auto", "keep", "dequantize")
EXPERT_CHOICES = ("ep", "tp")
DTYPE_CHOICES = ("bfloat16", "float16", "float32")  # checkpoint.load.DTYPES's names


@dataclass(frozen=True)
class EngineConfig:
    # loading
    dtype: str | None = field(default=None, metadata={
        "choices": DTYPE_CHOICES,
        "help": "activations' dtype: bfloat16, float16, float32 (default: bfloat16 on a GPU, float32 on the CPU)"})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, cuda:1, ... (default: cuda when available)"})
    fp8: str = field(default="auto", metadata={
        "choices": FP8_CHOICES,
        "help": "an FP8 checkpoint's weights: keep them FP8 (half the memory; the FP8 kernels), dequantize them "
                "exactly to --dtype, or auto: keep on a GPU with FP8 kernels (compute capability 8.9+), else "
                "dequantize"})
    skip_tokenizer_init: bool = field(default=False, metadata={
        "help": "load no tokenizer: token-id prompts only (also the case when the checkpoint has no tokenizer.json)"})
    experts: str | None = field(default=None, metadata={
        "choices": EXPERT_CHOICES,
        "help": "under torchrun: split the routed experts by expert (ep) or each expert's intermediate dim (tp) "
                "(default: $DSV3_EXPERTS, else ep)"})
    # the batch and the latent cache
    max_num_seqs: int = field(default=256, metadata={"help": "requests decoded together at most"})
    max_num_batched_tokens: int = field(default=8192, metadata={
        "help": "tokens a step computes at most (prefill chunks beyond it continue next step); a step of short "
                "prompts within cuda_graph_max_tokens replays a CUDA graph, larger or long-prompt ones run eagerly"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "longest sequence, prompt and answer (default: the checkpoint's max_position_embeddings)"})
    block_size: int = field(default=16, metadata={"help": "tokens per block of the paged latent cache"})
    num_blocks: int | None = field(default=None, metadata={
        "help": "cap the latent cache at this many blocks (default: what cache_memory_fraction of free GPU memory "
                "holds; on the CPU, max_num_seqs full-length sequences)"})
    cache_memory_fraction: float = field(default=0.8, metadata={
        "help": "fraction of the GPU memory free after loading that the latent cache takes"})
    # scheduling
    cuda_graphs: bool = field(default=True, metadata={"help": "replay decode steps as CUDA graphs (GPU)"})
    cuda_graph_max_tokens: int = field(default=8192, metadata={
        "help": "rows of the largest CUDA graph for steps that prefill short prompts beside decoding ones (decode "
                "rows plus prompt tokens; at most max_num_batched_tokens; 0: decode steps only); larger steps run "
                "eagerly. Each captured size holds its outputs' memory and adds to the start-up time"})
    async_scheduling: bool = field(default=True, metadata={
        "help": "launch each step before reading the one before's tokens (host work hides behind the GPU's)"})
    mixed_step_tokens: int = field(default=512, metadata={
        "help": "while sequences decode, a step computes at most this many tokens, their rows first and prompt "
                "tokens in the rest (Sarathi-Serve's token budget): prompts ride in decode steps, whose weight reads "
                "are paid anyway, and a long prompt never stalls the decoding ones for a whole compute-bound step "
                "(0: up to max_num_batched_tokens)"})
    prefill_delay_factor: float = field(default=0.0, metadata={
        "help": "while requests decode, hold new prompts until the oldest waited this many times the last "
                "prefilling step, so one step prefills them together (0: admit at once; serve's default differs)"})
    deterministic: bool = field(default=False, metadata={
        "help": "batch-invariant results: a request's tokens and logits do not depend on what else is in the batch, "
                "on prefill chunking, prefix-cache hits or speculation (every matmul one fixed-tile GEMM, attention "
                "a fixed split, prompts prefilled as decode rows); slower, see the README's Deterministic mode"})
    # speculative decoding
    speculative_tokens: int = field(default=0, metadata={
        "help": "draft this many tokens with the checkpoint's MTP module (0: off)"})
    speculative_max_batch: int = field(default=32, metadata={
        "help": "stop drafting above this many decoding sequences"})

    def __post_init__(self):
        for name, choices in (("fp8", FP8_CHOICES), ("experts", EXPERT_CHOICES)):
            if getattr(self, name) not in choices and not (name == "experts" and self.experts is None):
                raise ValueError(f"EngineConfig.{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        if self.dtype is not None and self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
        positive = ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_model_len", "num_blocks")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"EngineConfig.{name} must be at least 1; got {value}")
        if not 0 < self.cache_memory_fraction <= 1:
            raise ValueError(f"EngineConfig.cache_memory_fraction must be in (0, 1]; got {self.cache_memory_fraction}")
        for name in ("speculative_tokens", "prefill_delay_factor", "cuda_graph_max_tokens", "mixed_step_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"EngineConfig.{name} cannot be negative; got {getattr(self, name)}")

    @classmethod
    def of(cls, config: EngineConfig | None = None, **options) -> EngineConfig:
        """config with some fields replaced; an unknown option names itself and the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; EngineConfig has {', '.join(sorted(known))}")
        options = {k: (str(v).removeprefix("torch.") if k in ("dtype", "device") and v is not None else v)
                   for k, v in options.items()}
        return dataclasses.replace(config or cls(), **options)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineConfig:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_model_options(p: argparse.ArgumentParser, **defaults) -> None:
    """--model, then one flag per EngineConfig field (defaults: this command's, else the dataclass's): the options
    of every command that runs a model (generate, chat, bench, serve)."""
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    add_engine_options(p, **defaults)


def build_llm(args: argparse.Namespace):
    """The dsv3.LLM that add_model_options' flags describe."""
    from dsv3.engine.llm import LLM

    return LLM(args.model, EngineConfig.from_args(args), progress=True)


def add_engine_options(p: argparse.ArgumentParser, **defaults) -> None:
    """One flag per EngineConfig field (--max-num-seqs for max_num_seqs); defaults: a command's own defaults."""
    for f in dataclasses.fields(EngineConfig):
        flag, default = "--" + f.name.replace("_", "-"), defaults.get(f.name, f.default)
        help_text = f.metadata.get("help", "") + ("" if default is None else " (default: %(default)s)")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata.get("help"))
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        p.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"), help=help_text)
