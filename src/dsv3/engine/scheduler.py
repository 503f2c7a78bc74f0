"""Continuous batching: every step, running sequences decode and waiting ones are admitted and
prefilled in chunks, within a token budget and without ever over-committing the latent cache.
When the cache runs out, the newest running sequence is preempted: its blocks are freed and it is
recomputed later from its tokens (nothing is lost).

While sequences decode, a step computes at most `mixed_step_tokens` tokens (Sarathi-Serve's token budget): the
decoding rows first, prompt tokens (new prompts, and later chunks of admitted ones) in the rest. A decode step's
time goes to reading the weights, so prompt rows beside it cost little, and a long prompt never stalls every
decoding sequence for a whole compute-bound step. On an H200 (moonlight-16b) a 512-row step of 256 decode rows and
256 prompt rows replays in 11.7-12.7 ms against 10.7-11.4 for the 256 decode rows alone: 3.5-7 us a prompt row,
against ~9 us in a large prefilling step; 64 clients of serve 93% of the engine against 90% with whole prompt waves,
TTFT p50 38 ms against 68 (bench/NOTES.md, session 15). With nothing decoding, prompts take the whole
max_num_batched_tokens.

Admission can wait a little (`prefill_delay_factor`, vLLM's scheduler delay): while sequences decode, a step
that prefills costs several decode steps (on a GPU one with long prompts runs eagerly, outside the graphs), and
requests that arrive one by one would each bring one such step. Holding the waiting ones until the oldest has waited
`prefill_delay_factor` times the last prefilling step's duration lets one step prefill them together. Nothing
waits when no sequence runs, nor once the waiting prompts fill the step's token budget, nor when `graphed` says the
step with them all would still replay a CUDA graph (then it costs about what its rows cost, and holding prompts back
only adds to their time to first token).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from dsv3.engine.cache import BlockManager
from dsv3.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_delay_factor: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 graphed: Callable[[list[tuple[Sequence, int]]], bool] | None = None, mixed_step_tokens: int = 0):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.mixed_step_tokens = mixed_step_tokens  # tokens of a step while sequences decode (0: no such cap)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefill_delay_factor, self.clock = prefill_delay_factor, clock
        self.graphed = graphed                 # would a step of these (sequence, tokens) replay a graph?
        self.arrival: dict[int, float] = {}    # seq_id -> when it was added (for the admission delay)
        self.last_schedule = (0.0, False)      # when schedule last ran, and whether it admitted a prompt
        self.prefill_latency = 0.0             # how long the last step that admitted prompts took

    def add(self, seq: Sequence, max_len: int) -> None:
        """max_len: the most tokens the sequence can reach. It must fit the cache alone, so that
        preemption can always make room for it."""
        if self.blocks.blocks_needed(max_len) > self.blocks.num_blocks:
            raise ValueError(f"{seq.num_tokens} prompt tokens + up to {max_len - seq.num_tokens} new ones cannot fit "
                             f"the latent cache ({self.blocks.num_blocks * self.blocks.block_size} tokens)")
        self.waiting.append(seq)
        self.arrival[seq.seq_id] = self.clock()

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, skip=None) -> list[tuple[Sequence, int]]:
        """The sequences of the next step and how many of their tokens each computes; skip(seq) true:
        a running sequence that sits this step out."""
        now = self.clock()
        if self.last_schedule[1]:
            self.prefill_latency = now - self.last_schedule[0]
        budget, scheduled = self.max_num_batched_tokens, []
        decoding = sum(1 + len(seq.draft) for seq in self.running
                       if seq.status == Status.RUNNING and seq.num_uncomputed == 1)  # rows, drafts included
        prompt_budget = max(0, self.mixed_step_tokens - decoding) if decoding and self.mixed_step_tokens else budget
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != Status.RUNNING or (skip is not None and skip(seq)):  # preempted below: for an older one
                continue
            prefilling = seq.num_uncomputed > 1
            if prefilling and prompt_budget == 0:  # its next chunk waits for a step with room
                continue
            while not self.blocks.can_append(seq, 0):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            self.blocks.append(seq)
            if seq.draft and (budget < 1 + len(seq.draft) or not self.blocks.can_append(seq, len(seq.draft))):
                seq.draft, seq.draft_probs = [], []  # no room to verify: decode plainly this step
            self.blocks.append(seq, len(seq.draft))
            n = min(seq.num_uncomputed + len(seq.draft), budget, prompt_budget if prefilling else budget)
            scheduled.append((seq, n))
            budget -= n
            prompt_budget -= n if prefilling else 0
        budget_for_prompts = min(budget, prompt_budget)
        admitting = (self.waiting and budget_for_prompts > 0 and len(self.running) < self.max_num_seqs
                     and self.admit_now(now, budget_for_prompts, scheduled))
        self.last_schedule = (now, bool(admitting))
        budget = budget_for_prompts
        while admitting and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.arrival.pop(seq.seq_id, None)
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def admit_now(self, now: float, budget: int, scheduled: list[tuple[Sequence, int]] = ()) -> bool:
        """Whether waiting prompts are admitted this step, or wait to be prefilled together (see the module)."""
        if not self.prefill_delay_factor or not self.running:
            return True
        if sum(seq.num_uncomputed for seq in self.waiting) >= budget:
            return True
        waiting = [(seq, seq.num_uncomputed) for seq in self.waiting]
        if self.graphed is not None and self.graphed(list(scheduled) + waiting):
            return True
        oldest = min(self.arrival.get(seq.seq_id, now) for seq in self.waiting)
        return now - oldest >= self.prefill_delay_factor * self.prefill_latency

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.draft, seq.draft_probs = [], []
        self.blocks.free_sequence(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.arrival.setdefault(seq.seq_id, 0.0)  # it waited already: never held back again

    def computed(self, seq: Sequence, n: int) -> None:
        """n more of the sequence's tokens have their latents in the cache (rejected drafts do not count)."""
        seq.num_cached_tokens += n
        self.blocks.register_computed(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free_sequence(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            self.arrival.pop(seq.seq_id, None)
