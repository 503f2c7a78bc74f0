"""Runs one scheduled step on the model: packs the sequences' new tokens into one flat batch, tells
the attention where their latents go in the paged cache, and returns logits for the sequences
that complete a token this step.

On a GPU, decode steps (one token per sequence) replay CUDA graphs captured once per batch size
(as nano-vllm and vLLM do): a decode step of a small batch is otherwise dominated by kernel launches.
Rows beyond the real batch are padding: they write to a scratch block nobody owns and are ignored.

With several ranks, rank 0 schedules and broadcasts each step's inputs; the other ranks `follow`,
running the same forward so that every collective inside the model meets its partners.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv3.engine.sequence import Sequence
from dsv3.model import DeepseekV3ForCausalLM, PagedBatch
from dsv3.parallel import SINGLE, Parallel

HEADER = 11  # ints that announce a broadcast step
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


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


class ModelRunner:
    def __init__(self, model: DeepseekV3ForCausalLM, latent_caches: list[torch.Tensor], block_size: int,
                 max_model_len: int, max_graph_rows: int, cuda_graphs: bool = True, par: Parallel = SINGLE,
                 max_draft_rows: int = 0):
        self.model, self.latent_caches, self.block_size, self.par = model, latent_caches, block_size, par
        self.device = next(model.parameters()).device
        self.scratch_block = latent_caches[0].shape[0] - 1  # the cache's last block is never handed out
        self.max_blocks = -(-max_model_len // block_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.draft_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.static: dict[int, tuple[StepInputs, torch.Tensor, torch.Tensor]] = {}
        self.static_drafts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if cuda_graphs and self.device.type == "cuda":
            self.capture([b for b in GRAPH_BATCH_SIZES if b <= max_graph_rows],
                         [b for b in GRAPH_BATCH_SIZES if b <= max_draft_rows])

    # ---- packing ----------------------------------------------------------------------------------
    def pack(self, items: list[tuple[Sequence, int, list[int], int]], rows_mode: bool, graph: bool = True,
             greedy_draft: bool = False) -> StepInputs:
        """(sequence, first position, tokens, logits wanted for its last ... rows) -> device tensors.

        rows_mode (no sequence is prefilling): every token is its own attention row, with its own
        context length over its sequence's blocks; plain decode and draft verification both take the
        absorbed path, padded to the next captured graph's size. Otherwise each sequence's tokens
        attend together (chunked prefill). graph=False: never padded (the MTP module runs eagerly).
        greedy_draft: a rows-mode step that also drafts (`greedy_draft`), from its own set of graphs.
        """
        ids, positions, slots, starts, context_lens, tables, rows = [], [], [], [0], [], [], []
        width = max(len(seq.block_table) for seq, *_ in items)
        for seq, first, tokens, keep in items:
            n = len(tokens)
            ids += tokens
            span = range(first, first + n)
            positions += span
            slots += self.slots(seq.block_table, first, n)
            table = seq.block_table + [self.scratch_block] * (width - len(seq.block_table))
            if rows_mode:
                context_lens += [p + 1 for p in span]
                tables += [table] * n
            else:
                context_lens.append(first + n)
                tables.append(table)
            rows += range(starts[-1] + n - keep, starts[-1] + n)
            starts.append(starts[-1] + n)
        graphs = self.draft_graphs if greedy_draft else self.graphs
        graph_size = next((b for b in graphs if b >= len(ids)), 0) if rows_mode and graph else 0
        if graph_size:
            pad = graph_size - len(ids)
            tables = [t + [self.scratch_block] * (self.max_blocks - width) for t in tables]
            ids, positions = ids + [0] * pad, positions + [0] * pad
            slots += [self.scratch_block * self.block_size] * pad
            context_lens += [1] * pad
            tables += [[self.scratch_block] * self.max_blocks] * pad

        def tensor(x, dtype):
            return torch.tensor(x, dtype=dtype, pin_memory=self.device.type == "cuda").to(self.device, non_blocking=True)

        batch = PagedBatch(query_starts=starts, context_lens=tensor(context_lens, torch.int32),
                           block_tables=tensor(tables, torch.int32), slot_mapping=tensor(slots, torch.int64),
                           latent_caches=self.latent_caches, decode_only=rows_mode,
                           context_lens_host=None if rows_mode else context_lens)
        return StepInputs(tensor(ids, torch.int64), tensor(positions, torch.int64), batch, tensor(rows, torch.int64),
                          graph_size, greedy_draft=greedy_draft)

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
            self.broadcast(step)
        return self.execute(step)

    def execute(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (N, D), logits of the kept rows (R, vocab)); a greedy_draft step returns instead of
        the logits its (2, N) tokens: the main model's argmax and the MTP draft at every row."""
        n = step.batch.query_starts[-1]
        if step.mtp_depth >= 0:  # MTP graphs are not captured: the module is one block
            hidden = self.model.mtp_hidden(self.last_hidden[step.hidden_rows], step.ids, step.positions,
                                           step.mtp_depth, step.batch)
        elif step.graph_size:
            static, hidden, logits = self.static[step.graph_size]
            static.ids.copy_(step.ids)
            static.positions.copy_(step.positions)
            static.batch.context_lens.copy_(step.batch.context_lens)
            static.batch.block_tables.copy_(step.batch.block_tables)
            static.batch.slot_mapping.copy_(step.batch.slot_mapping)
            if step.greedy_draft:
                hidden, tokens = self.static_drafts[step.graph_size]
                self.draft_graphs[step.graph_size].replay()
                self.last_hidden = hidden[:n]
                return hidden[:n], tokens[:, :n]
            self.graphs[step.graph_size].replay()
            self.last_hidden = hidden[:n]
            return hidden[:n], logits[step.rows]
        else:
            hidden = self.model.model(step.ids, step.positions, step.batch)   # (N, D)
        self.last_hidden = hidden
        if step.greedy_draft:
            return hidden, self.greedy_draft(hidden, step.positions, step.batch)
        return hidden, self.model.logits(hidden[step.rows])                   # (R, vocab) float32

    def greedy_draft(self, hidden: torch.Tensor, positions: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """Verification and the next draft in one forward (greedy, one draft): at every row i, the main
        model's argmax g_i, then the MTP module on (h_i, g_i) and its argmax. Whatever the verification
        keeps, the row after the last kept draft fed the MTP the true next token, so its draft is the one
        plain drafting would make; rows past it wrote MTP cache slots that the next step writes again."""
        target = self.model.logits(hidden).argmax(dim=-1)
        mtp = self.model.mtp_hidden(hidden, target, positions, 0, batch)
        return torch.stack([target, self.model.logits(mtp).argmax(dim=-1)])

    # ---- CUDA graphs ------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self, sizes: list[int], draft_sizes: list[int]) -> None:
        """One graph per batch size, largest first so the smaller ones reuse its memory pool; for the sizes
        in draft_sizes, a second graph that also drafts (greedy_draft)."""
        pool = None
        for size in sorted(set(sizes) | set(draft_sizes), reverse=True):
            def full(value, *shape, dtype=torch.int64):
                return torch.full(shape, value, dtype=dtype, device=self.device)

            batch = PagedBatch(query_starts=list(range(size + 1)), context_lens=full(1, size, dtype=torch.int32),
                               block_tables=full(self.scratch_block, size, self.max_blocks, dtype=torch.int32),
                               slot_mapping=full(self.scratch_block * self.block_size, size),
                               latent_caches=self.latent_caches, decode_only=True)
            static = StepInputs(full(0, size), full(0, size), batch, torch.arange(size, device=self.device), size)
            for _ in range(2):  # warm up outside the graph (Triton autotuning, cuBLAS handles)
                hidden = self.model.model(static.ids, static.positions, batch)
                self.model.logits(hidden)
                if size in draft_sizes:
                    self.greedy_draft(hidden, static.positions, batch)
            torch.cuda.synchronize()
            if size in sizes:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = self.model.model(static.ids, static.positions, batch)
                    logits = self.model.logits(hidden)
                pool = graph.pool()
                self.graphs[size] = graph
                self.static[size] = (static, hidden, logits)
            if size in draft_sizes:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = self.model.model(static.ids, static.positions, batch)
                    tokens = self.greedy_draft(hidden, static.positions, batch)
                pool = graph.pool()
                self.draft_graphs[size] = graph
                self.static_drafts[size] = (hidden, tokens)
                self.static.setdefault(size, (static, hidden, None))
        self.graphs = dict(sorted(self.graphs.items()))
        self.draft_graphs = dict(sorted(self.draft_graphs.items()))

    # ---- several ranks ----------------------------------------------------------------------------
    def broadcast(self, step: StepInputs | None) -> None:
        """Rank 0 sends a step (None: stop) to the followers: a header of sizes, then the tensors."""
        if step is None:
            dist.broadcast(torch.zeros(HEADER, dtype=torch.int64, device=self.device), src=0)
            return
        b = step.batch
        hidden_rows = step.hidden_rows if step.hidden_rows is not None else step.rows[:0]
        header = [1, len(step.ids), len(b.query_starts), b.block_tables.shape[0], b.block_tables.shape[1],
                  len(step.rows), step.graph_size, int(b.decode_only), step.mtp_depth, len(hidden_rows),
                  int(step.greedy_draft)]
        dist.broadcast(torch.tensor(header, device=self.device), src=0)
        starts = torch.tensor(b.query_starts, dtype=torch.int64, device=self.device)
        for t in (step.ids, step.positions, b.slot_mapping, b.context_lens, b.block_tables, step.rows, starts,
                  hidden_rows):
            dist.broadcast(t, src=0)

    def receive(self) -> StepInputs | None:
        header = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        go, n, n_starts, attn_rows, width, r, graph_size, decode_only, depth, n_hidden, draft = header.tolist()
        if not go:
            return None

        def empty(*shape, dtype=torch.int64):
            return torch.empty(shape, dtype=dtype, device=self.device)

        ids, positions, slots = empty(n), empty(n), empty(n)
        context_lens, tables = empty(attn_rows, dtype=torch.int32), empty(attn_rows, width, dtype=torch.int32)
        rows, starts, hidden_rows = empty(r), empty(n_starts), empty(n_hidden)
        for t in (ids, positions, slots, context_lens, tables, rows, starts, hidden_rows):
            dist.broadcast(t, src=0)
        batch = PagedBatch(starts.tolist(), context_lens, tables, slots, self.latent_caches, bool(decode_only))
        return StepInputs(ids, positions, batch, rows, graph_size, depth, hidden_rows, bool(draft))

    @torch.inference_mode()
    def follow(self) -> None:
        """The loop of ranks other than 0: run every step rank 0 broadcasts, until it says stop."""
        while (step := self.receive()) is not None:
            self.execute(step)
