"""The engine (requests in, tokens out, one step at a time) and `dsv3.LLM`, the offline batch API on top."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv3.engine.cache import BlockManager, allocate_latent_cache, blocks_that_fit
from dsv3.engine.config import EngineConfig
from dsv3.engine.runner import ModelRunner
from dsv3.engine.sampling import SamplingParams, sample
from dsv3.engine.scheduler import Scheduler
from dsv3.engine.sequence import RequestOutput, ScheduledItem, Sequence, Status, TokenLogprob
from dsv3.engine.speculative import MTPProposer, SpeculationPolicy, verify
from dsv3.kernels import dispatch
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.parallel import SINGLE, Parallel, init_from_env
from dsv3.tokenizer import Tokenizer


PENDING = -1  # a token sampled on the device that the host has not read yet
# A step that prefills runs in rows mode (every prompt token its own attention row over the latent cache, the
# absorbed form, replayed as a CUDA graph beside the decode rows) while its prompt rows attend at most this many
# cached tokens in all: that kernel reads each row's whole context for the row, which for long prompts costs
# more than the eager prefill's launches (moonlight-16b: ~2.5x its kernels' time in a mixed step) save.
ROWS_MODE_KEYS = 1 << 20


@dataclass
class Launched:
    """A step on its way: the tokens it samples stay on the device until `LLMEngine._resolve` reads them."""
    items: list[ScheduledItem]    # as packed
    done: list[Sequence]          # the sequences that sample a token, in the order of `tokens`
    tokens: torch.Tensor | None   # (len(done),) on the device: the runner's last_tokens until the next step
    host: list[torch.Tensor]      # tokens (and logprob tensors) copied to the host, complete once `ready` is
    ready: torch.cuda.Event | None
    speculative: bool = False     # host[0]: the runner's last_speculation record (len(done), 4), a row per sequence
    stand_ins: frozenset = frozenset()  # seq_ids whose drafts were stand-ins (not counted as drafted)
    rows: dict[int, int] = field(init=False)  # seq_id -> its row of `tokens` (of the record, if speculative)

    def __post_init__(self):
        self.rows = {s.seq_id: i for i, s in enumerate(self.done)}


class LLMEngine:
    """Continuous batching over a paged latent cache. `add_request` any time; `step` advances every
    running request by one token (or one prefill chunk) and returns the requests that changed.

    Async scheduling (the default, as vLLM's): `step` launches the next forward
    before it reads the tokens of the one before, so that scheduling, packing and reading results run
    on the host while the GPU computes. A sequence's newest token is then `PENDING` when the next step
    is packed: that step takes it from the device. A sequence that stops on that token (EOS, a stop
    string) has computed one token too many, which is dropped; one that its length limit stops is not
    scheduled again.

    Greedy speculation is asynchronous too (`_speculates_async` says when): the next step is packed as if the
    k drafts in flight were rejected (one new token, then k new drafts, all `PENDING`), and the runner moves its
    rows on the device where the verification put them (`ModelRunner.continue_speculation`). With k > 1 the
    drafts after the first are chained on the device in the same forward (`ModelRunner.chain_drafts`).
    Other speculative steps read every result before the next is launched (`_speculative_step`).
    """

    def __init__(self, model: DeepseekV3ForCausalLM, tokenizer: Tokenizer | None, config: EngineConfig | None = None,
                 *, par: Parallel = SINGLE, **options):
        """config: the engine's options (EngineConfig; its loading fields are LLM's); options: fields of it to
        replace, e.g. LLMEngine(model, tok, max_num_seqs=8)."""
        self.options = options = EngineConfig.of(config, **options)
        max_num_seqs, block_size, num_blocks = options.max_num_seqs, options.block_size, options.num_blocks
        speculative_tokens, speculative_max_batch = options.speculative_tokens, options.speculative_max_batch
        cfg = model.config
        if speculative_tokens and not model.mtp_layers:
            raise ValueError("speculative decoding drafts with the MTP module, and this checkpoint has none")
        self.model, self.tokenizer, self.config = model, tokenizer, cfg
        embedding = model.model.embed_tokens.weight  # never FP8: its dtype is the activations' dtype
        self.device, self.dtype = embedding.device, embedding.dtype
        self.max_model_len = options.max_model_len or cfg.max_position_embeddings
        num_layers = len(model.model.layers)
        self.par = par
        if num_blocks is None:
            num_blocks = self._blocks_for_memory(num_layers, block_size, options.cache_memory_fraction, max_num_seqs)
        # One block more than the manager hands out: the scratch block that padding rows write to.
        self.latent_caches = allocate_latent_cache(num_layers, num_blocks + 1, block_size, cfg.latent_dim, self.dtype,
                                                   self.device)
        self.blocks = BlockManager(num_blocks, block_size)
        # The same rotations, looked up: one kernel a step, not four (drafts reach speculative_tokens further).
        model.model.rotary.cache(self.max_model_len + speculative_tokens + 1)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, options.max_num_batched_tokens,
                                   options.prefill_delay_factor, graphed=self._prefills_in_graph,
                                   mixed_step_tokens=options.mixed_step_tokens)
        draft_rows = (1 + speculative_tokens) * min(max_num_seqs, speculative_max_batch) if speculative_tokens else 0
        self.runner = ModelRunner(model, self.latent_caches, block_size, self.max_model_len,
                                  max_num_seqs * (1 + speculative_tokens), options.cuda_graphs, par, draft_rows,
                                  min(options.max_num_batched_tokens, options.cuda_graph_max_tokens),
                                  deterministic=options.deterministic, drafts=max(speculative_tokens, 1))
        self.deterministic = options.deterministic
        # Where no graph replays (the CPU, cuda_graphs off), prefilling steps stay on the expanded form; tests set it.
        self.rows_mode_keys = ROWS_MODE_KEYS if self.runner.graphs else 0
        self.proposer = MTPProposer(self.runner, speculative_tokens) if speculative_tokens else None
        self.spec_policy = SpeculationPolicy(speculative_max_batch)
        eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids = {e for e in eos if e is not None}
        self.requests: dict[str, Sequence] = {}
        self.async_scheduling = options.async_scheduling
        self.in_flight: Launched | None = None
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "prefill_steps": 0, "spec_drafted": 0,
                      "spec_accepted": 0, "spec_off_steps": 0, "spec_off_sequences": 0, "spec_async_steps": 0,
                      "gpu_wait_seconds": 0.0}  # the host waiting for a step's results (little: host-bound)

    def _blocks_for_memory(self, num_layers: int, block_size: int, fraction: float, max_num_seqs: int) -> int:
        """On a GPU, what free memory holds; on the CPU, enough for max_num_seqs full-length sequences."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            blocks = blocks_that_fit(int(free * fraction), num_layers, block_size, self.config.latent_dim, self.dtype)
            if self.par.distributed:  # every rank must agree on the pool: take the smallest
                t = torch.tensor([blocks], device=self.device)
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
                blocks = int(t)
            return blocks - 1  # the scratch block
        return max_num_seqs * -(-self.max_model_len // block_size)

    @property
    def cache_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    # ---- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer, and this model has none (its checkpoint has no "
                                 "tokenizer.json, or skip_tokenizer_init was set); pass token ids instead")
            ids, text = self.tokenizer.encode(prompt), prompt
        else:
            ids, text = list(prompt), None
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens")
        seq = Sequence(ids, params, text, request_id)
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.scheduler.add(seq, min(len(ids) + params.max_tokens, self.max_model_len))
        self.requests[seq.request_id] = seq
        self.stats["prompt_tokens"] += len(ids)
        return seq

    def abort(self, request_id: str) -> None:
        """Drop a request (a client went away): its cache blocks are freed at once."""
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.finished:
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        if self.proposer is None:
            return self._plain_step()
        # Decode-only steps (every running sequence decodes, none is admitted) are timed for the
        # speculation policy, which learns where speculation pays.
        policy, decoding = self.spec_policy, {s.seq_id for s in self.scheduler.running if s.num_uncomputed == 1}
        decode_only = len(decoding) == len(self.scheduler.running) > 0
        speculate = self._speculating(len(decoding))
        start, tokens = policy.clock() if policy.clock else 0.0, self.stats["generation_tokens"]
        if speculate and self._speculates_async():
            changed = self._speculative_async_step()
        elif speculate or (self.in_flight is not None and self.in_flight.speculative):
            changed = self._resolve(self.in_flight) if self.in_flight is not None else []  # drain first
            self.in_flight = None
            if speculate and self._speculates_async():  # drained, after plain steps: stand-in drafts
                changed += self._speculative_async_step()
            elif speculate:
                changed += self._speculative_step()
            else:
                self._drop_drafts()
                changed += self._plain_step()
        else:
            self._drop_drafts()
            changed = self._plain_step()
        if policy.clock and decode_only and all(s.seq_id in decoding for s in self.scheduler.running):
            policy.record(len(decoding), speculate, policy.clock() - start, self.stats["generation_tokens"] - tokens)
        return changed

    def _drop_drafts(self) -> None:
        """Speculation turned off: the drafts left by the last speculative step are dropped, not verified (a
        synchronous step to verify them cost ~9 ms with k = 2 on an H200, ~20 asynchronous steps)."""
        for seq in self.scheduler.running:
            if seq.draft:
                seq.draft, seq.draft_probs = [], []

    def _plain_step(self) -> list[Sequence]:
        prev, self.in_flight = self.in_flight, None
        scheduled = self.scheduler.schedule(skip=self._stops_on_pending)
        launched = self._launch(scheduled, prev) if scheduled else None
        changed = self._resolve(prev) if prev is not None else []      # the GPU runs `launched` meanwhile
        if launched is None:
            if prev is None and self.scheduler.waiting:  # cannot happen unless the cache is smaller than one prompt
                raise RuntimeError("no request fits the latent cache")
            return changed
        for item in launched.items:
            if not item.seq.finished:  # (a sequence that just stopped computed its last token for nothing)
                self.scheduler.computed(item.seq, len(item.tokens))   # after _resolve: a pending token is known now
                item.seq.pending += bool(item.keep)
        if self.async_scheduling:
            self.in_flight = launched
            return changed
        return changed + self._resolve(launched)

    def _decoding(self) -> int:
        return sum(1 for seq in self.scheduler.running if seq.num_uncomputed == 1)

    def _speculating(self, batch: int) -> bool:
        """Whether this step speculates: only prompts wait (their prefill drafts at once), or the policy wants it
        at this batch and some sequence has drafts to verify or would draft (one whose drafts stand). Otherwise it
        is a plain step, scheduled asynchronously (drafts left over are dropped: `_drop_drafts`)."""
        running = self.scheduler.running
        if not running:
            return True
        if not self.spec_policy.wants(batch):
            self.stats["spec_off_steps"] += 1
            return False
        return any(seq.draft for seq in running) or any(self.spec_policy.pays(seq) for seq in running)

    def _stops_on_pending(self, seq: Sequence) -> bool:
        """Its pending token is its last (length limits): no step for it until that token is read."""
        return seq.pending > 0 and (len(seq.output_token_ids) + seq.pending >= seq.params.max_tokens
                                    or seq.num_tokens >= self.max_model_len)

    def _launch(self, scheduled: list[tuple[Sequence, int]], prev: Launched | None) -> Launched:
        """Pack, run and sample a step without reading anything back; pending tokens come from prev,
        whose tokens are still in the runner's last_tokens (the step takes them on the device)."""
        rows_mode = self._rows_mode(scheduled)
        items, sources = [], []
        for seq, n in scheduled:
            first = seq.num_cached_tokens
            tokens = (seq.all_token_ids[first:] + [PENDING] * seq.pending)[:n]
            items.append(ScheduledItem(seq, first, tokens, 1 if first + n >= seq.num_tokens else 0))
            sources.append(prev.rows[seq.seq_id] if tokens[-1] == PENDING else -1)
        _, logits = self.runner.run(self.runner.pack(items, rows_mode, sources=sources))
        self.stats["steps"] += 1
        self.stats["prefill_steps"] += any(len(item.tokens) > 1 or not item.keep for item in items)
        done = [item.seq for item in items if item.keep]
        return self._sampled(items, done, logits)

    def _rows_mode(self, scheduled: list[tuple[Sequence, int]]) -> bool:
        """Decode-only steps run in rows mode; so does a prefilling step whose prompt rows attend at most
        rows_mode_keys cached tokens in all, if a graph holds all its rows (ROWS_MODE_KEYS says why). In the
        deterministic mode every step does: a prompt token then takes exactly the path of a decoded one, so
        chunking, prefix-cache hits and the batch around it change nothing (eagerly beyond the graphs' rows)."""
        if self.deterministic:
            return True
        keys = sum(n * seq.num_cached_tokens + n * (n + 1) // 2 for seq, n in scheduled if seq.num_uncomputed != 1)
        if not keys:
            return True
        return keys <= self.rows_mode_keys and self.runner.fits_graph(sum(n for _, n in scheduled))

    def _prefills_in_graph(self, scheduled: list[tuple[Sequence, int]]) -> bool:
        """Whether a step of these (sequence, tokens) would replay a CUDA graph: the admission delay holds back no
        prompt that it would prefill (False where nothing is captured: the CPU)."""
        return (bool(self.runner.graphs) and self.runner.fits_graph(sum(n for _, n in scheduled))
                and self._rows_mode(scheduled))

    def _sampled(self, items: list[ScheduledItem], done: list[Sequence], logits: torch.Tensor) -> Launched:
        """Sample the done sequences' tokens (and their logprobs) and start copying them to the host."""
        if not done:
            return Launched(items, done, None, [], None)
        # Sampling writes into the forward's argmax, which is last_tokens: where the next step finds them.
        tokens = sample(logits, [s.params for s in done], [s.generator for s in done], self.runner.last_argmax)
        results = [tokens]
        wanted = [s.params.logprobs for s in done if s.params.logprobs is not None]
        if wanted:
            logp = logits.float().log_softmax(-1)
            top = logp.topk(max(max(wanted), 1), dim=-1)
            results += [logp.gather(1, tokens[:, None])[:, 0], top.indices, top.values]
        return Launched(items, done, tokens, *self._to_host(results))

    def _to_host(self, results: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        """Start copying device tensors to the host; the event says when they are there (None: already)."""
        if self.device.type != "cuda":  # (copies: the next step overwrites last_tokens before they are read)
            return [t.clone() for t in results], None
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in results]
        for h, t in zip(host, results):
            h.copy_(t, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

    def _resolve(self, launched: Launched) -> list[Sequence]:
        """Read a launched step's tokens (waiting for it if need be) and apply them to their sequences."""
        if not launched.done:
            return []
        if launched.ready is not None:
            start = time.perf_counter()
            launched.ready.synchronize()
            self.stats["gpu_wait_seconds"] += time.perf_counter() - start
        if launched.speculative:
            return self._resolve_speculative(launched)
        tokens, *lp = [t.tolist() for t in launched.host]
        changed = []
        for i, (seq, token) in enumerate(zip(launched.done, tokens)):
            if seq.finished:  # stopped by the token before, or aborted, while this one was computed
                continue
            seq.pending -= 1
            seq.all_token_ids.append(token)
            if lp and seq.params.logprobs is not None:
                chosen, top_ids, top_values = lp
                seq.logprobs.append(TokenLogprob(token, chosen[i], list(zip(top_ids[i], top_values[i]))[: seq.params.logprobs]))
            self.check_finished(seq, token)
            changed.append(seq)
        self.stats["generation_tokens"] += len(changed)
        return changed

    def _speculates_async(self) -> bool:
        """Whether this step speculates asynchronously (`_speculative_async_step`): greedy with the k drafts made
        in the verifying forward (`MTPProposer.fused`), every running sequence decoding with k drafts (perhaps
        still on the device; or none, after plain steps with nothing in flight: stand-ins), no request waiting,
        room in the cache and in max_model_len for `_async_room` positions more each, and a captured graph that
        holds the step's k + 1 rows a sequence (CPU: eagerly).
        Here a sequence whose drafts rarely stand (SpeculationPolicy.pays) keeps drafting: its draft costs
        no forward of its own, and a batch that holds it still steps asynchronously."""
        running, prev, policy = self.scheduler.running, self.in_flight, self.spec_policy
        if not (self.async_scheduling and self.proposer.fused and running) or self.scheduler.waiting:
            return False
        k = self.proposer.k
        rows = (k + 1) * len(running)
        if prev is not None and not prev.speculative or not policy.wants(len(running)):
            return False
        if rows > min(self.options.max_num_batched_tokens, (k + 1) * self.runner.last_speculation.shape[0]):
            return False
        if self.device.type == "cuda" and not any(size >= rows for size in self.runner.draft_graphs):
            return False
        blocks = 0
        for seq in running:
            p = seq.params
            drafted = len(seq.draft) == k or prev is None and not seq.draft  # (no drafts: stand-ins, see below)
            if not (drafted and seq.num_uncomputed == 1 and p.greedy and p.logprobs is None
                    and seq.num_tokens + self._async_room(k) <= self.max_model_len):
                return False
            blocks += self.blocks.blocks_needed(seq.num_tokens + self._async_room(k)) - len(seq.block_table)
        return blocks <= self.blocks.num_free

    @staticmethod
    def _async_room(k: int) -> int:
        """Positions past a sequence's tokens that an asynchronous step of k drafts may write. k > 1: 3k, its k + 1
        rows, k further if the window in flight accepts every draft, k - 1 for the chained drafts' MTP cache slots;
        k = 1 (no chained drafts) keeps the 2 its path was built and tested with."""
        return 2 if k == 1 else 3 * k

    def _speculative_async_step(self) -> list[Sequence]:
        """Launch a greedy step of k drafts, then read the one in flight (as `_plain_step` does). Each sequence
        computes k + 1 rows, its newest token and its drafts; a sequence in the step in flight is packed as if
        that step rejected its drafts: every token PENDING, at the positions after its one new token, its
        rows marked to continue the step's record (ModelRunner.continue_speculation fixes them up)."""
        prev, self.in_flight = self.in_flight, None
        items, pairs, k, stand_ins = [], [], self.proposer.k, set()
        for seq in self.scheduler.running:
            if self._stops_on_pending(seq):  # its length limit stops it on what is in flight
                continue
            self.blocks.append(seq, self._async_room(k))  # the rows k positions further, if the drafts in flight stand
            first = seq.num_cached_tokens
            if prev is not None and seq.seq_id in prev.rows:
                items.append(ScheduledItem(seq, first, [PENDING] * (k + 1), k + 1))
                pairs.append(prev.rows[seq.seq_id])
            else:  # its token and drafts are known; after plain steps it has none, and its token stands in for
                # them (verification keeps a draft only where it is the model's argmax, so any token may stand in):
                # one such step costs far less than the synchronous step that would draft them (k = 2 on an H200,
                # embedded model: ~9 ms eagerly against ~0.45 ms)
                token = seq.all_token_ids[first]
                if not seq.draft:
                    stand_ins.add(seq.seq_id)
                items.append(ScheduledItem(seq, first, [token] + (seq.draft or [token] * k), k + 1))
                pairs.append(-1)
        launched = None
        if items:
            step = self.runner.pack(items, True, greedy_draft=True, continues=pairs)
            step.drafts = k
            self.runner.run(step)
            self.stats["steps"] += 1
            self.stats["spec_async_steps"] += 1
            host, ready = self._to_host([self.runner.last_speculation[:len(items)]])
            launched = Launched(items, [item.seq for item in items], None, host, ready, speculative=True,
                                stand_ins=frozenset(stand_ins))
        changed = self._resolve(prev) if prev is not None else []  # the device runs `launched` meanwhile
        if launched is not None:
            for seq in launched.done:
                if not seq.finished:  # after _resolve: its first row's token is known now
                    self.scheduler.computed(seq, 1)
                    seq.pending += 1
                    seq.draft, seq.draft_probs = [PENDING] * k, [None] * k
            self.in_flight = launched
        return changed

    def _resolve_speculative(self, launched: Launched) -> list[Sequence]:
        """Apply a speculative step's record (per sequence: how many of its k drafts stood, the drafts, the token
        after, the k next drafts). The step after it, if launched, has already moved these sequences' rows on the
        device."""
        changed, k = [], self.proposer.k
        for seq, row in zip(launched.done, launched.host[0].tolist()):
            if seq.finished:  # stopped by the step before, or aborted, while this one was computed
                continue
            accepted, drafts, token, next_drafts = row[0], row[1:1 + k], row[1 + k], row[2 + k:]
            seq.pending -= 1
            self._apply_verified(seq, k, drafts[:accepted], token, counted=seq.seq_id not in launched.stand_ins)
            if not seq.finished:
                seq.draft, seq.draft_probs = next_drafts, [None] * k
            changed.append(seq)
        return changed

    def _speculative_step(self) -> list[Sequence]:
        """A step with speculation, synchronous: verifying drafts reads every result."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            if self.scheduler.waiting:
                raise RuntimeError("no request fits the latent cache")
            return []
        decoding = all(seq.num_uncomputed == 1 for seq, _ in scheduled)
        rows_mode = self.deterministic or decoding
        items = []
        for seq, n in scheduled:
            first = seq.num_cached_tokens
            completes = first + n >= seq.num_tokens
            items.append(ScheduledItem(seq, first, (seq.all_token_ids[first:] + seq.draft)[:n],
                                       1 + len(seq.draft) if completes else 0))
        fused = decoding and self._fuses(items)  # (prompt rows would feed the MTP module their argmax, not the prompt)
        # k > 1 fused: the draft graphs chain windows of k + 1 rows, so a step replays one only where every sequence
        # has its k drafts (eagerly the chained path ran at 0.04x plain decoding: embedded model, H200)
        k = self.proposer.k
        graph = not fused or k == 1 or all(len(item.seq.draft) == k for item in items)
        step = self.runner.pack(items, rows_mode, greedy_draft=fused, graph=graph)
        step.drafts = k  # (beyond one: chained on the device, ModelRunner.chain_drafts)
        hidden, out = self.runner.run(step)
        self.stats["steps"] += 1
        self.stats["prefill_steps"] += not decoding
        if fused:  # out: the (1 + k, N) tokens of verification and drafting
            self._verify_and_draft(items, out)
            return [item.seq for item in items]
        if any(seq.draft for seq, _ in scheduled):
            valid = self._verify(items, out)
        else:
            valid = self._sample(items, out)
        self._draft(items, valid, step, rows_mode)
        return [item.seq for item in items if item.keep]

    def _fuses(self, items: list) -> bool:
        """Whether this rows-mode step can verify and draft in one forward (`MTPProposer.fused`)."""
        policy = self.spec_policy
        return (self.proposer.fused and policy.wants(self._decoding())
                and all(seq.params.greedy and seq.params.logprobs is None for seq in (item.seq for item in items))
                and any(policy.pays(item.seq) for item in items))

    def _verify_and_draft(self, items: list[ScheduledItem], tokens: torch.Tensor) -> None:
        """tokens (1 + k, N): the main model's argmax at every row, then the k MTP drafts (the first at every row,
        the chained ones at each sequence's last valid row: ModelRunner.chain_drafts) of a greedy_draft step. A
        sequence's next drafts are those at its last valid row (the real token plus accepted drafts). With
        async scheduling every sequence keeps them, so that the next steps can be asynchronous ones (where a
        draft costs no forward of its own); otherwise only those whose drafts pay. Chained drafts write the MTP
        module's cache one position past the next window's last row: room for it is made here."""
        target, *drafted = tokens.tolist()
        k = len(drafted)
        room = 1 if k == 1 else 2 * k
        starts = [0]
        for _, _, rows, _ in items:
            starts.append(starts[-1] + len(rows))
        for seq, start, v in zip((item.seq for item in items), starts, self._verify(items, None, target)):
            pays = self.async_scheduling or self.spec_policy.pays(seq)
            if not seq.finished and pays and self.blocks.can_append(seq, room):
                self.blocks.append(seq, room - 1)
                seq.draft, seq.draft_probs = [d[start + v - 1] for d in drafted], [None] * k

    def _verify(self, items: list[ScheduledItem], logits: torch.Tensor | None, argmax: list[int] | None = None) -> list[int]:
        """Apply what `verify` lets stand of each sequence's drafts; returns the valid tokens per item.
        argmax: the kept rows' argmaxes when the caller has them (then logits may be None: all greedy)."""
        if argmax is None:
            argmax = logits.argmax(dim=-1).tolist()  # one device read for every greedy window
        stood = iter(verify([item.seq for item in items if item.keep], logits, argmax))
        valid = []
        for seq, _, tokens, keep in items:
            if not keep:
                self.scheduler.computed(seq, len(tokens))
                valid.append(len(tokens))
                continue
            new = next(stood)
            real, drafted = len(tokens) - len(seq.draft), len(seq.draft)
            seq.draft, seq.draft_probs = [], []
            self.scheduler.computed(seq, real)
            self._apply_verified(seq, drafted, new[:-1], new[-1])
            valid.append(real + len(new) - 1)
        return valid

    def _apply_verified(self, seq: Sequence, drafted: int, accepted: list[int], token: int,
                        counted: bool = True) -> None:
        """A sequence's verified window: `accepted` of its `drafted` drafts stood (their latents are in the
        cache), then the main model's `token`; appended one by one until a stop condition finishes it.
        counted=False: stand-in drafts, left out of the acceptance counts."""
        if counted:
            paid = self.spec_policy.pays(seq)
            seq.num_drafted += drafted
            seq.num_accepted += len(accepted)
            if paid and not self.spec_policy.pays(seq):
                self.stats["spec_off_sequences"] += 1
            self.stats["spec_drafted"] += drafted
            self.stats["spec_accepted"] += len(accepted)
        seq.all_token_ids += accepted  # computed positions hold their tokens before they are hashed
        self.scheduler.computed(seq, len(accepted))
        del seq.all_token_ids[len(seq.all_token_ids) - len(accepted):]
        for t in accepted + [token]:
            seq.all_token_ids.append(t)
            self.stats["generation_tokens"] += 1
            self.check_finished(seq, t)
            if seq.finished:
                break

    def _draft(self, items: list[ScheduledItem], valid: list[int], step, rows_mode: bool) -> None:
        """Give the proposer this step's valid positions (it fills the MTP module's cache there), and
        store the drafts of every sequence that will decode next."""
        if not self.spec_policy.wants(self._decoding()):
            self.stats["spec_off_steps"] += 1
            return
        k = self.proposer.k
        mtp_items, hidden_rows, drafting = [], [], []
        for (seq, first, _, keep), v, start in zip(items, valid, step.batch.query_starts):
            if seq.finished or v == 0 or not self.spec_policy.pays(seq):  # one that stopped drafting needs no MTP cache
                continue
            wants = bool(keep) and seq.params.logprobs is None and self.blocks.can_append(seq, k)
            mtp_items.append(ScheduledItem(seq, first, seq.all_token_ids[first + 1:first + 1 + v], int(wants)))
            hidden_rows += range(start, start + v)
            if wants:
                self.blocks.append(seq, k - 1)
                drafting.append(seq)
        if mtp_items:
            for seq, (draft, probs) in zip(drafting, self.proposer.propose(mtp_items, hidden_rows, rows_mode)):
                seq.draft, seq.draft_probs = draft, probs

    def _sample(self, items: list[ScheduledItem], logits: torch.Tensor) -> list[int]:
        """No drafts in this step: one token for every sequence that completes, sampled together."""
        for item in items:
            self.scheduler.computed(item.seq, len(item.tokens))
        done = [item.seq for item in items if item.keep]
        for seq in done:
            seq.pending += 1
        self._resolve(self._sampled(items, done, logits))
        return [len(tokens) for _, _, tokens, _ in items]

    def check_finished(self, seq: Sequence, token: int) -> None:
        """Extend the sequence's text by its new token (incrementally: decoding the whole output at every
        step would cost O(n^2)) and finish it on EOS, a stop token, a stop string or its length."""
        p = seq.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            self._flush_text(seq)  # the stop token itself stays out of the text
            return self.scheduler.finish(seq, "stop")
        if self.tokenizer is not None:
            if seq.decoder is None:
                seq.decoder = self.tokenizer.stream_decoder()
            # A stop string may begin in text already there: search from that far back.
            start = max(0, len(seq.text) - max((len(stop) for stop in p.stop), default=1) + 1)
            seq.text += seq.decoder.push(token)
            for stop in p.stop:
                at = seq.text.find(stop, start)
                if at >= 0:
                    seq.text = seq.text[:at]
                    return self.scheduler.finish(seq, "stop")
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self._flush_text(seq)
            self.scheduler.finish(seq, "length")

    @staticmethod
    def _flush_text(seq: Sequence) -> None:
        if seq.decoder is not None:
            seq.text += seq.decoder.finish()

    def stable_text(self, seq: Sequence) -> str:
        """Text safe to stream now: no half character, no tail that might yet become a stop string."""
        text = seq.text
        if seq.finished:
            return text
        text = text.rstrip("\ufffd")
        for stop in seq.params.stop:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    text = text[:-k]
                    break
        return text

    def output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, seq.text, seq.output_token_ids,
                             seq.finish_reason, seq.logprobs)

    def release(self, seq: Sequence) -> None:
        self.requests.pop(seq.request_id, None)


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def keeps_fp8(choice: str, device: torch.device) -> bool:
    """EngineConfig.fp8 on this device: 'auto' keeps FP8 weights where the FP8 kernels run (a GPU of compute
    capability 8.9 or later, with Triton); elsewhere the FP8 path would only be the reference, dequantizing every
    weight at every call, so auto dequantizes once at load instead."""
    if choice != "auto":
        return choice == "keep"
    return device.type == "cuda" and dispatch.runs_fp8(device)


class LLM:
    """Offline generation: `LLM(path).generate(prompts, SamplingParams(...))`, one result per prompt, in order."""

    def __init__(self, model: str | Path | None = None, config: EngineConfig | None = None, *,
                 progress: bool = False, **options):
        """model: a checkpoint directory (None: the embedded model). config: EngineConfig; options: fields of
        it to replace, e.g. LLM(path, dtype="float32", speculative_tokens=1). Without a tokenizer.json in the
        checkpoint (transformers' save_pretrained of a model alone), or with skip_tokenizer_init (as vLLM's),
        there is no tokenizer: token-id prompts only."""
        from dsv3.checkpoint.load import load_model, model_dtype
        from dsv3.default_model import default_model_path

        self.options = options = EngineConfig.of(config, **options)
        path = Path(model) if model is not None else default_model_path()
        device = pick_device(options.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} was asked for, but this torch {torch.__version__} sees no CUDA device")
        dtype = model_dtype(options.dtype)
        if dtype is None:  # float32 on the CPU: bf16 there is slow and would break exact batch invariance
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.path = path
        # torchrun sets the ranks; one process is the plain case. experts None: $DSV3_EXPERTS decides.
        self.par = init_from_env(None if options.experts is None else options.experts == "ep")
        if self.par.distributed and device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        self.model = load_model(path, dtype=dtype, device=device, par=self.par, keep_fp8=keeps_fp8(options.fp8, device),
                                progress=progress and self.par.rank == 0)
        no_tokenizer = options.skip_tokenizer_init or not (path / "tokenizer.json").is_file()
        self.tokenizer = None if no_tokenizer else Tokenizer.from_dir(path)
        self.engine = LLMEngine(self.model, self.tokenizer, options, par=self.par)
        self.follower = self.par.rank != 0
        if self.follower:  # ranks other than 0 run rank 0's steps until it closes
            self.engine.runner.follow()

    def close(self) -> None:
        """Release the other ranks from their follow loop (a no-op in one process)."""
        if self.par.distributed and not self.follower:
            self.engine.runner.broadcast(None)

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        seqs = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        while any(s.status != Status.FINISHED for s in seqs):
            self.engine.step()
        for s in seqs:
            self.engine.release(s)
        return [self.engine.output(s) for s in seqs]

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None):
        """Yield the new text of one request as it is generated; the last item is its RequestOutput."""
        seq = self.engine.add_request(prompt, sampling_params)
        sent = 0
        try:
            while not seq.finished:
                self.engine.step()
                text = self.engine.stable_text(seq)
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
        finally:
            self.engine.abort(seq.request_id)  # a consumer that stops early frees the cache at once
        yield self.engine.output(seq)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
