"""The deterministic mode (issue 21, EngineConfig.deterministic): a request's greedy tokens and its logits,
bit for bit, do not depend on the batch around it, on prefill chunking, on prefix-cache hits or on MTP
speculation; and they are the model's greedy tokens.

The CPU engine runs the mode's CPU path (every product row by row). The GPU path's kernels (the fixed-launch
GEMM, the fixed-split MLA decode, the fixed router launch, the fixed experts) run here under Triton's
interpreter, in a subprocess as in test_kernels.py (this file run as a script): a row's result alone equals
its result beside others, and the kernels equal their references.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.engine.llm import LLMEngine
from dsv3.engine.sampling import SamplingParams
from dsv3.engine.speculative import SpeculationPolicy
from dsv3.kernels import dispatch, reference
from dsv3.model import DeepseekV3ForCausalLM, PagedBatch, init_weights
from helpers import confident_model, tiny_config, varied_prompts

PROMPTS = varied_prompts()
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def model():
    return confident_model()


def record_logits(engine: LLMEngine) -> dict[tuple[int, ...], list[torch.Tensor]]:
    """Spy on the engine's main-model forwards: every logits row it computes, under the token prefix that row
    saw (the prompt and output so far, drafts included). Filled while the engine runs; pending tokens (async
    scheduling) are read from the sequences once the run is over (`prefixes`)."""
    rows: list[tuple] = []
    pack, run = engine.runner.pack, engine.runner.run

    def spy_pack(items, rows_mode, **kw):
        step = pack(items, rows_mode, **kw)
        step.spied_items = list(items)
        return step

    def spy_run(step):
        hidden, out = run(step)
        if step.mtp_depth < 0 and not step.greedy_draft:  # (drafting forwards return tokens, not logits)
            r = 0
            for seq, first, tokens, keep in step.spied_items:
                for j in range(len(tokens) - keep, len(tokens)):
                    rows.append((seq, first, list(tokens[:j + 1]), out[r].clone()))
                    r += 1
        return hidden, out

    engine.runner.pack, engine.runner.run = spy_pack, spy_run
    engine.spied_rows = rows
    return rows


def prefixes(engine: LLMEngine) -> dict[tuple[int, ...], list[torch.Tensor]]:
    out = {}
    for seq, first, tokens, logits in engine.spied_rows:
        full = seq.all_token_ids[:first] + tokens
        key = tuple(t if t >= 0 else seq.all_token_ids[i] for i, t in enumerate(full))  # PENDING: read now
        out.setdefault(key, []).append(logits)
    return out


def generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    seqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return [s.output_token_ids for s in seqs]


def deterministic_engine(model, **options) -> LLMEngine:
    engine = LLMEngine(model, None, **{"num_blocks": 80, "block_size": 4, "deterministic": True, **options})
    record_logits(engine)
    return engine


def assert_same_logits(*runs: dict) -> int:
    """Every prefix that several runs (or one run twice) computed has bitwise equal logits; returns how many
    prefixes were compared between runs."""
    compared = 0
    for run in runs:
        for key, rows in run.items():
            assert all(torch.equal(rows[0], r) for r in rows[1:]), f"one run, two logits for a prefix of {len(key)}"
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            for key in a.keys() & b.keys():
                assert torch.equal(a[key][0], b[key][0]), f"logits after {len(key)} tokens differ between runs"
                compared += 1
    return compared


@pytest.fixture(scope="module")
def alone(model):
    """Each prompt by itself: tokens and the logits by prefix."""
    engines = [deterministic_engine(model) for _ in PROMPTS]
    tokens = [generate(e, [p])[0] for e, p in zip(engines, PROMPTS)]
    logits = {}
    for e in engines:
        logits.update(prefixes(e))
    return tokens, logits


@pytest.mark.parametrize("options", [
    dict(),                                          # all prompts in one step, then decoded together
    dict(max_num_batched_tokens=7),                  # chunked prefill, chunks beside decode rows
    dict(max_num_seqs=2, async_scheduling=False),    # requests queue for a slot; synchronous steps
])
def test_batched_and_chunked_equal_alone_bitwise(model, alone, options):
    engine = deterministic_engine(model, **options)
    assert generate(engine, PROMPTS) == alone[0]
    assert assert_same_logits(alone[1], prefixes(engine)) == len(PROMPTS) * GREEDY.max_tokens  # every token's


def test_prefix_cache_hit_equals_alone_bitwise(model, alone):
    """The second request reads the first one's cached blocks; a third shares only part of a prompt."""
    engine = deterministic_engine(model)
    generate(engine, [PROMPTS[2]])
    hits = engine.blocks.prefix_hits
    shared = PROMPTS[2][:22] + PROMPTS[1][:5]
    again, partial = generate(engine, [PROMPTS[2], shared])
    assert engine.blocks.prefix_hits - hits >= 2 * 20
    assert again == alone[0][2]
    fresh = deterministic_engine(model)
    assert generate(fresh, [shared]) == [partial]
    assert assert_same_logits(alone[1], prefixes(engine), prefixes(fresh)) > 0


