"""MTP speculative decoding: exact under greedy, distribution-preserving under sampling, the paged cache
consistent however many drafts are rejected, and speculation only where it is measured to pay."""

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.engine import speculative
from dsv3.engine.llm import LLMEngine
from dsv3.engine.runner import ModelRunner, draft_graph_sizes
from dsv3.engine.sampling import SamplingParams, probabilities
from dsv3.engine.sequence import ScheduledItem, Sequence
from dsv3.engine.speculative import MTPProposer, SpeculationPolicy
from dsv3.model import DeepseekV3ForCausalLM, init_weights
from helpers import tiny_config, varied_prompts

PROMPTS = varied_prompts()
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DeepseekV3ForCausalLM(ModelConfig.from_dict(tiny_config(eos_token_id=None)), dtype=torch.float32).eval()
    init_weights(m, 0.2)
    return m


def generate(engine, prompts, params=GREEDY):
    params = params if isinstance(params, list) else [params] * len(prompts)
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return [s.output_token_ids for s in seqs]


@pytest.fixture(scope="module")
def plain(model):
    return generate(LLMEngine(model, None, num_blocks=80, block_size=4), PROMPTS)


class OracleDrafts(MTPProposer):
    """Drafts that are right with probability 1 - wrong (the true greedy continuation, else a wrong token),
    so that both acceptance and rejection, at every draft index, are exercised on real cache contents.
    They cannot come out of the verification forward (not fused)."""

    def __init__(self, runner, k, truth, wrong=0.4):
        super().__init__(runner, k)
        self.truth, self.wrong, self.coin, self.fused = truth, wrong, torch.Generator().manual_seed(0), False

    def draft_token(self, seq, depth, logits, greedy_token):
        position = seq.num_tokens + depth - seq.num_prompt_tokens  # index in the output of this draft
        right = self.truth[tuple(seq.prompt_token_ids)]
        token = right[position] if position < len(right) else 0
        if torch.rand((), generator=self.coin) < self.wrong:
            token = (token + 1) % 256
        return token, None


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("budget", [512, 7])
def test_greedy_with_speculation_equals_without(model, plain, k, budget):
    engine = LLMEngine(model, None, num_blocks=80, block_size=4, speculative_tokens=k, max_num_batched_tokens=budget)
    engine.proposer = OracleDrafts(engine.runner, k, truth={tuple(p): o for p, o in zip(PROMPTS, plain)})
    assert generate(engine, PROMPTS) == plain
    drafted, accepted = engine.stats["spec_drafted"], engine.stats["spec_accepted"]
    assert drafted > 0 and 0 < accepted < drafted  # both outcomes happened
    assert engine.stats["steps"] < 12 + 10 or budget == 7  # accepted drafts save steps


@pytest.mark.parametrize("k", [1, 2])
def test_real_mtp_drafts_keep_greedy_exact(model, plain, k):
    engine = LLMEngine(model, None, num_blocks=80, block_size=4, speculative_tokens=k)
    assert generate(engine, PROMPTS) == plain
    assert engine.stats["spec_drafted"] > 0


def test_speculation_turns_itself_off_for_large_batches(model, plain):
    """Above speculative_max_batch the steps are plain ones, scheduled asynchronously (a step in flight
    while the next is launched), and the tokens stay exact."""
    engine = LLMEngine(model, None, num_blocks=80, block_size=4, speculative_tokens=1, speculative_max_batch=2)
    overlapped = []
    step = engine.step

    def watched():
        overlapped.append(engine.in_flight is not None)
        return step()

    engine.step = watched
    assert generate(engine, PROMPTS) == plain
    assert engine.stats["spec_off_steps"] > 0 and any(overlapped)


