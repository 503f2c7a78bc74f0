"""Runs one scheduled step on the model: packs the sequences' new tokens into one flat batch, tells
the attention where their latents go in the paged cache, and returns logits for the sequences
that complete a token this step.

A step's integer inputs travel to the device as one buffer in one copy (`Fields`): on a GPU, each
small copy or kernel between two steps costs a few microseconds, a step of batch 1 about 2.3 ms.

On a GPU, decode steps (one token per sequence) replay CUDA graphs captured once per batch size
(as nano-vllm and vLLM do): a decode step of a small batch is otherwise dominated by kernel launches.
So do mixed steps that the engine runs in rows mode (decode rows beside short prompt chunks, every token its
own attention row), in graphs of up to EngineConfig.cuda_graph_max_tokens rows (MIXED_GRAPH_SIZES up to it):
eagerly, such a step spent ~2.5x its kernels' time launching them. Graphs with more rows than keep logits gather the kept rows inside the graph.
A graph's inputs are views of one static buffer that `pack` copies into directly; the graph itself
fills in the pending tokens (`fill_pending`) and takes the greedy argmax of its logits. Rows beyond
the real batch are padding: they write to a scratch block nobody owns and are ignored.

Speculative steps (greedy: `greedy_draft`, then `chain_drafts` for k > 1 drafts) are scheduled asynchronously
too: a sequence's k + 1 rows (its newest token, its drafts) of step n+1 are packed before step n's verification
is read, as if step n's drafts were rejected, and marked `continues`; inside the step (in its graph),
`continue_speculation` moves them where step n's verification put them, from the record that step left on the device
(`last_speculation`). With several ranks rank 0 corrects before broadcasting, so followers see the true inputs.

With several ranks, rank 0 schedules and broadcasts each step's inputs; the other ranks `follow`,
running the same forward so that every collective inside the model meets its partners.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv3.engine.sequence import ScheduledItem
from dsv3.kernels import dispatch
from dsv3.model import DeepseekV3ForCausalLM, PagedBatch
from dsv3.parallel import SINGLE, Parallel

HEADER = 14  # ints that announce a broadcast step
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
# Rows of mixed steps (decode rows plus prompt tokens). Padding rows cost what real ones do once a step is
# compute-bound, so above 2,048 the sizes are at most 25% apart.
MIXED_GRAPH_SIZES = (384, 512, 768, 1024, 1536, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192)


def graph_sizes(max_graph_rows: int, max_mixed_rows: int) -> list[int]:
    """The rows of the graphs to capture: decode batches up to max_graph_rows, mixed steps up to max_mixed_rows."""
    return [b for b in GRAPH_BATCH_SIZES + MIXED_GRAPH_SIZES if b <= max(max_graph_rows, max_mixed_rows)]


def draft_graph_sizes(max_draft_rows: int, drafts: int) -> list[int]:
    """The rows of the draft graphs to capture: each holds at least one window of drafts + 1 rows (a graph of
    fewer would chain drafts for no sequence), at most max_draft_rows."""
    return [b for b in GRAPH_BATCH_SIZES if drafts + 1 <= b <= max_draft_rows]


@dataclass(frozen=True)
class Fields:
    """The layout of a step's integer inputs in one byte buffer: N new tokens (padded to a graph's
    size), R kept rows, A attention rows (sequences, or tokens in rows mode) of W blocks each."""
    n: int
    r: int
    a: int
    w: int

    @property
    def shapes(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        n, a = self.n, self.a
        return [("ids", torch.int64, (n,)), ("positions", torch.int64, (n,)), ("slots", torch.int64, (n,)),
                ("sources", torch.int64, (n,)), ("continues", torch.int64, (n,)), ("rows", torch.int64, (self.r,)),
                ("context_lens", torch.int32, (a,)), ("tables", torch.int32, (a, self.w)),
                ("first_rows", torch.int32, (a,))]

    @property
    def nbytes(self) -> int:
        return sum(_aligned(math.prod(shape) * dtype.itemsize) for _, dtype, shape in self.shapes)

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each field as a tensor over its part of the byte buffer (uint8, at least nbytes long)."""
        out, offset = {}, 0
        for name, dtype, shape in self.shapes:
            size = math.prod(shape) * dtype.itemsize
            out[name] = buffer[offset:offset + size].view(dtype).view(shape)
            offset += _aligned(size)
        return out


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 8) * 8


