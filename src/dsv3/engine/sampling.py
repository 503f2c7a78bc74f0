"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0            # 0 or -1: no limit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # how many top alternatives to report per token (0 = only the chosen one)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1, 0 or positive, got {self.top_k}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be between 0 and 20, got {self.logprobs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           argmax: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of logits (S, V) float32. Each row's result depends only on its own row,
    parameters and generator, never on the rest of the batch. argmax: the logits' argmax if the
    forward took it already; the sampled rows are then written into it, and it is returned."""
    tokens = logits.argmax(dim=-1) if argmax is None else argmax
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return tokens
    rows = torch.tensor(sampled_rows, device=logits.device)
    probs = probabilities(logits[rows], [params[i] for i in sampled_rows])
    # Exponential race (Gumbel-max in another form): argmax p / q with q ~ Exp(1) draws from p,
    # and each row's noise comes from its own generator, so a seeded request repeats exactly.
    noise = torch.stack([torch.empty_like(probs[j]).exponential_(generator=generators[i])
                         for j, i in enumerate(sampled_rows)])
    tokens[rows] = (probs / noise).argmax(dim=-1)
    return tokens


def probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution each row samples from: temperature, then top-k / top-p, then softmax.
    logits (S, V), one SamplingParams per row (none greedy) -> probs (S, V) float32. Speculative
    decoding's draft and target distributions are this one too, so that rejection sampling keeps it."""
    x = logits.float() / torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
    x = filter_top_k_top_p(x, [p.top_k for p in params], [p.top_p for p in params])
    return x.softmax(dim=-1)


def filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k and outside its top-p nucleus."""
    vocab = logits.shape[-1]
    if all(kk <= 0 or kk >= vocab for kk in top_k) and all(pp >= 1 for pp in top_p):  # decided on the host
        return logits
    k = torch.tensor([min(kk, vocab) if kk > 0 else vocab for kk in top_k], device=logits.device)
    p = torch.tensor(top_p, device=logits.device, dtype=logits.dtype)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)
    drop = rank[None, :] >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches p: a token goes when the mass before it already does.
    drop |= (probs.cumsum(dim=-1) - probs) >= p[:, None]
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