def test_without_mtp_module_speculation_is_refused():
    cfg = ModelConfig.from_dict(tiny_config(num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="MTP"):
        LLMEngine(DeepseekV3ForCausalLM(cfg, dtype=torch.float32), None, num_blocks=8, speculative_tokens=1)


def test_accept_keeps_the_target_distribution_of_hand_made_p_and_q():
    """Two drafts from hand-made q (with mass where top-k leaves p none): the first emitted token follows
    p's first row, the second (emitted when the first draft stood) its second row, whatever q is."""
    p_logits = torch.tensor([[1.0, 0.0, -1.0, 0.5], [0.2, 0.1, 0.0, -0.3], [0.0, 0.0, 0.0, 0.0]])
    q = [torch.tensor([0.1, 0.6, 0.2, 0.1]), torch.tensor([0.4, 0.1, 0.1, 0.4])]
    params = SamplingParams(temperature=0.7, top_k=3)
    gen = torch.Generator().manual_seed(1)
    first, second, n = torch.zeros(4), torch.zeros(4), 12000
    for _ in range(n):
        drafts = [int(torch.multinomial(qd, 1, generator=gen)) for qd in q]
        out = speculative.accept(p_logits, drafts, q, params, gen)
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    target = probabilities(p_logits, [params] * 3)
    assert target[0, 2] == target[1, 3] == 0 and first[2] == second[3] == 0  # outside top-k: never emitted
    assert torch.allclose(first / n, target[0], atol=0.015), (first / n, target[0])
    assert torch.allclose(second / second.sum(), target[1], atol=0.02), (second / second.sum(), target[1])


@pytest.mark.parametrize("k", [1, 2])
def test_sampling_with_speculation_keeps_the_model_distribution(k):
    """A tiny vocabulary, 4000 seeded requests of one prompt: the empirical joint distribution of the first
    two output tokens (the second comes out of rejection sampling against the MTP drafts) is within
    sampling noise of the model's exact one. Noise alone gives a total variation of about 0.035; always
    accepting the drafts gives 0.45, drawing from p instead of the residual after a rejection 0.17."""
    vocab, n, prompt = 8, 4000, [3, 1, 4, 1, 5]
    torch.manual_seed(0)
    m = DeepseekV3ForCausalLM(ModelConfig.from_dict(tiny_config(vocab_size=vocab, eos_token_id=None)),
                              dtype=torch.float32).eval()
    init_weights(m, 0.2)
    params = [SamplingParams(max_tokens=2, temperature=2.0, top_p=0.9, seed=i) for i in range(n)]
    with torch.no_grad():
        first = probabilities(m(torch.tensor([prompt]))[0, -1:], params[:1])[0]
        second = probabilities(m(torch.tensor([prompt + [t] for t in range(vocab)]))[:, -1], params[:vocab])
    exact = first[:, None] * second  # (vocab, vocab): P(first token, second token)
    engine = LLMEngine(m, None, max_num_seqs=n, max_num_batched_tokens=n * len(prompt), num_blocks=3 * n, block_size=4,
                       speculative_tokens=k, speculative_max_batch=n)
    engine.spec_policy = SpeculationPolicy(n, clock=None)  # speculate at this batch, whatever it costs
    outs = generate(engine, [prompt] * n, params)
    assert 0.2 * n < engine.stats["spec_accepted"] < 0.8 * n * k  # drafts both stood and fell
    counts = torch.zeros(vocab, vocab)
    for a, b in outs:
        counts[a, b] += 1
    assert counts[exact == 0].sum() == 0  # nothing outside top-p
    tv = 0.5 * (counts / n - exact).abs().sum()
    assert tv < 0.06, tv


def test_greedy_acceptance_rule():
    logits = torch.tensor([[0.0, 5.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    assert speculative.accept(logits, [1, 0], [None, None], GREEDY, None) == [1, 0, 2]
    assert speculative.accept(logits, [1, 2], [None, None], GREEDY, None) == [1, 0]
    assert speculative.accept(logits, [2, 0], [None, None], GREEDY, None) == [1]


def test_sampling_with_speculation_runs_and_frees_the_cache(model):
    engine = LLMEngine(model, None, num_blocks=80, block_size=4, speculative_tokens=2)
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=3)
    outs = generate(engine, PROMPTS, params)
    assert [len(o) for o in outs] == [12] * len(PROMPTS)
    assert engine.stats["spec_drafted"] > 0


@pytest.fixture(scope="module")
def trained():
    """The trained embedded model, float32: its MTP drafts are often right."""
    from dsv3.checkpoint import load_model
    from dsv3.default_model import default_model_path

    return load_model(default_model_path(), dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_drafting_inside_the_verification_forward_equals_two_passes(trained, k):
    """The one-forward path (verify and draft together; k > 1: chained on the device) makes the same drafts as
    the MTP passes after verification: same tokens, same acceptance, on the trained embedded model where drafts
    are often right. (k > 1: synchronous steps on both sides, so that the same sequences draft: in asynchronous
    ones every sequence drafts.)"""
    prompts = [[0] + list(range(40 + 7 * i, 60 + 9 * i)) for i in range(3)]
    params = SamplingParams(max_tokens=24, temperature=0)
    runs = {}
    for in_graph in (True, False):
        engine = LLMEngine(trained, None, num_blocks=64, block_size=8, speculative_tokens=k, async_scheduling=k == 1)
        engine.spec_policy = SpeculationPolicy(32, clock=None)  # (measured timings would make the runs differ)
        engine.proposer.fused = in_graph
        calls = []
        drafts = engine.runner.verify_and_draft_rows
        engine.runner.verify_and_draft_rows = lambda *a: calls.append(1) or drafts(*a)
        runs[in_graph] = generate(engine, prompts, params), engine.stats["spec_drafted"], engine.stats["spec_accepted"]
        assert bool(calls) == in_graph
    # The same tokens and the same drafts standing; the asynchronous path (k = 1) may count one draft more a
    # sequence, drafted in the window that reached its max_tokens.
    assert runs[True][0] == runs[False][0] and runs[True][2] == runs[False][2]
    assert 0 <= runs[True][1] - runs[False][1] <= (len(prompts) if k == 1 else 0)
    outs, drafted, accepted = runs[True]
    assert outs == generate(LLMEngine(trained, None, num_blocks=64, block_size=8), prompts, params)
    assert accepted > (0.2 if k == 1 else 0) * drafted


def test_a_sequence_whose_drafts_never_stand_stops_drafting(model):
    """Random MTP weights: drafts are almost never right, so after its probe each sequence decodes plainly
    (greedy output unchanged) and the engine counts it in its stats. (Synchronous steps: in asynchronous ones
    every sequence drafts, as its draft costs no forward of its own; the batch's policy decides there.)"""
    params = SamplingParams(max_tokens=40, temperature=0)
    plain = generate(LLMEngine(model, None, num_blocks=80, block_size=4), PROMPTS, params)
    engine = LLMEngine(model, None, num_blocks=80, block_size=4, speculative_tokens=1, async_scheduling=False)
    engine.spec_policy = SpeculationPolicy(32, clock=None)  # every batch speculates: only the sequences decide
    seqs = [engine.add_request(p, params) for p in PROMPTS]
    while engine.has_unfinished():
        engine.step()
    assert [s.output_token_ids for s in seqs] == plain
    probe, floor = SpeculationPolicy.PROBE, SpeculationPolicy.MIN_ACCEPTANCE
    assert all(s.num_drafted <= probe + 1 for s in seqs if s.num_accepted < floor * probe)
    assert engine.stats["spec_off_sequences"] == sum(s.num_accepted < floor * s.num_drafted for s in seqs) > 0


def run_policy(policy, batch, cost, steps):
    """Drive the policy as the engine would; cost[speculates] = (seconds, tokens) of one such step."""
    choices = []
    for _ in range(steps):
        speculates = policy.wants(batch)
        policy.record(batch, speculates, *cost[speculates])
        choices.append(speculates)
    return choices


def test_policy_speculates_in_a_bucket_only_while_measured_faster():
    policy = SpeculationPolicy(max_batch=32, clock=lambda: 0.0)  # (the engine's clock; record takes seconds)
    slower = run_policy(policy, 1, {True: (1.0, 1.5), False: (0.5, 1)}, 1000)  # 1.5 tok/s against 2
    assert slower[:8] == [True] * 8 and not any(slower[20:80])  # measured, then off until a re-probe
    # Re-probes after FIRST_RUN (64) steps, then twice as many each time (plus the probe and its switches), up
    # to PROBE_COST's run (267 steps here).
    probes = [i for i in range(1, 1000) if slower[i] and not slower[i - 1]]
    assert probes[0] < 90 and [b - a for a, b in zip(probes, probes[1:])] == [138, 266, 277]
    assert sum(slower) < 0.05 * len(slower)
    faster = run_policy(policy, 8, {True: (1.0, 12), False: (0.8, 8)}, 1000)  # 12 tok/s against 10
    # Far slower (the synchronous path, say): early re-probes still cost at most EARLY_PROBE_COST of the time.
    much_slower = run_policy(policy, 2, {True: (30.0, 1), False: (1.0, 1)}, 3000)
    assert not any(much_slower[20:2300]) and sum(much_slower) < 20
    window = SpeculationPolicy.WINDOW  # (the last 100 steps may hold one re-probe of plain decoding)
    assert sum(faster) > 0.9 * len(faster) and faster[-100:].count(False) <= window + 1
    assert not policy.wants(1) and policy.wants(8) and policy.wants(5) and not policy.wants(33)
    # Batch 1's speculation becomes faster (say the prompts changed): a re-probe finds it, it turns back on.
    again = run_policy(policy, 1, {True: (0.5, 1.5), False: (0.5, 1)}, 400)
    assert sum(again[-200:]) > 0.9 * 200 and again[-100:].count(False) <= window + 1


class ForwardClock:
    """A fake clock for the engine: time is what its forwards cost, 1 a main-model forward and 0.25 an MTP
    pass, so the policy measures the same on any machine."""

    def __init__(self, runner):
        self.now, run = 0.0, runner.run

        def timed(step):
            self.now += 0.25 if step.mtp_depth >= 0 else 1.0
            return run(step)
        runner.run = timed

    def __call__(self):
        return self.now


@pytest.mark.parametrize("wrong", [0.0, 1.0])
def test_engine_turns_speculation_off_where_measured_slower(model, wrong):
    """Drafts always right: 2 tokens for 1.25 forwards beats 1 for 1, speculation stays on. Always wrong:
    1 token for 1.25, the batch's bucket turns it off (before the sequence's own probe would), and the
    steps after are plain ones. Greedy tokens are plain decoding's either way."""
    params = SamplingParams(max_tokens=60, temperature=0)
    truth = generate(LLMEngine(model, None, num_blocks=80, block_size=4), PROMPTS[:1], params)
    engine = LLMEngine(model, None, num_blocks=80, block_size=4, speculative_tokens=1)
    engine.proposer = OracleDrafts(engine.runner, 1, {tuple(PROMPTS[0]): truth[0]}, wrong=wrong)
    engine.spec_policy = SpeculationPolicy(32, clock=ForwardClock(engine.runner))
    assert generate(engine, PROMPTS[:1], params) == truth
    bucket = engine.spec_policy.buckets[1]
    assert bucket.speculate == (wrong == 0.0) and len(bucket.spec) == len(bucket.plain) == SpeculationPolicy.WINDOW
    if wrong:
        assert engine.stats["spec_off_steps"] > 20 and engine.stats["spec_off_sequences"] == 0
    else:
        assert engine.stats["spec_accepted"] > 20


def watch_async(engine):
    """Count the engine's asynchronous speculative steps, and the windows whose accepted draft finished its
    sequence (the token after it, computed by the same step, dropped)."""
    seen = {"steps": 0, "stopped_on_draft": 0, "accepted": set()}
    launch, apply = engine._speculative_async_step, engine._apply_verified

    def counted_launch():
        seen["steps"] += 1
        return launch()

    def counted_apply(seq, drafted, accepted, token, counted=True):
        before = len(seq.all_token_ids)
        apply(seq, drafted, accepted, token, counted)
        seen["accepted"].add(len(accepted))
        seen["stopped_on_draft"] += bool(accepted) and seq.finished and len(seq.all_token_ids) == before + 1

    engine._speculative_async_step, engine._apply_verified = counted_launch, counted_apply
    return seen


@pytest.mark.parametrize("k", [1, 2])
def test_asynchronous_speculation_equals_plain_decoding(trained, k):
    """Greedy, k drafts, every step launched before the one in flight is read: the tokens are plain
    decoding's, for prompts of different lengths whose stop tokens and max_tokens fall inside a step's
    window (the sequence stops on an accepted draft, or on the token after), and the cache is freed."""
    prompts = [[0] + list(range(40 + 7 * i, 60 + 9 * i)) for i in range(4)] + [[0, 300, 17], [0] + list(range(200, 243))]
    free = [SamplingParams(max_tokens=40, temperature=0)] * len(prompts)
    unstopped = generate(LLMEngine(trained, None, num_blocks=96, block_size=8), prompts, free)
    params = [SamplingParams(max_tokens=m, temperature=0, stop_token_ids=[out[j]] if j is not None else [])
              for out, m, j in zip(unstopped, (40, 17, 30, 9, 21, 40), (None, None, 11, None, 6, 23))]
    expected = generate(LLMEngine(trained, None, num_blocks=96, block_size=8), prompts, params)
    assert [len(out) for out in expected][:2] == [40, 17] and any(len(out) < m.max_tokens for out, m in zip(expected, params))
    engine = LLMEngine(trained, None, num_blocks=96, block_size=8, speculative_tokens=k)
    engine.spec_policy = SpeculationPolicy(32, clock=None)
    seen = watch_async(engine)
    assert generate(engine, prompts, params) == expected
    assert seen["steps"] > 10 and seen["stopped_on_draft"] > 0
    assert engine.stats["spec_accepted"] > 0.3 * engine.stats["spec_drafted"]
    assert all(n in seen["accepted"] for n in range(k + 1))  # every accepted count of a window occurred


@pytest.mark.parametrize("k", [1, 2])
def test_speculation_resumes_asynchronously_after_plain_steps(trained, k):
    """The policy switching speculation off and on every few steps: each switch back drains the plain step in
    flight and takes the asynchronous path at once, the sequences' tokens standing in for drafts (no synchronous
    decode step drafts them); greedy output equals plain decoding's."""
    prompts = [[0] + list(range(40 + 7 * i, 60 + 9 * i)) for i in range(3)]
    params = [SamplingParams(max_tokens=m, temperature=0) for m in (30, 37, 41)]
    expected = generate(LLMEngine(trained, None, num_blocks=96, block_size=8), prompts, params)
    engine = LLMEngine(trained, None, num_blocks=96, block_size=8, speculative_tokens=k, max_model_len=128)
    engine.spec_policy = SpeculationPolicy(32, clock=None)
    engine.spec_policy.wants = lambda batch: engine.stats["steps"] // 6 % 2 == 0  # on for 6 steps, off for 6
    sync_decode_steps, sync_step = [], engine._speculative_step

    def counted_sync_step():
        sync_decode_steps.append(all(s.num_uncomputed == 1 for s in engine.scheduler.running)
                                 and not engine.scheduler.waiting)
        return sync_step()
    engine._speculative_step = counted_sync_step
    seen = watch_async(engine)
    assert generate(engine, prompts, params) == expected
    assert seen["steps"] > 5 and engine.stats["spec_off_steps"] > 5 and not any(sync_decode_steps)


def stand_in_draft_graphs(engine, sizes):
    """Draft graphs on the CPU: each size's static inputs, as capture makes them, and a replay that runs what
    the graph would (ModelRunner.speculative_forward) on them into its static outputs."""
    from types import SimpleNamespace

    runner = engine.runner
    for size in sizes:
        fields = runner.graph_fields(size)
        static = runner.stage(fields, dict(ids=[0] * size, positions=[0] * size, sources=[-1] * size,
                                           slots=[runner.scratch_block * runner.block_size] * size,
                                           rows=list(range(fields.r)), context_lens=[1] * size, tables=[]),
                              torch.zeros(fields.nbytes, dtype=torch.uint8))
        static.graph_size, static.drafts = size, runner.drafts
        hidden = torch.zeros(size, engine.config.hidden_size)
        tokens = torch.zeros(1 + runner.drafts, size, dtype=torch.int64)

        def replay(static=static, hidden=hidden, tokens=tokens):
            h, t = runner.speculative_forward(static)
            hidden.copy_(h)
            tokens.copy_(t)

        runner.draft_graphs[size] = SimpleNamespace(replay=replay)
        runner.static[size], runner.static_drafts[size] = (static, hidden, None), (hidden, tokens)


@pytest.mark.parametrize("k", [1, 2])
def test_speculative_steps_replayed_from_static_buffers_equal_plain_decoding(trained, k):
    """The graph path's bookkeeping on the CPU (stand-in graphs): inputs packed into a size's static buffer,
    padding rows beside the real ones, block tables max_model_len wide, the record of the step before
    read inside the replay; batches of 6, 5, ... 1 sequences pad to 16, 8, 4 and 2 rows."""
    prompts = [[0] + list(range(40 + 7 * i, 60 + 9 * i)) for i in range(6)]
    params = [SamplingParams(max_tokens=m, temperature=0) for m in (9, 14, 20, 25, 31, 36)]
    expected = generate(LLMEngine(trained, None, num_blocks=96, block_size=8), prompts, params)
    engine = LLMEngine(trained, None, num_blocks=96, block_size=8, speculative_tokens=k, max_model_len=128)
    engine.spec_policy = SpeculationPolicy(32, clock=None)
    stand_in_draft_graphs(engine, draft_graph_sizes(16 if k == 1 else 24, k))
    sizes, pack = [], engine.runner.pack
    engine.runner.pack = lambda *a, **k: (lambda step: sizes.append(step.graph_size) or step)(pack(*a, **k))
    seen = watch_async(engine)
    assert generate(engine, prompts, params) == expected
    assert seen["steps"] > 10 and ({16, 8, 4, 2} if k == 1 else {24, 16, 8, 4}) <= set(sizes)


def test_draft_graphs_hold_a_window_each():
    """A draft graph of fewer rows than a window (k + 1) would chain drafts for no sequence: capturing k = 2's
    graphs of 1 and 2 rows divided by zero in the MLA decode's split choice on an H200."""
    assert draft_graph_sizes(16, 1) == [2, 4, 8, 16]
    assert draft_graph_sizes(24, 2) == [4, 8, 16, 24]
    assert draft_graph_sizes(64, 3)[0] == 4 and draft_graph_sizes(2, 2) == []


@pytest.mark.parametrize("k", [1, 2])
def test_synchronous_greedy_steps_replay_draft_graphs(trained, k):
    """The synchronous path (a request waiting, say) verifies and drafts in the draft graphs too where every
    sequence has its k drafts (stand-in graphs on the CPU); greedy output equals plain decoding's."""
    prompts = [[0] + list(range(40 + 7 * i, 60 + 9 * i)) for i in range(5)]
    params = [SamplingParams(max_tokens=m, temperature=0) for m in (9, 14, 20, 25, 31)]
    expected = generate(LLMEngine(trained, None, num_blocks=96, block_size=8), prompts, params)
    engine = LLMEngine(trained, None, num_blocks=96, block_size=8, speculative_tokens=k, max_model_len=128)
    engine.spec_policy = SpeculationPolicy(32, clock=None)
    engine._speculates_async = lambda: False
    stand_in_draft_graphs(engine, draft_graph_sizes(16 if k == 1 else 24, k))
    replayed, pack = [], engine.runner.pack
    engine.runner.pack = lambda *a, **kw: (lambda step: replayed.append(step.graph_size > 0 and step.greedy_draft)
                                           or step)(pack(*a, **kw))
    assert generate(engine, prompts, params) == expected
    assert sum(replayed) > 10 and engine.stats["spec_accepted"] > 0.3 * engine.stats["spec_drafted"]


def test_rows_that_continue_a_speculative_step_move_where_its_draft_stood(model):
    """Packed as if the draft in flight was rejected, then corrected from the step's record: the inputs
    equal those of the synchronous step packed knowing the verification (positions, cache slots across a
    block boundary, context lengths, tokens); a row that does not continue keeps its inputs."""
    runner = ModelRunner(model, LLMEngine(model, None, num_blocks=16, block_size=4).latent_caches, 4, 64, 8,
                         max_draft_rows=8)
    a, b, c = (Sequence(list(range(n)), GREEDY) for n in (7, 4, 3))
    a.block_table, b.block_table, c.block_table = [5, 9, 2], [3, 11], [7]
    # Step n's record: pair 0 (b) rejected its draft, pair 1 (a) accepted it.
    runner.last_speculation[:2] = torch.tensor([[0, 11, 12, 13], [1, 21, 22, 23]])
    packed = runner.pack([ScheduledItem(a, 6, [-1, -1], 2), ScheduledItem(b, 3, [-1, -1], 2),
                          ScheduledItem(c, 1, [4, 5], 2)], True, greedy_draft=True, continues=[1, 0, -1])
    with torch.inference_mode():  # (as the runner's steps run)
        runner.continue_speculation(packed)
    known = runner.pack([ScheduledItem(a, 7, [22, 23], 2), ScheduledItem(b, 3, [12, 13], 2),
                         ScheduledItem(c, 1, [4, 5], 2)], True, greedy_draft=True)
    assert packed.positions.tolist() == known.positions.tolist() == [7, 8, 3, 4, 1, 2]
    assert packed.batch.slot_mapping.tolist() == known.batch.slot_mapping.tolist() == [39, 8, 15, 44, 29, 30]
    assert packed.batch.context_lens.tolist() == known.batch.context_lens.tolist()
    assert packed.ids.tolist() == known.ids.tolist()
    assert torch.equal(packed.batch.block_tables, known.batch.block_tables)


@pytest.mark.parametrize("k", [1, 2])
def test_two_ranks_speculate_as_one(tmp_path, k):
    """Tensor parallel on two gloo ranks, asynchronous speculation: rank 0 corrects the continuing rows before
    it broadcasts them, so both ranks run the same inputs; tokens equal one process's plain decoding."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import dsv3

    prompts = [[0] + list(range(40 + 7 * i, 60 + 9 * i)) for i in range(3)]
    out = tmp_path / "out.json"
    env = {**os.environ, "DSV3_EXPERTS": "tp", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).with_name("dist_speculative_worker.py")), str(out), json.dumps(prompts), str(k)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    llm = dsv3.LLM(dtype="float32", device="cpu", num_blocks=64, block_size=8)
    alone = [o.token_ids for o in llm.generate(prompts, dsv3.SamplingParams(max_tokens=24, temperature=0))]
    assert got["tokens"] == alone
    assert got["async_steps"] > 10 and got["accepted"] > 0


def test_chained_drafts_cost_one_mtp_forward_each_and_leave_no_blocks_behind(trained):
    """k = 2, asynchronous: every speculative step is one main-model forward and two MTP block forwards (of all
    rows, then of one row per sequence), with no host read between; no sequence ever holds more blocks than its
    tokens and the step's room need, and the cache is all free at the end (rejected drafts' slots do not leak)."""
    prompts = [[0] + list(range(40 + 7 * i, 60 + 9 * i)) for i in range(4)]
    params = [SamplingParams(max_tokens=m, temperature=0) for m in (13, 20, 26, 31)]
    expected = generate(LLMEngine(trained, None, num_blocks=96, block_size=8), prompts, params)
    engine = LLMEngine(trained, None, num_blocks=96, block_size=8, speculative_tokens=2)
    engine.spec_policy = SpeculationPolicy(32, clock=None)
    model, runner, calls = engine.model, engine.runner, {"main": 0, "mtp": [], "async": 0}
    backbone, mtp_hidden, launch = model.model.forward, model.mtp_hidden, engine._speculative_async_step
    model.model.forward = lambda *a, **kw: calls.__setitem__("main", calls["main"] + 1) or backbone(*a, **kw)
    model.mtp_hidden = lambda h, *a, **kw: calls["mtp"].append(len(h)) or mtp_hidden(h, *a, **kw)
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    room = engine._async_room(2)
    while engine.has_unfinished():
        before = dict(main=calls["main"], mtp=len(calls["mtp"]))
        async_step = engine._speculates_async() and engine.proposer.k == 2
        rows = 3 * sum(not engine._stops_on_pending(s) for s in engine.scheduler.running)
        engine.step()
        if async_step and rows:  # (rows 0: every sequence stops on what is in flight, nothing launched)
            calls["async"] += 1
            assert calls["main"] - before["main"] == 1 and len(calls["mtp"]) - before["mtp"] == 2
            assert calls["mtp"][-2:] == [rows, rows // 3]
        for seq in engine.scheduler.running:
            assert len(seq.block_table) <= engine.blocks.blocks_needed(seq.num_tokens + room)
    assert [s.output_token_ids for s in seqs] == expected
    assert calls["async"] > 5 and engine.stats["spec_accepted"] > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_rows_that_continue_a_window_of_two_drafts_move_by_its_accepted_count(model):
    """k = 2: packed as if both drafts in flight were rejected, then corrected from the record (accepted count,
    drafts, token after, two next drafts): the inputs equal those packed knowing the verification, for windows
    that accepted 0, 1 and 2 drafts (positions across block boundaries, slots, context lengths, tokens)."""
    runner = ModelRunner(model, LLMEngine(model, None, num_blocks=16, block_size=4).latent_caches, 4, 64, 12,
                         max_draft_rows=12, drafts=2)
    a, b, c, d = (Sequence(list(range(n)), GREEDY) for n in (7, 4, 3, 9))
    a.block_table, b.block_table, c.block_table, d.block_table = [5, 9, 2], [3, 11], [7], [1, 4, 6, 8]
    runner.last_speculation[:3] = torch.tensor([[0, 10, 11, 12, 13, 14], [1, 20, 21, 22, 23, 24],
                                                [2, 30, 31, 32, 33, 34]])
    packed = runner.pack([ScheduledItem(a, 6, [-1] * 3, 3), ScheduledItem(b, 3, [-1] * 3, 3),
                          ScheduledItem(c, 1, [4, 5, 6], 3), ScheduledItem(d, 8, [-1] * 3, 3)], True,
                         greedy_draft=True, continues=[2, 0, -1, 1])
    with torch.inference_mode():
        runner.continue_speculation(packed)
    known = runner.pack([ScheduledItem(a, 8, [32, 33, 34], 3), ScheduledItem(b, 3, [12, 13, 14], 3),
                         ScheduledItem(c, 1, [4, 5, 6], 3), ScheduledItem(d, 9, [22, 23, 24], 3)], True,
                        greedy_draft=True)
    assert packed.positions.tolist() == known.positions.tolist() == [8, 9, 10, 3, 4, 5, 1, 2, 3, 9, 10, 11]
    assert packed.batch.slot_mapping.tolist() == known.batch.slot_mapping.tolist()
    assert packed.batch.context_lens.tolist() == known.batch.context_lens.tolist()
    assert packed.ids.tolist() == known.ids.tolist()
    assert torch.equal(packed.batch.block_tables, known.batch.block_tables)


def test_record_of_windows_of_two_drafts():
    """record_speculation with k = 2 (the PyTorch twin): per window the accepted count (leading drafts equal to
    the main model's argmax at the row before), the drafts, the token after and the next drafts at row a."""
    from dsv3.kernels import reference

    ids = torch.tensor([5, 7, 8, 5, 7, 1, 5, 7, 9])     # windows: 0, 1 and 2 drafts stand
    target = torch.tensor([1, 2, 3, 7, 8, 9, 7, 9, 4])
    tokens = torch.stack([target, torch.arange(10, 19), torch.arange(20, 29)])
    record = torch.zeros(3, 6, dtype=torch.int64)
    reference.record_speculation(ids, tokens, record)
    assert record.tolist() == [[0, 7, 8, 1, 10, 20], [1, 7, 1, 8, 14, 24], [2, 7, 9, 4, 18, 28]]
