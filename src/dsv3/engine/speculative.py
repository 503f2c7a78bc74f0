"""Multi-token prediction as speculative decoding (V3 §2.2 and §5.4.3: the MTP module drafts, the main
model verifies), in three pieces that the engine drives; the engine owns scheduling, the cache and the
runner.

- `MTPProposer.propose`: drafts (and the distributions they came from) for the sequences of a step.
  The checkpoint's MTP module takes at position i the main model's hidden state h_i and the token at
  i+1, and predicts the token at i+2; for k > 1 drafts it is applied again to its own output and draft.
- `verify`: the main model scores the real token and the k drafts in one forward; per sequence, the
  drafts that stand and one token of the main model:
  - greedy: a draft stands while it equals the main model's argmax;
  - sampling: the standard rejection rule (Leviathan et al. 2023, Chen et al. 2023): draft d drawn from
    q stands with probability min(1, p(d) / q(d)); at the first rejection a token is drawn from
    norm(max(p - q, 0)); if all stand, one more from p. Draft and target distributions are both
    `sampling.probabilities` (temperature, top-k, top-p) of their logits, so the output is distributed
    as sampling from p.
- `SpeculationPolicy`: where speculation pays, decided from measurements (below).

Greedy, the engine runs verification and the next draft in one forward (`ModelRunner.greedy_draft`, inside a
CUDA graph); with k > 1 drafts the MTP module then runs again on its own output at each sequence's last valid
row, k - 1 times, one row per sequence (`ModelRunner.chain_drafts`: one MTP block forward per draft, no host
read between). Such steps are scheduled asynchronously: step n+1 is launched before step n's verification
is read, packed as if step n rejected every draft, and `ModelRunner.continue_speculation` moves its rows on the
device by what step n recorded (`ModelRunner.record_speculation`); the host applies the record a step later
(`LLMEngine._resolve_speculative`). There every sequence drafts (its draft costs no forward of its own): the
per-sequence rule below applies to the synchronous steps.

What is guaranteed:
- CPU, float32: greedy output equals plain decoding's token for token (tests/test_speculative.py).
- CPU, float32, asynchronous steps: the same (tests/test_speculative.py, with stops inside a window and two ranks).
- GPU, bf16: the verifying forward runs 1 + k rows per sequence, plain decoding one, so the two run
  matrix products of different shapes (other tilings, other summation orders) and their logits differ
  within bf16 rounding. Greedy tokens are the model's argmax within that rounding: at a near-tie they
  may differ from plain decoding's (H200, embedded model, 128-token prompts at 7abbec2: 9 of 16 prompts
  diverged somewhere in 128 greedy tokens, each at a near-tie).
- Sampling: each token is distributed as plain sampling's (tested statistically on the CPU). A seeded
  request repeats exactly only without speculation: drafts draw from its generator too, and whether a
  step drafts depends on measured timings.

The policy. Speculation runs in a step only if some decoding sequence drafts (`pays`) and the batch
is at most `max_batch` (the verification graphs are captured up to there) and the batch's bucket (the
next power of two of the number of decoding sequences) chose it:
- per bucket, the engine records each decode-only step's wall time (`clock`) and the tokens it
  produced, speculating and plain apart; tokens/s over the last WINDOW steps of each mode compare.
  The first step after a switch of mode is not measured: it pays for the switch (draining a plain
  step in flight; no drafts made yet).
- a new bucket measures speculation for WINDOW steps, then plain decoding, then runs the faster (a
  tie goes to plain decoding). After a run of the faster mode it measures the slower one again for
  WINDOW steps and runs the faster again: such a re-probe costs about PROBE_COST of the time, as the
  run lasts WINDOW * (ratio - 1) / PROBE_COST steps, where ratio is how many times faster the faster is;
  but the first run after the faster mode changed lasts at most FIRST_RUN steps, and each next twice the one
  before, so that a measurement spoiled by a slow moment is soon taken again (though never so few that the
  re-probe costs more than EARLY_PROBE_COST: the synchronous path with k = 2 drafts is ~30x slower).
- per sequence: one whose drafts stood less than MIN_ACCEPTANCE of the time over its first PROBE drafts
  stops drafting for good (`pays`).
clock=None turns measuring off: speculation wherever the batch is at most max_batch. Positions decoded
without speculation leave the MTP module's cache unwritten, so drafts made after speculation turns back
on attend to stale latents there: acceptance may be lower, outputs are unchanged (verification decides).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from dsv3.engine.runner import ModelRunner
from dsv3.engine.sampling import SamplingParams, probabilities
from dsv3.engine.sequence import ScheduledItem, Sequence


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def accept(logits: torch.Tensor | None, drafts: list[int], draft_probs: list[torch.Tensor | None],
           params: SamplingParams, generator: torch.Generator | None, target: list[int] | None = None) -> list[int]:
    """The tokens that stand after verifying one sequence: accepted drafts then one token of the main model.

    logits: (k+1, V) main-model logits at the real token and at each draft (None when greedy and target
    is given); target: their argmaxes when the caller has them (one device read for the whole batch).
    """
    if params.greedy:
        target = logits.argmax(dim=-1).tolist() if target is None else target
        out = []
        for d, t in zip(drafts, target):
            if d != t:
                break
            out.append(d)
        return out + [target[len(out)]]
    p = probabilities(logits, [params] * len(logits))
    out = []
    for j, (d, q) in enumerate(zip(drafts, draft_probs)):
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * float(q[d]) <= float(p[j, d]):  # u < p/q, without dividing by a tiny q
            out.append(d)
            continue
        residual = (p[j] - q).clamp(min=0)
        total = float(residual.sum())
        return out + [draw(residual / total, generator) if total > 0 else draw(p[j], generator)]
    return out + [draw(p[len(drafts)], generator)]


def verify(seqs: list[Sequence], logits: torch.Tensor | None, argmax: list[int]) -> list[list[int]]:
    """Per sequence, the tokens that stand: its accepted drafts (`seq.draft`), then one token of the main
    model. logits (R, V): the main model's kept rows, 1 + len(seq.draft) per sequence in order (None when
    every sequence is greedy); argmax: their argmaxes."""
    out, row = [], 0
    for seq in seqs:
        n = 1 + len(seq.draft)
        window = logits[row:row + n] if logits is not None else None
        out.append(accept(window, seq.draft, seq.draft_probs, seq.params, seq.generator, argmax[row:row + n]))
        row += n
    return out


class MTPProposer:
    """Drafts k tokens per sequence with the checkpoint's MTP module, through the engine's runner.

    fused: whether verification can draft in the same forward instead (greedy: ModelRunner.greedy_draft,
    then ModelRunner.chain_drafts for k > 1); the engine then takes the drafts from that forward and `propose`
    is called only after prefills. Tests turn it off to compare the two paths.
    """

    def __init__(self, runner: ModelRunner, k: int):
        self.runner, self.k, self.depths = runner, k, len(runner.model.mtp_layers)
        self.fused = True

    def propose(self, items: list[ScheduledItem], hidden_rows: list[int], rows_mode: bool
                ) -> list[tuple[list[int], list[torch.Tensor | None]]]:
        """Run the MTP module over the positions of the last forward (filling its cache) and draft.

        items: (sequence, first position, the tokens one position ahead of that forward's, 1 if it
        drafts else 0), as `ModelRunner.pack` takes them; hidden_rows: the rows of the last forward's
        hidden states that each item's positions continue. Returns k drafts and the distributions they
        were drawn from (None when greedy) for every item that drafts, in order.
        """
        drafting = [item.seq for item in items if item.keep]
        drafts = [([], []) for _ in drafting]
        for depth in range(self.k):
            step = self.runner.pack(items, rows_mode, graph=False)
            step.mtp_depth = min(depth, self.depths - 1)
            step.hidden_rows = torch.tensor(hidden_rows, device=self.runner.device)
            _, logits = self.runner.run(step)
            if not drafting:
                break
            for seq, (tokens, probs), row, greedy_token in zip(drafting, drafts, logits, logits.argmax(dim=-1).tolist()):
                token, q = self.draft_token(seq, depth, row, greedy_token)
                tokens.append(token)
                probs.append(q)
            # The next depth continues from each drafting sequence's last row, one position further.
            hidden_rows = [end - 1 for end, item in zip(step.batch.query_starts[1:], items) if item.keep]
            items = [ScheduledItem(seq, seq.num_tokens - 1 + depth, [tokens[-1]], 1)
                     for seq, (tokens, _) in zip(drafting, drafts)]
            rows_mode = True
        return drafts

    def draft_token(self, seq: Sequence, depth: int, logits: torch.Tensor, greedy_token: int
                    ) -> tuple[int, torch.Tensor | None]:
        """Draft `depth` of a sequence from the MTP module's logits (V,) and the distribution it came from
        (greedy_token: their argmax, read for the whole batch at once)."""
        if seq.params.greedy:
            return greedy_token, None
        q = probabilities(logits[None], [seq.params])[0]
        return draw(q, seq.generator), q


@dataclass
class _Bucket:
    """A batch-size bucket's measurements: (seconds, tokens) of its last WINDOW steps of each mode."""
    window: int
    spec: deque = field(init=False)
    plain: deque = field(init=False)
    speculate: bool = True   # the mode it runs now
    probing: bool = True     # whether this run measures that mode (else it runs the faster)
    left: int = 0            # measured steps of this run still to go
    runs: int = 0            # runs of the faster mode since the faster last changed (FIRST_RUN doubles each)
    faster: bool | None = None  # the mode the last measurement found faster (None: not measured yet)

    def __post_init__(self):
        self.spec, self.plain, self.left = deque(maxlen=self.window), deque(maxlen=self.window), self.window


