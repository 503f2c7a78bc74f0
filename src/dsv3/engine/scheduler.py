"""Continuous batching: every step, running sequences decode and waiting ones are admitted and
prefilled in chunks, within a token budget and without ever over-committing the latent cache.
When the cache runs out, the newest running sequence is preempted: its blocks are freed and it is
recomputed later from its tokens (nothing is lost)."""

from __future__ import annotations

from collections import deque

from dsv3.engine.cache import BlockManager
from dsv3.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence, max_len: int) -> None:
        """max_len: the most tokens the sequence can reach. It must fit the cache alone, so that
        preemption can always make room for it."""
        if self.blocks.blocks_needed(max_len) > self.blocks.num_blocks:
            raise ValueError(f"{seq.num_tokens} prompt tokens + up to {max_len - seq.num_tokens} new ones cannot fit "
                             f"the latent cache ({self.blocks.num_blocks * self.blocks.block_size} tokens)")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, skip=None) -> list[tuple[Sequence, int]]:
        """The sequences of the next step and how many of their tokens each computes; skip(seq) true:
        a running sequence that sits this step out."""
        budget, scheduled = self.max_num_batched_tokens, []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != Status.RUNNING or (skip is not None and skip(seq)):  # preempted below: for an older one
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
            n = min(seq.num_uncomputed + len(seq.draft), budget)
            scheduled.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.draft, seq.draft_probs = [], []
        self.blocks.free_sequence(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

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