@pytest.fixture(scope="module")
def trained():
    """The embedded model (float32): its MTP module's drafts are often right, so verification keeps some."""
    from dsv3.checkpoint import load_model
    from dsv3.default_model import default_model_path

    return load_model(default_model_path(), dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("k,fused", [(1, True), (1, False), (2, False)])
def test_mtp_speculation_equals_plain_decoding_bitwise(trained, k, fused):
    """Verification scores 1 + k rows a sequence where plain decoding scores one: the same logits, bit for bit,
    at every prefix both computed (fused: verification and drafting in one forward, which returns no logits:
    the tokens are compared)."""
    prompts = [[0] + list(range(40 + 7 * i, 60 + 9 * i)) for i in range(3)]
    params = SamplingParams(max_tokens=16, temperature=0)
    plain_engine = deterministic_engine(trained, block_size=8)
    plain = generate(plain_engine, prompts, params)
    engine = deterministic_engine(trained, block_size=8, speculative_tokens=k)
    engine.spec_policy = SpeculationPolicy(32, clock=None)  # speculate at every batch, whatever it costs
    engine.proposer.fused = fused
    assert generate(engine, prompts, params) == plain
    assert engine.stats["spec_accepted"] > 0
    compared = assert_same_logits(prefixes(plain_engine), prefixes(engine))
    assert compared > 0 or fused


def test_tokens_are_the_models_greedy_tokens(model, alone):
    """On the CPU in float32 the mode's tokens are the default engine's and a plain full forward's."""
    assert generate(LLMEngine(model, None, num_blocks=80, block_size=4), PROMPTS) == alone[0]
    ids = list(PROMPTS[1])
    with torch.no_grad():
        for _ in range(GREEDY.max_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert ids[len(PROMPTS[1]):] == alone[0][1]


def test_mode_is_an_engine_option_scoped_to_its_forwards(model):
    """The engine's steps run under the mode; outside them the options are as they were, and an engine
    without the mode never turns it on. Every command that runs a model has the flag."""
    from dsv3.cli import parser

    seen = []
    engine = LLMEngine(model, None, num_blocks=16, block_size=4, deterministic=True)
    forward = engine.model.model.forward
    engine.model.model.forward = lambda *a, **kw: seen.append(dispatch.OPTIONS.deterministic) or forward(*a, **kw)
    generate(engine, [PROMPTS[0]], SamplingParams(max_tokens=2, temperature=0))
    del engine.model.model.forward
    assert seen and all(seen) and not dispatch.OPTIONS.deterministic
    with dispatch.using(deterministic=True):
        assert dispatch.OPTIONS.deterministic
    assert not dispatch.OPTIONS.deterministic
    commands = parser().subcommands
    for name in ("generate", "chat", "bench", "serve"):
        if name in commands:
            assert "--deterministic" in commands[name].format_help(), name


def test_llm_takes_the_option():
    from dsv3 import LLM

    llm = LLM(deterministic=True, max_model_len=64, max_num_seqs=2)
    assert llm.engine.deterministic and llm.engine.runner.deterministic
    out = llm.generate("To be", SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out.token_ids) == 4


# ---- the GPU path's kernels under Triton's interpreter ----------------------------------------------------

def _rows_alone_vs_together(fn, *rows: torch.Tensor) -> float:
    """How many output rows of fn on the whole batch differ, bitwise, from fn on that row alone."""
    together = fn(*rows)
    together = together if isinstance(together, tuple) else (together,)
    wrong = 0
    for i in range(rows[0].shape[0]):
        alone = fn(*(t[i:i + 1] for t in rows))
        alone = alone if isinstance(alone, tuple) else (alone,)
        wrong += any(not torch.equal(a[0], t[i]) for a, t in zip(alone, together))
    return float(wrong)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item() if torch.isfinite(out).all() else float("nan")


def check_fixed_kernels(gen: torch.Generator) -> dict[str, float]:
    from dsv3.kernels import fp8_gemm, gemv, glue, mla_decode, moe

    out = {}
    # The GEMM: 37 rows together and each alone, 16 and 32 bits, FP8 with block scales, logits in float32.
    for dtype in (torch.float32, torch.float16):
        x, w = torch.randn(37, 200, generator=gen).to(dtype), (torch.randn(72, 200, generator=gen) * 0.1).to(dtype)
        out[f"gemm/{dtype}/row_mismatches"] = _rows_alone_vs_together(lambda a: fp8_gemm.fixed_linear(a, w), x)
        out[f"gemm/{dtype}/rel_err"] = rel_err(fp8_gemm.fixed_linear(x, w), x.double() @ w.double().T)
        logits = fp8_gemm.fixed_linear(x, w, out_dtype=torch.float32)
        out[f"gemm/{dtype}/out_dtype_mismatches"] = float(logits.dtype != torch.float32)
        out[f"gemm/{dtype}/logits_rel_err"] = rel_err(logits, x.double() @ w.double().T)
        if dtype == torch.float16:  # the default path's kernel follows the rows (the GEMV for a few, else the
            # GEMM), and the check above tells them apart
            def default(a):
                return gemv.linear(a, w) if gemv.applies(a, w) else fp8_gemm.block_scaled_matmul(a, w[None], None,
                                                                                                  a.shape[0])
            out["gemm/blind_check_mismatches"] = float(_rows_alone_vs_together(default, x) == 0)
    weight, scale = reference.fp8_quantize(torch.randn(96, 256, generator=gen) * 0.1, block=(32, 128))
    x = torch.randn(37, 256, generator=gen)
    out["gemm/fp8/row_mismatches"] = _rows_alone_vs_together(
        lambda a: fp8_gemm.fixed_linear(a, weight, scale, quantize_activations=False), x)
    out["gemm/fp8/rel_err"] = rel_err(fp8_gemm.fixed_linear(x, weight, scale, quantize_activations=False),
                                      reference.fp8_linear(x.double(), weight, scale))
    # Split K (fixed_splits: a long K and few column tiles): partial sums over parts of K, then added in order.
    x = torch.randn(9, 2048, generator=gen)
    splits = fp8_gemm.fixed_splits(40, 2048)
    out["gemm/split_k/splits_mismatches"] = float(splits != 2)
    for name, w in (("float32", torch.randn(40, 2048, generator=gen) * 0.05),
                    ("float16", (torch.randn(40, 2048, generator=gen) * 0.05).half())):
        xs = x.to(w.dtype)
        out[f"gemm/split_k/{name}/row_mismatches"] = _rows_alone_vs_together(lambda a: fp8_gemm.fixed_linear(a, w), xs)
        out[f"gemm/split_k/{name}/rel_err"] = rel_err(fp8_gemm.fixed_linear(xs, w, out_dtype=torch.float32),
                                                      xs.double() @ w.double().T)
    weight, scale = reference.fp8_quantize(torch.randn(40, 2048, generator=gen) * 0.1, block=(32, 128))
    out["gemm/split_k/fp8/row_mismatches"] = _rows_alone_vs_together(
        lambda a: fp8_gemm.fixed_linear(a, weight, scale, quantize_activations=False), x)
    out["gemm/split_k/fp8/rel_err"] = rel_err(fp8_gemm.fixed_linear(x, weight, scale, quantize_activations=False),
                                              reference.fp8_linear(x.double(), weight, scale))
    # Heads: the absorbed MLA's per-head products, W_UK^T a transposed view (strided K).
    x = torch.randn(37, 4, 48, generator=gen)
    for name, w in (("heads", torch.randn(4, 24, 48, generator=gen)),
                    ("heads_strided", torch.randn(4, 48, 24, generator=gen).transpose(1, 2))):
        out[f"gemm/{name}/row_mismatches"] = _rows_alone_vs_together(lambda a: fp8_gemm.fixed_per_head(a, w), x)
        out[f"gemm/{name}/rel_err"] = rel_err(fp8_gemm.fixed_per_head(x, w), reference.per_head(x.double(), w.double()))
    # MLA decode: rows of different contexts, together and alone; and the reference.
    lens = [37, 5, 64, 1, 20]
    block_size, width = 8, 9
    cache = torch.randn(len(lens) * width + 2, block_size, 48, generator=gen)
    tables = torch.randperm(len(lens) * width + 2, generator=gen)[:len(lens) * width].view(len(lens), width).int()
    ctx = torch.tensor(lens, dtype=torch.int32)
    q, q_pe = torch.randn(len(lens), 4, 32, generator=gen), torch.randn(len(lens), 4, 16, generator=gen)

    def attend(q, q_pe, tables, ctx):
        return mla_decode.mla_decode_fixed(q, q_pe, cache, tables, ctx, 32, 0.3)

    out["mla_decode/row_mismatches"] = _rows_alone_vs_together(attend, q, q_pe, tables, ctx)
    ref = reference.mla_decode(q.double(), q_pe.double(), cache.double(), tables, ctx, 32, 0.3)
    out["mla_decode/rel_err"] = rel_err(attend(q, q_pe, tables, ctx), ref)
    # The router: 40 tokens together and alone (the default launch changes its tiles at 16 rows).
    x, gate = torch.randn(40, 512, generator=gen), torch.randn(16, 512, generator=gen) * 0.05
    bias = torch.rand(16, generator=gen) * 0.1
    route = lambda a: glue.route(a, gate, bias, 4, 4, 2, True, 2.5, fixed=True)  # noqa: E731
    out["route/row_mismatches"] = _rows_alone_vs_together(route, x)
    out["route/ids_mismatches"] = float((route(x)[1] != reference.route(x, gate, bias, 4, 4, 2, True, 2.5)[1]).sum())
    # The routed experts: a token alone and beside 20 others (other experts' counts, other layouts).
    n_experts, dim, inter, k = 6, 64, 32, 3
    x16 = torch.randn(21, dim, generator=gen).half()
    ids = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(21)])
    weights = torch.rand(21, k, generator=gen)
    gate_up = (torch.randn(n_experts, 2 * inter, dim, generator=gen) * 0.1).half()
    down = (torch.randn(n_experts, dim, inter, generator=gen) * 0.1).half()

    def experts(x, ids, weights):
        return moe.fused_experts(x, ids, weights, gate_up, None, down, None, all_local=True, fixed=True)

    out["fused_experts/row_mismatches"] = _rows_alone_vs_together(experts, x16, ids, weights)
    out["fused_experts/float16/rel_err"] = rel_err(experts(x16, ids, weights), reference.routed_experts(
        x16.double(), ids, weights, gate_up.double(), None, down.double(), None))
    return out


