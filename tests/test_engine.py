"""The engine: continuous batching on the paged latent cache gives exactly the tokens of a plain full
forward, whatever the batching, chunking, preemption or prefix caching."""

import pytest
import torch

from dsv3.engine.llm import LLMEngine
from dsv3.engine.sampling import SamplingParams, filter_top_k_top_p, sample
from dsv3.engine.sequence import ScheduledItem
from helpers import confident_model, varied_prompts


@pytest.fixture(scope="module")
def model():
    return confident_model()


def reference_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = varied_prompts()
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def run(engine, prompts, params):
    seqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return seqs


@pytest.fixture(scope="module")
def expected(model):
    return [reference_greedy(model, p, 12) for p in PROMPTS]


@pytest.mark.parametrize("options", [
    dict(block_size=4, max_num_batched_tokens=512),          # everything in one prefill step
    dict(block_size=4, max_num_batched_tokens=7),            # chunked prefill, decode and prefill mixed
    dict(block_size=16, max_num_batched_tokens=64, max_num_seqs=2),  # requests queue for a slot
])
def test_batched_greedy_equals_full_forward(model, expected, options):
    engine = LLMEngine(model, None, num_blocks=64, **options)
    seqs = run(engine, PROMPTS, GREEDY)
    assert [s.output_token_ids for s in seqs] == expected
    assert all(s.finish_reason == "length" for s in seqs)
    assert engine.blocks.num_free == engine.blocks.num_blocks  # the cache returns to its baseline


@pytest.mark.parametrize("options", [
    dict(max_num_batched_tokens=512),   # every prompt in one step, in rows mode
    dict(max_num_batched_tokens=7),     # chunks beside decode rows
])
def test_prefilling_steps_in_rows_mode_equal_full_forward(model, expected, options):
    """On a GPU, a prefilling step whose attention is cheap per row runs in rows mode (every prompt token its own
    attention row, the absorbed form, under the decode graphs); here eagerly: the same tokens, also staggered
    arrivals (decode rows beside prompt chunks) and a prefix-cache hit (a chunk that starts mid-prompt)."""
    engine = LLMEngine(model, None, num_blocks=64, block_size=4, **options)
    engine.rows_mode_keys = 10**9
    modes = []
    launch = engine.runner.pack
    engine.runner.pack = lambda items, rows_mode, **kw: modes.append(rows_mode) or launch(items, rows_mode, **kw)
    seqs, _ = run_staggered(engine, PROMPTS, [GREEDY] * len(PROMPTS))
    assert [s.output_token_ids for s in seqs] == expected
    again = run(engine, [PROMPTS[2]], GREEDY)[0]
    assert engine.blocks.prefix_hits > 0 and again.output_token_ids == expected[2]
    assert all(modes) and engine.stats["prefill_steps"] > len(PROMPTS)
    engine.rows_mode_keys = 0  # a step whose prompt attention is too long for rows mode takes the expanded form
    assert run(engine, [PROMPTS[1][::-1]], GREEDY)[0].output_token_ids == reference_greedy(model, PROMPTS[1][::-1], 12)
    assert not all(modes)


def test_alone_equals_in_a_batch(model):
    engine = LLMEngine(model, None, num_blocks=64, block_size=4)
    alone = [run(engine, [p], GREEDY)[0].output_token_ids for p in PROMPTS]
    together = [s.output_token_ids for s in run(engine, PROMPTS, GREEDY)]
    assert alone == together


