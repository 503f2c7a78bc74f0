"""A request as the engine tracks it: its tokens, its cache blocks, its progress and its result."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from dsv3.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Sequence:
    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None,
                 request_id: str | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.all_token_ids = list(prompt_token_ids)
        self.params = params
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_cached_tokens = 0      # tokens whose latents are in the cache
        self.pending = 0                # tokens sampled on the device, not yet in all_token_ids (async scheduling)
        self.hashed_blocks = 0          # leading blocks registered in the prefix cache
        self.last_hash: int | None = None
        self.text = ""                  # detokenized output, stop strings cut off
        self.decoder = None             # the tokenizer's StreamDecoder for this sequence, made on first use
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] = []
        self.generator: torch.Generator | None = None
        self.num_preemptions = 0
        self.draft: list[int] = []      # speculative tokens waiting to be verified
        self.draft_probs: list[torch.Tensor | None] = []
        self.num_drafted = 0            # acceptance statistics of speculative decoding
        self.num_accepted = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids) + self.pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_cached_tokens

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED


@dataclass
class RequestOutput:
    """What `LLM.generate` returns per prompt (and what the server streams, piece by piece)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class ScheduledItem(NamedTuple):
    """One sequence's part of a step, as the engine hands it to the runner (ModelRunner.pack)."""
    seq: Sequence
    first: int           # the position of its first token this step
    tokens: list[int]    # the tokens it computes (PENDING where the step before's token is not read yet)
    keep: int            # rows at its end whose logits are wanted: 0 for a prefill chunk that completes nothing