def check_paged_model(gen: torch.Generator) -> dict[str, float]:
    """The tiny model's paged forward on the Triton path in the mode (dispatch told the CPU is fast), float16:
    two prompts prefilled as rows in one step equal the same tokens decoded one at a time, bit for bit."""
    from helpers import random_bias

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(ModelConfig.from_dict(tiny_config()), dtype=torch.float16).eval()
    init_weights(model, 0.2)
    random_bias(model)
    block_size, lens = 4, [5, 9]
    tables = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    ids = torch.randint(0, 256, (sum(lens),), generator=gen)
    seq_of = [s for s, n in enumerate(lens) for _ in range(n)]
    pos_of = [p for n in lens for p in range(n)]

    def step(rows: list[int], caches) -> torch.Tensor:
        positions = torch.tensor([pos_of[r] for r in rows])
        slots = torch.tensor([int(tables[seq_of[r], pos_of[r] // block_size]) * block_size + pos_of[r] % block_size
                              for r in rows])
        batch = PagedBatch(list(range(len(rows) + 1)), (positions + 1).int(), tables[[seq_of[r] for r in rows]],
                           slots, caches, decode_only=True)
        return model.model(ids[rows], positions, batch)

    def caches() -> list[torch.Tensor]:
        return [torch.zeros(8, block_size, model.config.latent_dim, dtype=torch.float16) for _ in model.model.layers]

    everything, out = list(range(sum(lens))), {}
    use_fast = dispatch.use_fast
    with torch.no_grad(), dispatch.using(deterministic=True):
        ref = step(everything, caches())                                            # the mode's CPU path
        dispatch.use_fast = lambda t: not (t.requires_grad and torch.is_grad_enabled())
        try:
            together, one_by_one = caches(), caches()
            rows = step(everything, together)
            alone = torch.cat([step([r], one_by_one) for r in everything])
        finally:
            dispatch.use_fast = use_fast
    out["paged_model/row_mismatches"] = float((rows != alone).any(-1).sum())
    out["paged_model/cache_mismatches"] = float(sum((a != b).sum() for a, b in zip(together, one_by_one)))
    out["paged_model/float16/model_rel_err"] = rel_err(rows, ref)
    return out


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
BOUNDS = {"mismatches": 0.0, "model_rel_err": 5e-3, "float16": 2e-3, "rel_err": 1e-5}


@pytest.fixture(scope="module")
def interpreted() -> dict[str, float]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("kernel", ["gemm", "mla_decode", "route", "fused_experts", "paged_model"])
def test_fixed_kernels_are_row_invariant_and_match_reference(interpreted, kernel):
    checked = {name: err for name, err in interpreted.items() if name.startswith(kernel + "/")}
    assert checked
    for name, err in checked.items():
        bound = next(b for key, b in BOUNDS.items() if key in name)
        print(f"{name}: {err:.2e} (bound {bound:.0e})")
        assert err <= bound, f"{name}: {err:.2e} > {bound:.0e}"


def position_independent_dot() -> None:
    """Make the Triton interpreter's tl.dot sum each output row as a tensor core does, whatever the row's position
    in its tile: the interpreter calls np.matmul, and OpenBLAS (0.3.31, NumPy 2.4) sums rows 6-15 of a 16-row
    float32 product in another order than rows 0-5, so a row alone (at position 0) and the same row in a batch
    differed in the last bit with nothing in the kernel to blame. On an H200 the mode's GEMM gives the same rows
    (bench/deterministic.py's kernel check, 64/64). Here each row is summed along K in order, in the accumulator's
    precision."""
    import numpy as np
    from triton.runtime import interpreter

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a_data, b_data = a.data, b.data
        if (a.dtype.primitive_bitwidth == 8 and a.dtype.is_floating()) or \
           (b.dtype.primitive_bitwidth == 8 and b.dtype.is_floating()):  # as the interpreter does
            a_data = interpreter._convert_float(a_data, a.dtype, tl.float16, None).view(np.float16)
            b_data = interpreter._convert_float(b_data, b.dtype, tl.float16, None).view(np.float16)
        acc_type = d.data.dtype
        a_data, b_data = a_data.astype(acc_type), b_data.astype(acc_type)
        out = np.zeros(a_data.shape[:-1] + b_data.shape[-1:], dtype=acc_type)
        for k in range(a_data.shape[-1]):  # in order along K, in the accumulator's precision
            out += a_data[..., :, k:k + 1] * b_data[..., k:k + 1, :]
        return interpreter.TensorHandle(out + d.data, d.dtype.scalar)

    import triton.language as tl
    interpreter.InterpreterBuilder.create_dot = create_dot


if __name__ == "__main__":
    position_independent_dot()
    gen = torch.Generator().manual_seed(0)
    print(json.dumps({**check_fixed_kernels(gen), **check_paged_model(gen)}))