def test_preemption_loses_nothing(model, expected):
    # 13 blocks of 4 tokens cannot hold all four sequences: the newest are preempted and recomputed.
    engine = LLMEngine(model, None, num_blocks=13, block_size=4)
    seqs = run(engine, PROMPTS, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert [s.output_token_ids for s in seqs] == expected
    assert engine.blocks.num_free == 13


def test_prefix_cache_reuses_blocks_and_keeps_results(model, expected):
    engine = LLMEngine(model, None, num_blocks=64, block_size=4)
    run(engine, [PROMPTS[2]], GREEDY)
    hits = engine.blocks.prefix_hits
    again = run(engine, [PROMPTS[2]], GREEDY)[0]
    assert engine.blocks.prefix_hits - hits == 28  # 7 full blocks of the 30-token prompt
    assert again.output_token_ids == expected[2]


def run_staggered(engine, prompts, params, every=3):
    """Add the requests one at a time, `every` steps apart, then run to the end; also report whether a
    step was ever in flight when another was launched (async scheduling)."""
    seqs, overlapped = [], False
    for i in range(len(prompts) * every):
        if i % every == 0:
            seqs.append(engine.add_request(prompts[i // every], params[i // every]))
        overlapped |= engine.in_flight is not None
        engine.step()
    while engine.has_unfinished():
        overlapped |= engine.in_flight is not None
        engine.step()
    return seqs, overlapped


@pytest.mark.parametrize("num_blocks,every", [(64, 3), (8, 1)])  # 8 blocks: preemption while steps are in flight
def test_async_scheduling_equals_synchronous(model, expected, num_blocks, every):
    """Launching each step before reading the last one's tokens changes no output: not with a stop token
    met while the next step runs, seeded sampling, logprobs, requests arriving mid-way or preemption."""
    stop_at = 5
    params = [SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[expected[0][stop_at]]),
              SamplingParams(max_tokens=9, temperature=1.0, top_k=50, top_p=0.9, seed=7, logprobs=3),
              SamplingParams(max_tokens=1, temperature=0),
              SamplingParams(max_tokens=12, temperature=0.7, seed=1)]
    results = {}
    for mode in (False, True):
        engine = LLMEngine(model, None, num_blocks=num_blocks, block_size=4, async_scheduling=mode)
        seqs, overlapped = run_staggered(engine, PROMPTS, params, every)
        assert overlapped == mode
        assert engine.blocks.num_free == num_blocks
        assert (engine.scheduler.num_preemptions > 0) == (num_blocks == 8)
        results[mode] = seqs
    for a, b in zip(results[True], results[False]):
        assert (a.output_token_ids, a.finish_reason) == (b.output_token_ids, b.finish_reason)
        # Tokens are batch-invariant; logprobs to rounding (the batches of the two runs differ).
        assert [(lp.token_id, [t for t, _ in lp.top]) for lp in a.logprobs] == \
            [(lp.token_id, [t for t, _ in lp.top]) for lp in b.logprobs]
        assert torch.allclose(torch.tensor([lp.logprob for lp in a.logprobs]),
                              torch.tensor([lp.logprob for lp in b.logprobs]), atol=1e-5)
    first = results[True][0]
    assert first.finish_reason == "stop"
    assert first.output_token_ids == expected[0][:expected[0].index(expected[0][stop_at]) + 1]
    assert len(results[True][1].logprobs) == len(results[True][1].output_token_ids) == 9


def test_request_that_cannot_fit_is_refused(model):
    engine = LLMEngine(model, None, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="cannot fit"):
        engine.add_request(PROMPTS[2], GREEDY)
    with pytest.raises(ValueError, match="context"):
        engine.add_request([1] * 200, GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([1, 999], GREEDY)


def test_abort_frees_blocks(model):
    engine = LLMEngine(model, None, num_blocks=64, block_size=4)
    seq = engine.add_request(PROMPTS[2], SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    assert engine.blocks.num_free < 64
    engine.abort(seq.request_id)
    assert engine.blocks.num_free == 64 and seq.finish_reason == "abort" and not engine.has_unfinished()


def test_seeded_sampling_repeats_and_does_not_depend_on_the_batch(model):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    engine = LLMEngine(model, None, num_blocks=64, block_size=4)
    alone = run(engine, [PROMPTS[0]], params)[0].output_token_ids
    batched = run(engine, [PROMPTS[0], PROMPTS[1]], [params, SamplingParams(max_tokens=10, seed=3)][0])[0]
    assert batched.output_token_ids == alone


def test_top_k_top_p_filter():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    out = filter_top_k_top_p(logits, [2, 0], [1.0, 0.7])
    assert torch.isinf(out[0]).tolist() == [False, False, True, True]
    # softmax(3,2,1,0) = .64 .24 .09 .03: the nucleus of mass 0.7 is the first two tokens.
    assert torch.isinf(out[1]).tolist() == [False, False, True, True]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    params = [SamplingParams(temperature=1.0)]
    for _ in range(4000):
        counts[sample(logits, params, [gen])] += 1
    assert torch.allclose(counts / 4000, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_sampling_params_are_checked():
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-5), dict(stop=[""])):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_a_graph_steps_inputs_land_in_its_static_buffer(model):
    """pack for a captured batch size (stood in for here: graphs exist only on a GPU) writes the step into that
    graph's static buffer: rows padded onto the scratch block, block tables to max_model_len's width, the row
    of last_tokens that holds each pending token; the step then takes that token on the device."""
    from types import SimpleNamespace

    engine = LLMEngine(model, None, num_blocks=64, block_size=4, max_model_len=32)
    runner, size, scratch = engine.runner, 4, engine.runner.scratch_block
    fields = runner.graph_fields(size)
    dest = torch.zeros(fields.nbytes, dtype=torch.uint8)
    static = runner.stage(fields, dict(ids=[0] * size, positions=[0] * size, slots=[scratch * 4] * size,
                                       sources=[-1] * size, rows=list(range(size)), context_lens=[1] * size,
                                       tables=[]), dest)
    runner.graphs, runner.static = {size: None}, {size: (static, None, None)}
    items = [ScheduledItem(SimpleNamespace(block_table=[3, 7]), 5, [11], 1),
             ScheduledItem(SimpleNamespace(block_table=[2]), 2, [-1], 1)]
    step = runner.pack(items, rows_mode=True, sources=[-1, 6])
    assert step.graph_size == size and step.ids.data_ptr() == dest.data_ptr()
    assert step.ids.tolist() == [11, -1, 0, 0] and step.positions.tolist() == [5, 2, 0, 0]
    assert step.batch.slot_mapping.tolist() == [7 * 4 + 1, 2 * 4 + 2, scratch * 4, scratch * 4]
    assert step.batch.context_lens.tolist() == [6, 3, 1, 1]
    width = runner.max_blocks
    assert step.batch.block_tables.tolist() == [[3, 7] + [scratch] * (width - 2), [2] + [scratch] * (width - 1),
                                                [scratch] * width, [scratch] * width]
    assert step.sources.tolist() == [-1, 6, -1, -1] and step.rows.tolist() == [0, 1]
    assert step.fills and step.rows_prefix and step.batch.query_starts == [0, 1, 2]
    runner.last_tokens[6] = 42
    assert runner.fill_pending(step.ids, step.sources).tolist() == [11, 42, 0, 0]
    eager = runner.pack(items, rows_mode=True, graph=False, sources=[-1, 6])
    assert eager.graph_size == 0 and eager.ids.tolist() == [11, -1] and eager.buffer.data_ptr() != dest.data_ptr()


def test_rows_mode_steps_beyond_a_decode_step_mark_their_prompts(model):
    """A rows-mode step of more rows than a decode step holds prompt rows: each row carries its sequence's first
    row, so that the rows of prompts that start in the step attend expanded (MLA.rows_attention); a step within
    a decode step's rows, and every step of the deterministic mode, attend every row absorbed."""
    from types import SimpleNamespace

    prompt = ScheduledItem(SimpleNamespace(block_table=[3, 7]), 0, [5, 6, 7], 1)
    decoding = ScheduledItem(SimpleNamespace(block_table=[2]), 2, [9], 1)
    runner = LLMEngine(model, None, num_blocks=64, block_size=4, max_model_len=32, max_num_seqs=2).runner
    step = runner.pack([prompt, decoding], rows_mode=True, graph=False)
    assert step.batch.first_rows.tolist() == [0, 0, 0, 3] and step.batch.context_lens.tolist() == [1, 2, 3, 3]
    assert runner.pack([decoding, decoding], rows_mode=True, graph=False).batch.first_rows is None
    assert runner.pack([prompt, decoding], rows_mode=False, graph=False).batch.first_rows is None
    fixed = LLMEngine(model, None, num_blocks=64, block_size=4, max_model_len=32, max_num_seqs=2, deterministic=True)
    assert fixed.runner.pack([prompt, decoding], rows_mode=True, graph=False).batch.first_rows is None


def test_admission_delay_holds_prompts_to_prefill_them_together():
    """prefill_delay_factor: while sequences run, a waiting prompt is held until the oldest waiting one has
    waited that many times the last prefilling step; never when nothing runs, nor once the budget is full."""
    from dsv3.engine.cache import BlockManager
    from dsv3.engine.scheduler import Scheduler
    from dsv3.engine.sequence import Sequence

    now = [0.0]
    scheduler = Scheduler(BlockManager(64, 4), 8, 16, prefill_delay_factor=2.0, clock=lambda: now[0])

    def add(n):
        seq = Sequence(list(range(n)), GREEDY)
        scheduler.add(seq, n + 4)
        return seq

    first = add(5)
    assert [s for s, _ in scheduler.schedule()] == [first]     # nothing runs: admitted at once
    now[0] = 1.0                                               # that prefilling step took 1 s
    scheduler.computed(first, 5)
    second = add(3)
    assert [s for s, _ in scheduler.schedule()] == [first]     # held: waited 0, less than 2 x 1 s
    now[0] = 1.5
    third = add(3)
    assert [s for s, _ in scheduler.schedule()] == [first]     # held: the oldest waited 0.5 s
    now[0] = 2.5
    assert [s for s, _ in scheduler.schedule()] == [first]     # the oldest waited 1.5 s
    now[0] = 3.0
    assert [s for s, _ in scheduler.schedule()] == [first, second, third]  # waited 2 s: both together
    now[0] = 4.0
    big = add(16)                                              # fills the step's budget: no reason to wait
    assert big in [s for s, _ in scheduler.schedule()]


def test_admission_delay_holds_no_prompt_that_a_graph_would_prefill():
    """With a `graphed` predicate (the engine's: would the step replay a CUDA graph), prompts that fit the graph
    with the decoding rows are admitted at once; larger ones are still held."""
    from dsv3.engine.cache import BlockManager
    from dsv3.engine.scheduler import Scheduler
    from dsv3.engine.sequence import Sequence

    now, asked = [0.0], []

    def graphed(pairs):
        asked.append([n for _, n in pairs])
        return sum(n for _, n in pairs) <= 8

    scheduler = Scheduler(BlockManager(64, 4), 8, 16, prefill_delay_factor=2.0, clock=lambda: now[0], graphed=graphed)
    first = Sequence(list(range(5)), GREEDY)
    scheduler.add(first, 9)
    scheduler.schedule()
    now[0] = 1.0
    scheduler.computed(first, 5)
    first.all_token_ids.append(7)                                   # its first new token: it decodes now
    small = Sequence(list(range(3)), GREEDY)
    scheduler.add(small, 7)
    assert [s for s, _ in scheduler.schedule()] == [first, small]   # 1 decode row + 3 prompt rows fit: not held
    assert asked[-1] == [1, 3]
    now[0] = 2.0
    for seq in (first, small):
        scheduler.computed(seq, seq.num_uncomputed)
        seq.all_token_ids.append(7)
    large = Sequence(list(range(7)), GREEDY)
    scheduler.add(large, 11)
    assert [s for s, _ in scheduler.schedule()] == [first, small]   # 2 + 7 rows would run eagerly: held


def test_admission_delay_changes_no_output(model, expected):
    params = [GREEDY] * len(PROMPTS)
    engine = LLMEngine(model, None, num_blocks=64, block_size=4, prefill_delay_factor=3.0)
    seqs, _ = run_staggered(engine, PROMPTS, params, every=1)
    assert [s.output_token_ids for s in seqs] == expected


def test_mixed_step_tokens_caps_a_decoding_step():
    """mixed_step_tokens: while a sequence decodes, a step computes at most that many tokens, the decoding rows
    first and prompt tokens (chunks of a prompt admitted earlier too) in the rest; with nothing decoding the step's
    whole budget goes to prompts."""
    from dsv3.engine.cache import BlockManager
    from dsv3.engine.scheduler import Scheduler
    from dsv3.engine.sequence import Sequence

    scheduler = Scheduler(BlockManager(64, 4), 8, 16, mixed_step_tokens=5)
    first = Sequence(list(range(10)), GREEDY)
    scheduler.add(first, 14)
    assert scheduler.schedule() == [(first, 10)]                      # nothing decodes: the whole prompt
    scheduler.computed(first, 10)
    first.all_token_ids.append(7)                                     # it decodes now
    long, short = Sequence(list(range(20, 26)), GREEDY), Sequence(list(range(30, 33)), GREEDY)  # no prefix hit
    scheduler.add(long, 10)
    scheduler.add(short, 7)
    assert scheduler.schedule() == [(first, 1), (long, 4)]            # 4 prompt tokens beside the decode row: 5 in all
    scheduler.computed(first, 1)
    scheduler.computed(long, 4)
    first.all_token_ids.append(7)
    assert scheduler.schedule() == [(first, 1), (long, 2), (short, 2)]  # the rest of long, then short's first 2
    for seq, n in ((first, 1), (long, 2), (short, 2)):
        scheduler.computed(seq, n)
    first.all_token_ids.append(7)
    long.all_token_ids.append(7)                                      # two decode, short has one prompt token left
    late = Sequence(list(range(40, 44)), GREEDY)
    scheduler.add(late, 6)
    scheduler.mixed_step_tokens = 2
    assert scheduler.schedule() == [(first, 1), (long, 1), (short, 1)]  # one-token rows never wait; late does


def test_mixed_step_tokens_changes_no_output(model, expected):
    params = [GREEDY] * len(PROMPTS)
    engine = LLMEngine(model, None, num_blocks=64, block_size=4, mixed_step_tokens=4)
    seqs, _ = run_staggered(engine, PROMPTS, params, every=1)
    assert [s.output_token_ids for s in seqs] == expected
    assert engine.stats["prefill_steps"] > len(PROMPTS)  # prompts did arrive in chunks