@dataclass
class StepInputs:
    ids: torch.Tensor            # (N,) tokens, padded to graph_size rows when replaying a graph
    positions: torch.Tensor      # (N,)
    batch: PagedBatch
    rows: torch.Tensor           # (R,) rows of the flat batch whose logits are wanted
    graph_size: int = 0          # 0: run eagerly
    mtp_depth: int = -1          # -1: the main model; d >= 0: MTP module d, fed by hidden_rows
    hidden_rows: torch.Tensor | None = None  # rows of the previous forward's output that MTP continues
    greedy_draft: bool = False   # the step also drafts in the same forward (ModelRunner.greedy_draft)
    drafts: int = 1              # drafts a greedy_draft step makes per sequence; beyond one chained (chain_drafts)
    sources: torch.Tensor | None = None  # (N,) where a row's token is pending: its row of last_tokens, else -1
    fills: bool = False          # some row has a pending token (known on the host)
    # (N,) of a speculative step's row: (k + 1) * window + (0: token, j: draft j); else -1
    continues: torch.Tensor | None = None
    continuing: bool = False     # some row continues a speculative step (known on the host)
    rows_prefix: bool = False    # rows is 0..R-1 (known on the host): a graph's logits need no gather
    fields: Fields | None = None  # the layout of `buffer`, which every tensor above views
    buffer: torch.Tensor | None = None