class SpeculationPolicy:
    """Where speculation runs: per sequence (`pays`) and per batch-size bucket (`wants`, from the steps
    `record`ed); the module docstring says how."""

    # A sequence whose drafts are rarely right stops drafting: below this acceptance over its first
    # PROBE drafts, speculation costs more than it saves (moonlight-16b on an H100 with untrained MTP
    # weights: 0% accepted, 0.80x at batch 1, 0.72x at batch 8).
    MIN_ACCEPTANCE, PROBE = 0.3, 16
    WINDOW = 8          # steps of each mode that a bucket's tokens/s is measured over
    PROBE_COST = 0.01   # the share of time that measuring the slower mode again may cost
    MAX_RUN = 1 << 16   # steps of the faster mode at most between two measurements of the slower
    # The first run of the faster mode after it changed lasts at most FIRST_RUN steps, each next one twice the last
    # (up to PROBE_COST's length): one bad measurement (Triton compiling in the first steps, another process on the
    # host) cannot hold a mode off for long. On an H200, k = 2 drafts measured in the embedded model's first steps
    # held speculation off for every timed run (0.96x at batch 1; 1.80x where it ran).
    FIRST_RUN = 64
    EARLY_PROBE_COST = 0.1  # but never so short that a re-probe costs more than this share (a mode 30x slower)

    def __init__(self, max_batch: int, clock: Callable[[], float] | None = time.perf_counter):
        self.max_batch, self.clock = max_batch, clock
        self.buckets: dict[int, _Bucket] = {}
        self.last_speculated: bool | None = None

    def pays(self, seq: Sequence) -> bool:
        """Whether the sequence should keep drafting (it is not returning drafts that never stand)."""
        return seq.num_drafted < self.PROBE or seq.num_accepted >= self.MIN_ACCEPTANCE * seq.num_drafted

    def wants(self, batch: int) -> bool:
        """Whether a step of `batch` decoding sequences should speculate."""
        if batch > self.max_batch:
            return False
        if self.clock is None:
            return True
        bucket = self.buckets.get(self.bucket(batch))
        return bucket is None or bucket.speculate

    @staticmethod
    def bucket(batch: int) -> int:
        """The next power of two: batches that pad to about the same forward share their measurements."""
        return 1 << max(batch - 1, 0).bit_length()

    def record(self, batch: int, speculated: bool, seconds: float, tokens: int) -> None:
        """A decode-only step of `batch` decoding sequences took `seconds` and produced `tokens`."""
        switched, self.last_speculated = speculated != self.last_speculated, speculated
        if self.clock is None or switched or batch > self.max_batch:
            return
        b = self.buckets.setdefault(self.bucket(batch), _Bucket(self.WINDOW))
        (b.spec if speculated else b.plain).append((seconds, tokens))
        if speculated != b.speculate:  # a step the bucket did not choose (drafts left to verify, none pays)
            return
        b.left -= 1
        if b.left > 0:
            return
        if len(b.plain) < self.WINDOW:  # a new bucket: speculation measured, plain decoding next
            b.speculate, b.probing, b.left = False, True, self.WINDOW
            return
        spec_s, spec_t = map(sum, zip(*b.spec))
        plain_s, plain_t = map(sum, zip(*b.plain))
        # Each mode's tokens/s times both windows' seconds: no division (a fake clock may give 0 s).
        spec_rate, plain_rate = spec_t * plain_s, plain_t * spec_s
        spec_wins = spec_rate > plain_rate
        if b.probing:  # run the faster, long enough that measuring the slower again costs ~PROBE_COST
            fast, slow = max(spec_rate, plain_rate), min(spec_rate, plain_rate)
            ratio = fast / slow if slow > 0 else math.inf
            if spec_wins != b.faster:
                b.faster, b.runs = spec_wins, 0
            b.speculate, b.probing = spec_wins, False
            cost = self.WINDOW * (ratio - 1)  # a re-probe's cost, in steps of the faster mode
            b.left = max(1, math.ceil(min(self.MAX_RUN, cost / self.PROBE_COST,
                                          max(self.FIRST_RUN << b.runs, cost / self.EARLY_PROBE_COST))))
            b.runs = min(b.runs + 1, 16)
        else:  # measure the slower again: it may have become the faster
            b.speculate, b.probing, b.left = not spec_wins, True, self.WINDOW
