"""Multi-token prediction as speculative decoding (V3 §2.2 and §5.4.3: the MTP module drafts, the main
model verifies).

Drafts come from the checkpoint's MTP module: its input at position i is the main model's hidden
state h_i and the token at i+1; it predicts the token at i+2. For k > 1 drafts the module is applied
again to its own output and its own draft. The main model then scores the real token and the k
drafts in one forward, and the rules below decide how many drafts stand:

- greedy: a draft stands while it equals the main model's argmax; the output is exactly greedy decoding;
- sampling: the standard rejection rule (Leviathan et al. 2023; Chen et al. 2023): draft d drawn from
  q stands with probability min(1, p(d) / q(d)); at the first rejection a token is drawn from
  norm(max(p - q, 0)); if all stand, one more from p. The output is distributed as sampling from p.
"""

from __future__ import annotations

import torch

from dsv3.engine.sampling import SamplingParams, filter_top_k_top_p
from dsv3.engine.sequence import Sequence


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from: temperature, then top-k / top-p. logits (R, V) -> probs (R, V)."""
    x = logits.float() / params.temperature
    x = filter_top_k_top_p(x, [params.top_k] * len(x), [params.top_p] * len(x))
    return x.softmax(dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def propose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
            ) -> tuple[int, torch.Tensor | None]:
    """A draft token from the MTP logits (V,), and the distribution it was drawn from (None when greedy)."""
    if params.greedy:
        return int(logits.argmax()), None
    q = distribution(logits[None], params)[0]
    return draw(q, generator), q


def accept(logits: torch.Tensor, drafts: list[int], draft_probs: list[torch.Tensor | None],
           params: SamplingParams, generator: torch.Generator | None, target: list[int] | None = None) -> list[int]:
    """The tokens that stand after verification: accepted drafts then one token of the main model.

    logits: (k+1, V) main-model logits at the real token and at each draft; target: their argmaxes when
    the caller already has them (one device read for the whole batch instead of one per sequence).
    """
    if params.greedy:
        target = logits.argmax(dim=-1).tolist() if target is None else target
        out = []
        for d, t in zip(drafts, target):
            if d != t:
                break
            out.append(d)
        return out + [target[len(out)]]
    p = distribution(logits, params)
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


class Speculator:
    """The engine's speculative side: verifies each step's drafts, then runs the MTP module over the
    step's valid positions (filling its cache) and drafts up to k tokens per decoding sequence.

    The common case (one draft, greedy, every sequence decoding) runs in one forward instead:
    ModelRunner.greedy_draft verifies and drafts at once, inside the decode step's CUDA graph, and
    `verify_and_draft` reads both back with one device read.
    """

    # A sequence whose drafts are rarely right stops drafting: below this acceptance over its first
    # PROBE drafts, speculation costs more than it saves (moonlight-16b on an H100 with untrained MTP
    # weights: 0% accepted, 0.80x at batch 1, 0.72x at batch 8).
    MIN_ACCEPTANCE, PROBE = 0.3, 16

    def __init__(self, engine, k: int, max_batch: int):
        self.engine, self.k, self.max_batch = engine, k, max_batch
        self.in_graph = True  # False: always the two-pass path (tests compare the two)

    def pays(self, seq: Sequence) -> bool:
        """Whether the sequence should keep drafting (it is not returning drafts that never stand)."""
        return seq.num_drafted < self.PROBE or seq.num_accepted >= self.MIN_ACCEPTANCE * seq.num_drafted

    def decoding(self) -> int:
        return sum(1 for seq in self.engine.scheduler.running if seq.num_uncomputed == 1)

    def drafts_in_graph(self, items: list) -> bool:
        """Whether this rows-mode step can verify and draft in one forward."""
        return (self.in_graph and self.k == 1 and self.decoding() <= self.max_batch
                and all(seq.params.greedy and seq.params.logprobs is None for seq, *_ in items)
                and any(self.pays(seq) for seq, *_ in items))

    def verify_and_draft(self, items: list, tokens: torch.Tensor) -> None:
        """tokens (2, N): the main model's argmax and the MTP draft at every row of a greedy_draft step.
        A sequence's next draft is the one at its last valid row (the real token plus accepted drafts)."""
        target, drafted = tokens.tolist()
        starts = [0]
        for _, _, rows, _ in items:
            starts.append(starts[-1] + len(rows))
        for (seq, *_), start, v in zip(items, starts, self.verify(items, None, target)):
            if not seq.finished and self.pays(seq) and self.engine.blocks.can_append(seq, self.k):
                self.engine.blocks.append(seq, self.k - 1)
                seq.draft, seq.draft_probs = [self.propose_for(seq, None, drafted[start + v - 1])[0]], [None]

    def verify(self, items: list, logits: torch.Tensor | None, argmax: list[int] | None = None) -> list[int]:
        """Accept or reject each sequence's drafts (`accept`); returns the valid tokens per item.
        argmax: the kept rows' argmaxes when the caller has them (then logits may be None: all greedy)."""
        engine = self.engine
        valid, row = [], 0
        if argmax is None:
            argmax = logits.argmax(dim=-1).tolist()  # one device read for every greedy window
        for seq, _, tokens, keep in items:
            if not keep:
                engine.scheduler.computed(seq, len(tokens))
                valid.append(len(tokens))
                continue
            window = logits[row:row + keep] if logits is not None else None
            target = argmax[row:row + keep]
            row += keep
            new = accept(window, seq.draft, seq.draft_probs, seq.params, seq.generator, target)
            accepted = new[:-1]
            real = len(tokens) - len(seq.draft)
            paid = self.pays(seq)
            seq.num_drafted += len(seq.draft)
            seq.num_accepted += len(accepted)
            if paid and not self.pays(seq):
                engine.stats["spec_off_sequences"] += 1
            engine.stats["spec_drafted"] += len(seq.draft)
            engine.stats["spec_accepted"] += len(accepted)
            seq.draft, seq.draft_probs = [], []
            seq.all_token_ids += accepted  # computed positions hold their tokens before they are hashed
            engine.scheduler.computed(seq, real + len(accepted))
            del seq.all_token_ids[len(seq.all_token_ids) - len(accepted):]
            for token in new:
                seq.all_token_ids.append(token)
                engine.stats["generation_tokens"] += 1
                engine.check_finished(seq, token)
                if seq.finished:
                    break
            valid.append(real + len(accepted))
        return valid

    def draft(self, items: list, valid: list[int], step, rows_mode: bool) -> None:
        """Run the MTP module over this step's valid positions (filling its cache), and draft up to
        k tokens for every sequence that will decode next."""
        engine = self.engine
        if self.decoding() > self.max_batch:  # verification would cost more than it saves
            engine.stats["spec_off_steps"] += 1
            return
        mtp_items, hidden_rows, drafting = [], [], []
        for (seq, first, _, keep), v, start in zip(items, valid, step.batch.query_starts):
            if seq.finished or v == 0 or not self.pays(seq):  # one that stopped drafting needs no MTP cache
                continue
            wants = bool(keep) and seq.params.logprobs is None and engine.blocks.can_append(seq, self.k)
            mtp_items.append((seq, first, seq.all_token_ids[first + 1:first + 1 + v], int(wants)))
            hidden_rows += range(start, start + v)
            if wants:
                engine.blocks.append(seq, self.k - 1)
                drafting.append(seq)
        if not mtp_items:
            return
        n_mtp = len(engine.model.mtp_layers)
        for depth in range(self.k):
            mtp_step = engine.runner.pack(mtp_items, rows_mode, graph=False)
            mtp_step.mtp_depth = min(depth, n_mtp - 1)
            mtp_step.hidden_rows = torch.tensor(hidden_rows, device=engine.device)
            _, logits = engine.runner.run(mtp_step)
            if not drafting:
                return
            for seq, row, greedy_token in zip(drafting, logits, logits.argmax(dim=-1).tolist()):
                token, q = self.propose_for(seq, row, greedy_token)
                seq.draft.append(token)
                seq.draft_probs.append(q)
            # The next depth continues from each drafting sequence's last row, one position further.
            ends = [end - 1 for end, (_, _, _, keep) in zip(mtp_step.batch.query_starts[1:], mtp_items) if keep]
            mtp_items = [(seq, seq.num_tokens - 1 + depth, [seq.draft[-1]], 1) for seq in drafting]
            hidden_rows, rows_mode = ends, True

    def propose_for(self, seq: Sequence, mtp_logits: torch.Tensor, greedy_token: int
                    ) -> tuple[int, torch.Tensor | None]:
        """One draft token from the MTP module's logits (V,) and the distribution it came from
        (greedy_token: their argmax, read for the whole batch at once)."""
        if seq.params.greedy:
            return greedy_token, None
        return propose(mtp_logits, seq.params, seq.generator)