class ModelRunner:
    def __init__(self, model: DeepseekV3ForCausalLM, latent_caches: list[torch.Tensor], block_size: int,
                 max_model_len: int, max_graph_rows: int, cuda_graphs: bool = True, par: Parallel = SINGLE,
                 max_draft_rows: int = 0, max_mixed_rows: int = 0, deterministic: bool = False, drafts: int = 1):
        """max_graph_rows: the most rows whose logits a step keeps (every row of a decode step); max_mixed_rows:
        the most rows of a rows-mode mixed step to capture graphs for (0: decode steps only). deterministic:
        every forward, and every graph's capture, runs under dispatch's deterministic mode. drafts: per sequence in
        the asynchronous speculative steps and their graphs (k: windows of k + 1 rows)."""
        self.model, self.latent_caches, self.block_size, self.par = model, latent_caches, block_size, par
        self.deterministic = deterministic
        self.device = next(model.parameters()).device
        self.scratch_block = latent_caches[0].shape[0] - 1  # the cache's last block is never handed out
        self.max_blocks = -(-max_model_len // block_size)
        # The tokens of the last step's kept rows: its greedy argmax, into which sampling writes the rest.
        # The next step takes its pending tokens from here (fill_pending), without the host reading them.
        self.last_tokens = torch.zeros(max(max_graph_rows, max_draft_rows, 1), dtype=torch.int64, device=self.device)
        self.max_kept = max_graph_rows
        self.last_argmax: torch.Tensor | None = None  # (R,) a view of last_tokens, set by every forward
        # What the last greedy_draft step verified, per pair of rows (a sequence's token and its draft): whether
        # the draft stood, the draft, the token after the window, the next draft (`record_speculation`).
        # With k drafts: windows of k + 1 rows; per window the accepted count, the k drafts, the token after, and
        # the k next drafts.
        self.drafts = drafts
        self.last_speculation = torch.zeros(max(max_draft_rows // (drafts + 1), 1), 2 * drafts + 2, dtype=torch.int64,
                                            device=self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.draft_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.static: dict[int, tuple[StepInputs, torch.Tensor, torch.Tensor]] = {}
        self.static_drafts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if cuda_graphs and self.device.type == "cuda":
            self.capture(graph_sizes(max_graph_rows, max_mixed_rows), draft_graph_sizes(max_draft_rows, drafts))

    def fits_graph(self, rows: int) -> bool:
        """Whether a rows-mode step of this many rows replays a graph (always, where nothing is captured: eager)."""
        return not self.graphs or rows <= max(self.graphs)

    # ---- packing ----------------------------------------------------------------------------------
    def pack(self, items: list[ScheduledItem], rows_mode: bool, graph: bool = True,
             greedy_draft: bool = False, sources: list[int] | None = None,
             continues: list[int] | None = None) -> StepInputs:
        """Each ScheduledItem (sequence, first position, tokens, logits wanted for its last `keep` rows) -> device tensors.

        rows_mode (no sequence is prefilling): every token is its own attention row, with its own
        context length over its sequence's blocks; plain decode and draft verification both take the
        absorbed path, padded to the next captured graph's size. Otherwise each sequence's tokens
        attend together (chunked prefill). graph=False: never padded (the MTP module runs eagerly).
        greedy_draft: a rows-mode step that also drafts (`greedy_draft`), from its own set of graphs.
        sources: per item, -1, or the row of last_tokens that holds its last token (sampled by the step
        before, still on the device; the host has a placeholder there).
        continues: per item, -1, or its window in the speculative step before (whose record, last_speculation,
        moves its last drafts + 1 rows, packed as if that step's drafts were rejected: `continue_speculation`).
        """
        ids, positions, slots, starts, context_lens, tables, rows, fill, cont = [], [], [], [0], [], [], [], [], []
        first_rows = []
        for k, (seq, first, tokens, keep) in enumerate(items):
            n = len(tokens)
            ids += tokens
            span = range(first, first + n)
            positions += span
            slots += self.slots(seq.block_table, first, n)
            fill += [-1] * (n - 1) + [sources[k] if sources else -1]
            pair, w = continues[k] if continues else -1, self.drafts + 1
            cont += [-1] * n if pair < 0 else [-1] * (n - w) + [w * pair + j for j in range(w)]
            if rows_mode:
                context_lens += [p + 1 for p in span]
                tables.append((seq.block_table, n))
                first_rows += [starts[-1]] * n
            else:
                context_lens.append(first + n)
                tables.append((seq.block_table, 1))
                first_rows.append(k)
            rows += range(starts[-1] + n - keep, starts[-1] + n)
            starts.append(starts[-1] + n)
        graphs = self.draft_graphs if greedy_draft else self.graphs
        graph_size = next((b for b in graphs if b >= len(ids)), 0) if rows_mode and graph else 0
        if graph_size:  # the graph's static layout; padding rows write to the scratch block
            pad = graph_size - len(ids)
            ids, positions, fill, cont = ids + [0] * pad, positions + [0] * pad, fill + [-1] * pad, cont + [-1] * pad
            slots += [self.scratch_block * self.block_size] * pad
            context_lens += [1] * pad
            first_rows += range(len(first_rows), len(first_rows) + pad)
            fields = self.graph_fields(graph_size)
        else:
            fields = Fields(len(ids), len(rows), len(context_lens), max(len(item.seq.block_table) for item in items))
        values = dict(ids=ids, positions=positions, slots=slots, sources=fill, continues=cont, rows=rows,
                      context_lens=context_lens, tables=tables, first_rows=first_rows)
        step = self.stage(fields, values, self.static[graph_size][0].buffer if graph_size else None)
        if self.expands_prompts(rows_mode, fields.n):
            step.batch.first_rows = fields.views(step.buffer)["first_rows"]
        step.batch.query_starts, step.batch.decode_only = starts, rows_mode
        step.batch.context_lens_host = None if rows_mode else context_lens
        step.rows, step.graph_size, step.greedy_draft = step.rows[:len(rows)], graph_size, greedy_draft
        step.fills, step.rows_prefix = max(fill) >= 0, rows == list(range(len(rows)))
        step.continuing = max(cont) >= 0
        return step

    def expands_prompts(self, rows_mode: bool, rows: int) -> bool:
        """Whether a step's fresh prompt rows attend in the expanded form (MLA.rows_attention, which reads
        first_rows): rows-mode steps of more rows than a decode step has, which then hold prompt rows (a graph
        captured at that size keeps the choice); not in the deterministic mode, where a prompt token takes a
        decoded one's path."""
        return rows_mode and not self.deterministic and rows > self.max_kept

    def graph_fields(self, size: int) -> Fields:
        return Fields(size, min(size, self.max_kept), size, self.max_blocks)

    @torch.inference_mode()  # (a graph's static buffer is an inference tensor: it was made while capturing)
    def stage(self, fields: Fields, values: dict[str, list], dest: torch.Tensor | None = None) -> StepInputs:
        """Write the inputs into one host buffer, copy it to the device in one go (into dest, a graph's
        static buffer, if given) and view it as a step: decode-only, every row kept, until pack says."""
        host = torch.empty(fields.nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        views = fields.views(host)
        for name in ("ids", "positions", "slots", "sources", "context_lens"):
            views[name].numpy()[:] = values[name]
        views["continues"].numpy()[:] = values.get("continues", -1)  # (none given: no row continues)
        views["first_rows"].numpy()[:] = values.get("first_rows", range(fields.a))  # (none given: each its own)
        kept = views["rows"].numpy()
        kept[:] = 0
        kept[:len(values["rows"])] = values["rows"]
        table = views["tables"].numpy()
        table[:] = self.scratch_block
        row = 0
        for blocks, repeat in values["tables"]:  # (a sequence's table, its attention rows): one write per sequence
            table[row:row + repeat, :len(blocks)] = blocks
            row += repeat
        if dest is None and self.device.type != "cuda":
            buffer = host                                    # already where the model reads it
        else:
            buffer = dest[:fields.nbytes] if dest is not None else torch.empty_like(host, device=self.device)
            buffer.copy_(host, non_blocking=self.device.type == "cuda")
        return self.as_step(fields, buffer, list(range(fields.a + 1)))

    def as_step(self, fields: Fields, buffer: torch.Tensor, starts: list[int]) -> StepInputs:
        v = fields.views(buffer)
        batch = PagedBatch(query_starts=starts, context_lens=v["context_lens"], block_tables=v["tables"],
                           slot_mapping=v["slots"], latent_caches=self.latent_caches, decode_only=True)
        return StepInputs(v["ids"], v["positions"], batch, v["rows"], sources=v["sources"], rows_prefix=True,
                          continues=v["continues"], fields=fields, buffer=buffer)

    def slots(self, table: list[int], first: int, n: int) -> list[int]:
        """The flat cache slots of positions first..first+n-1, a range per block (long prompts pack fast)."""
        out, p, end = [], first, first + n
        while p < end:
            block, offset = divmod(p, self.block_size)
            stop = min(end, (block + 1) * self.block_size)
            base = table[block] * self.block_size + offset
            out += range(base, base + stop - p)
            p = stop
        return out

    # ---- running ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward a packed step on every rank: the output hidden states of its tokens (N, D) and the kept logits."""
        if self.par.distributed:
            if step.fills:  # only this rank samples: the others get the pending tokens in the inputs
                step.ids.copy_(self.fill_pending(step.ids, step.sources))
                step.sources.fill_(-1)
                step.fills = False
            if step.continuing:  # the followers get the corrected inputs
                self.continue_speculation(step)
                step.continues.fill_(-1)
                step.continuing = False
            self.broadcast(step)
        return self.execute(step)

    def fill_pending(self, ids: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """ids with each pending token (where sources >= 0) taken from last_tokens."""
        return dispatch.fill_pending(ids, sources, self.last_tokens)

    def execute(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (N, D), logits of the kept rows (R, vocab)), and their argmax in last_argmax; a greedy_draft
        step returns instead of the logits its (2, N) tokens: the main model's argmax and the MTP draft at
        every row. A graph's inputs are already in place: pack wrote them into its static buffer."""
        with dispatch.using(deterministic=self.deterministic):
            return self._execute(step)

    def _execute(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        n, kept = step.batch.query_starts[-1], len(step.rows)
        if step.mtp_depth >= 0:  # MTP graphs are not captured: the module is one block
            hidden = self.model.mtp_hidden(self.last_hidden[step.hidden_rows], step.ids, step.positions,
                                           step.mtp_depth, step.batch)
        elif step.graph_size:
            _, hidden, logits = self.static[step.graph_size]
            if step.greedy_draft:
                hidden, tokens = self.static_drafts[step.graph_size]
                self.draft_graphs[step.graph_size].replay()
                self.last_hidden = hidden[:n]
                return hidden[:n], tokens[:, :n]
            self.graphs[step.graph_size].replay()  # also wrote the argmax of its logits' rows into last_tokens
            self.last_hidden = hidden[:n]
            if step.rows_prefix or step.graph_size > self.max_kept:  # (the latter's logits are the kept rows')
                self.last_argmax = self.last_tokens[:kept]
                return hidden[:n], logits[:kept]
            logits = logits[step.rows]
            self.last_argmax = dispatch.argmax(logits, out=self.last_tokens[:kept])
            return hidden[:n], logits
        elif step.greedy_draft:
            self.last_hidden, tokens = self.speculative_forward(step)
            return self.last_hidden, tokens
        else:
            ids = self.fill_pending(step.ids, step.sources) if step.fills else step.ids
            hidden = self.model.model(ids, step.positions, step.batch)   # (N, D)
        self.last_hidden = hidden
        logits = self.model.logits(hidden[step.rows])                    # (R, vocab) float32
        self.last_argmax = dispatch.argmax(logits, out=self.last_tokens[:kept])
        return hidden, logits

    def greedy_draft(self, hidden: torch.Tensor, positions: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """Verification and the next draft in one forward (greedy, one draft): at every row i, the main
        model's argmax g_i, then the MTP module on (h_i, g_i) and its argmax. Whatever the verification
        keeps, the row after the last kept draft fed the MTP the true next token, so its draft is the one
        plain drafting would make; rows past it wrote MTP cache slots that the next step writes again."""
        return self.verify_and_draft_rows(hidden, positions, batch)[0]

    def verify_and_draft_rows(self, hidden: torch.Tensor, positions: torch.Tensor, batch: PagedBatch
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """greedy_draft's (2, N) tokens and the MTP module's output hidden states (N, D) they were drafted from."""
        target = self.model.logits(hidden).argmax(dim=-1)
        mtp = self.model.mtp_hidden(hidden, target, positions, 0, batch)
        return torch.stack([target, self.model.logits(mtp).argmax(dim=-1)]), mtp

    def chain_drafts(self, step: StepInputs, ids: torch.Tensor, tokens: torch.Tensor,
                     mtp: torch.Tensor) -> torch.Tensor:
        """The drafts after the first of a greedy_draft step with step.drafts = k > 1, on the device (no host read,
        eagerly: rows may differ per sequence): per sequence, its accepted count a (leading drafts that equal the
        main model's argmax), then at its last valid row (start + a) the MTP module again on its own output and
        draft, one position further each time, k - 1 times: one MTP block forward of one row per sequence per
        draft, as `MTPProposer.propose` chains them, and the cache slot it writes is the one propose writes.
        Returns (1 + k, N): the main model's argmax and depth-0 drafts at every row (greedy_draft's), then
        depth d's draft at each sequence's last valid row (0 elsewhere)."""
        n = len(ids)
        if step.graph_size:  # a graph's rows: windows of k + 1 rows (then padding), no host tensor inside the capture
            window = step.drafts + 1
            first = torch.arange(n // window, device=ids.device) * window
            ends = first + window
        else:  # eagerly: a window per sequence, as packed
            starts = step.batch.query_starts
            window = max(b - a for a, b in zip(starts, starts[1:]))
            first = torch.tensor(starts[:-1], device=ids.device)
            ends = torch.tensor(starts[1:], device=ids.device)
        seqs = len(first)
        rows = first[:, None] + 1 + torch.arange(max(window - 1, 1), device=ids.device)       # (S, J) draft rows
        stands = (rows < ends[:, None]) & (ids[rows.clamp(max=n - 1)] == tokens[0, (rows - 1).clamp(max=n - 1)])
        last = first + stands.long().cumprod(dim=1).sum(dim=1)                                 # (S,) last valid row
        b, depths = step.batch, len(self.model.mtp_layers)
        tables = b.block_tables[last] if b.block_tables.shape[0] == n else b.block_tables
        hidden, token, position = mtp[last], tokens[1, last], step.positions[last]
        out = torch.zeros(1 + step.drafts, n, dtype=tokens.dtype, device=tokens.device)
        out[:2] = tokens
        capacity = tables.shape[1] * self.block_size
        for depth in range(1, step.drafts):
            # Past a sequence's blocks (one the engine gave no room to chain: it does not draft next), the scratch
            # block, and attention over what its table holds: such drafts are never used.
            position = position + 1
            block = (position // self.block_size).clamp(max=tables.shape[1] - 1)
            slots = tables.gather(1, block[:, None])[:, 0].long() * self.block_size + position % self.block_size
            slots = torch.where(position < capacity, slots, self.scratch_block * self.block_size)
            context = (position + 1).clamp(max=capacity).to(b.context_lens.dtype)
            batch = PagedBatch(query_starts=list(range(seqs + 1)), context_lens=context,
                               block_tables=tables, slot_mapping=slots, latent_caches=self.latent_caches,
                               decode_only=True)
            hidden = self.model.mtp_hidden(hidden, token, position, min(depth, depths - 1), batch)
            token = self.model.logits(hidden).argmax(dim=-1)
            out[1 + depth, last] = token
        return out

    def record_speculation(self, ids: torch.Tensor, tokens: torch.Tensor) -> None:
        """Verify, on the device, a greedy_draft step whose rows come in windows of k + 1 (a sequence's token, its
        k drafts; k = 1: pairs), into last_speculation: per window, how many drafts stood (leading ones equal to
        the main model's argmax at the row before), the drafts, the token after the window (the argmax at the last
        valid row) and the k drafts made there. ids (N,): the step's input tokens; tokens (1 + k, N): greedy_draft's
        (and chain_drafts'). Steps whose rows are not such windows (prefills, the synchronous path) leave a record
        nobody reads."""
        pairs = min(ids.shape[0] // (self.drafts + 1), self.last_speculation.shape[0])
        dispatch.record_speculation(ids, tokens, self.last_speculation[:pairs])

    def continue_speculation(self, step: StepInputs) -> None:
        """Move the rows that continue the speculative step before (continues >= 0) where its verification
        put them: the host packed them as if its drafts were rejected, so they sit as many positions further as
        drafts stood (their cache slots and context lengths with them), and their tokens are the step's token after
        the window and its next drafts. In place on the step's inputs, on the device: no host sync, fixed shapes
        (inside the draft graphs); rows that do not continue keep theirs."""
        b = step.batch
        dispatch.continue_speculation(step.ids, step.positions, b.slot_mapping, b.context_lens, b.block_tables,
                                      step.continues, self.last_speculation, self.block_size)

    def speculative_forward(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """What a draft graph runs: continue the speculative step before, forward, verify and draft, record."""
        self.continue_speculation(step)
        ids = self.fill_pending(step.ids, step.sources)
        hidden = self.model.model(ids, step.positions, step.batch)
        if step.drafts > 1:
            tokens, mtp = self.verify_and_draft_rows(hidden, step.positions, step.batch)
            tokens = self.chain_drafts(step, ids, tokens, mtp)
        else:
            tokens = self.greedy_draft(hidden, step.positions, step.batch)
        self.record_speculation(ids, tokens)
        return hidden, tokens

    # ---- CUDA graphs ------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self, sizes: list[int], draft_sizes: list[int]) -> None:
        """One graph per batch size, largest first so the smaller ones reuse its memory pool; for the sizes
        in draft_sizes, a second graph that also drafts (greedy_draft). A graph starts from its inputs'
        static buffer and ends with the argmax of every row in last_tokens. Captured under the kernel options
        the eager steps run with: a graph keeps the kernels it was captured with."""
        with dispatch.using(deterministic=self.deterministic):
            self._capture(sizes, draft_sizes)

    def _capture(self, sizes: list[int], draft_sizes: list[int]) -> None:
        pool = None
        for size in sorted(set(sizes) | set(draft_sizes), reverse=True):
            fields = self.graph_fields(size)
            values = dict(ids=[0] * size, positions=[0] * size, slots=[self.scratch_block * self.block_size] * size,
                          sources=[-1] * size, rows=list(range(fields.r)), context_lens=[1] * size, tables=[])
            static = self.stage(fields, values, torch.empty(fields.nbytes, dtype=torch.uint8, device=self.device))
            static.graph_size, static.drafts = size, self.drafts
            if self.expands_prompts(True, size):
                static.batch.first_rows = fields.views(static.buffer)["first_rows"]

            def forward():
                hidden = self.model.model(self.fill_pending(static.ids, static.sources), static.positions, static.batch)
                return hidden, self.model.logits(hidden if size <= self.max_kept else hidden[static.rows])

            for _ in range(2):  # warm up outside the graph (Triton autotuning, cuBLAS handles)
                forward()
                if size in draft_sizes:
                    self.speculative_forward(static)
            torch.cuda.synchronize()
            if size in sizes:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden, logits = forward()
                    dispatch.argmax(logits, out=self.last_tokens[:len(logits)])
                pool = graph.pool()
                self.graphs[size] = graph
                self.static[size] = (static, hidden, logits)
            if size in draft_sizes:
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, pool=pool):
                        hidden, tokens = self.speculative_forward(static)
                except Exception as error:  # noqa: BLE001 (speculative steps of this size then run synchronously)
                    warnings.warn(f"no CUDA graph for speculative steps of {size} rows: {error}")
                    torch.cuda.synchronize()
                    continue
                pool = graph.pool()
                self.draft_graphs[size] = graph
                self.static_drafts[size] = (hidden, tokens)
                self.static.setdefault(size, (static, hidden, None))
        self.graphs = dict(sorted(self.graphs.items()))
        self.draft_graphs = dict(sorted(self.draft_graphs.items()))

    # ---- several ranks ----------------------------------------------------------------------------
    def broadcast(self, step: StepInputs | None) -> None:
        """Rank 0 sends a step (None: stop) to the followers: a header of sizes, the query starts, the
        inputs' buffer, and the rows an MTP step continues."""
        if step is None:
            dist.broadcast(torch.zeros(HEADER, dtype=torch.int64, device=self.device), src=0)
            return
        f, b = step.fields, step.batch
        hidden_rows = step.hidden_rows if step.hidden_rows is not None else step.rows[:0]
        header = [1, f.n, f.r, f.a, f.w, len(step.rows), step.graph_size, int(b.decode_only), step.mtp_depth,
                  len(hidden_rows), int(step.greedy_draft), int(step.rows_prefix), len(b.query_starts), step.drafts]
        dist.broadcast(torch.tensor(header, device=self.device), src=0)
        dist.broadcast(torch.tensor(b.query_starts, dtype=torch.int64, device=self.device), src=0)
        dist.broadcast(step.buffer, src=0)
        dist.broadcast(hidden_rows, src=0)

    def receive(self) -> StepInputs | None:
        header = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        (go, n, r, a, w, kept, graph_size, decode_only, depth, n_hidden, draft, rows_prefix, n_starts,
         drafts) = header.tolist()
        if not go:
            return None
        starts = torch.empty(n_starts, dtype=torch.int64, device=self.device)
        dist.broadcast(starts, src=0)
        fields = Fields(n, r, a, w)
        if graph_size:  # straight into the graph's inputs
            buffer = self.static[graph_size][0].buffer[:fields.nbytes]
        else:
            buffer = torch.empty(fields.nbytes, dtype=torch.uint8, device=self.device)
        dist.broadcast(buffer, src=0)
        hidden_rows = torch.empty(n_hidden, dtype=torch.int64, device=self.device)
        dist.broadcast(hidden_rows, src=0)
        step = self.as_step(fields, buffer, starts.tolist())
        step.rows, step.graph_size, step.mtp_depth, step.hidden_rows = step.rows[:kept], graph_size, depth, hidden_rows
        step.batch.decode_only, step.greedy_draft, step.rows_prefix = bool(decode_only), bool(draft), bool(rows_prefix)
        if self.expands_prompts(step.batch.decode_only, graph_size or n):
            step.batch.first_rows = fields.views(buffer)["first_rows"]
        step.drafts = drafts
        return step

    @torch.inference_mode()
    def follow(self) -> None:
        """The loop of ranks other than 0: run every step rank 0 broadcasts, until it says stop."""
        while (step := self.receive()) is not None:
            self.execute(step)
