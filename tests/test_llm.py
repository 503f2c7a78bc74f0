"""The public API on the embedded default model: dsv3.LLM, SamplingParams, load_model; and the CLI."""

import subprocess
import sys

import pytest
import torch

import dsv3


@pytest.fixture(scope="module")
def llm():
    torch.set_num_threads(1)
    return dsv3.LLM(max_num_seqs=8)


def test_generate_returns_one_result_per_prompt_in_order(llm):
    prompts = ["ROMEO:", "JULIET.\nO Romeo, Romeo,", "To be, or not to be"]
    greedy = dsv3.SamplingParams(max_tokens=12, temperature=0)
    together = llm.generate(prompts, greedy)
    alone = [llm.generate([p], greedy)[0] for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    for out in together:
        assert len(out.token_ids) == 12 and out.finish_reason == "length"
        assert out.text == llm.tokenizer.decode(out.token_ids)


def test_token_id_prompts_and_seeded_sampling(llm):
    ids = llm.tokenizer.encode("KING HENRY.")
    params = dsv3.SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=40, seed=11)
    first, second = llm.generate([ids], params)[0], llm.generate([ids], params)[0]
    assert first.token_ids == second.token_ids and first.prompt_token_ids == ids


def test_stop_strings_cut_the_text(llm):
    free = llm.generate(["ROMEO:"], dsv3.SamplingParams(max_tokens=30, temperature=0))[0]
    word = free.text.split()[1]  # a word the model does write
    out = llm.generate(["ROMEO:"], dsv3.SamplingParams(max_tokens=30, temperature=0, stop=[word]))[0]
    assert out.finish_reason == "stop" and word not in out.text
    assert free.text.startswith(out.text)


def test_stop_token_ends_a_request_and_stays_out_of_the_text(llm):
    free = llm.generate(["ROMEO:"], dsv3.SamplingParams(max_tokens=30, temperature=0))[0]
    stop = free.token_ids[5]
    first = free.token_ids.index(stop)
    out = llm.generate(["ROMEO:"], dsv3.SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:first + 1]
    assert out.text == llm.tokenizer.decode(out.token_ids[:-1])


def test_load_model_gives_logits(llm):
    model = dsv3.load_model(llm.path, dtype=torch.float32, progress=False)
    ids = torch.tensor([llm.tokenizer.encode("Good morrow")])
    logits = model(ids)
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_load_model_takes_dtype_names_and_none_for_the_embedded_model(llm):
    model = dsv3.load_model(None, dtype="float32", progress=False)  # as LLM takes them
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.lm_head.weight, llm.model.lm_head.weight)
    for bad in ("fp32", torch.int8):
        with pytest.raises(ValueError, match="bfloat16, float16, float32"):
            dsv3.load_model(None, dtype=bad, progress=False)
    with pytest.raises(ValueError, match="bfloat16, float16, float32"):
        dsv3.LLM(dtype="float64")


def test_a_checkpoint_without_tokenizer_runs_token_id_prompts(tmp_path, llm):
    from helpers import make_hf_checkpoint

    path, _ = make_hf_checkpoint(tmp_path, num_nextn_predict_layers=0)  # save_pretrained of a model alone: no tokenizer files
    bare = dsv3.LLM(path)
    out = bare.generate([[0, 5, 6]], dsv3.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.text == ""
    with pytest.raises(ValueError, match="tokenizer.json"):
        bare.generate(["text"])
    assert dsv3.LLM(skip_tokenizer_init=True).tokenizer is None


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "dsv3", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_cli_generate_prompt_and_input_file(tmp_path):
    one = run_cli("generate", "--max-new-tokens", "8", "ROMEO:")
    assert one.returncode == 0 and one.stdout.strip()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET:\n\nHAMLET:\n")
    many = run_cli("generate", "--max-new-tokens", "6", "--input-file", str(prompts), "--jsonl")
    assert many.returncode == 0, many.stderr
    import json
    rows = [json.loads(line) for line in many.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["ROMEO:", "JULIET:", "HAMLET:"]


def test_cli_chat_keeps_history_clears_and_exits():
    done = run_cli("chat", "--max-new-tokens", "5", "--temperature", "0", stdin="Hail!\n/clear\nWho goes?\n/exit\n")
    assert done.returncode == 0, done.stderr
    assert "conversation cleared" in done.stderr
    assert len([line for line in done.stdout.splitlines() if line.strip()]) >= 2


def test_cli_errors_name_the_problem(tmp_path):
    bad = run_cli("generate", "--model", str(tmp_path), "hi")
    assert bad.returncode != 0 and "config.json" in bad.stderr
    neither = run_cli("generate")
    assert neither.returncode != 0 and "PROMPT" in neither.stderr


def test_cli_bench_reports_throughput():
    done = run_cli("bench", "--batch", "1", "3", "--prompt-len", "16", "--new-tokens", "4")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["batch 1", "batch 3"]
    assert all("decode" in line and "tokens/s" in line for line in lines)


def fp8_checkpoint(tmp_path):
    """A tiny FP8 checkpoint (16 x 16 blocks) with the embedded model's tokenizer beside it."""
    import shutil

    from dsv3.default_model import default_model_path
    from helpers import make_dsv3_checkpoint

    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
    path = make_dsv3_checkpoint(tmp_path, fp8=True, quantization_config=quant, vocab_size=4096)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path() / name, path / name)
    return path


def test_fp8_checkpoint_through_llm_keeps_fp8_where_it_runs_and_dequantizes_on_cpu(tmp_path, monkeypatch):
    """EngineConfig.fp8: 'auto' dequantizes on the CPU (the exact path); where the FP8 kernels run (here: a device
    said to have them) it keeps the e4m3 weights and their scales; the greedy tokens are the same either way."""
    from dsv3.engine import llm as llm_module

    path, greedy = fp8_checkpoint(tmp_path), dsv3.SamplingParams(max_tokens=8, temperature=0)
    prompts = [[5, 9, 200, 31], [7, 7, 1000]]
    dequantized = dsv3.LLM(path, max_num_seqs=4)
    experts = dequantized.model.model.layers[1].mlp.experts.gate_up_proj
    assert experts.dtype == torch.float32 and dequantized.model.config.quant is None
    monkeypatch.setattr(llm_module, "keeps_fp8", lambda choice, device: choice != "dequantize")
    kept = dsv3.LLM(path, max_num_seqs=4)
    assert kept.model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert kept.model.model.layers[1].self_attn.kv_b_proj.weight.dtype == torch.float8_e4m3fn
    assert kept.model.config.quant is not None
    assert [o.token_ids for o in kept.generate(prompts, greedy)] == \
        [o.token_ids for o in dequantized.generate(prompts, greedy)]
    assert dsv3.LLM(path, fp8="dequantize", max_num_seqs=4).model.config.quant is None


def test_fp8_auto_keeps_only_where_fp8_kernels_run():
    from dsv3.engine.llm import keeps_fp8

    assert not keeps_fp8("auto", torch.device("cpu"))
    assert keeps_fp8("keep", torch.device("cpu")) and not keeps_fp8("dequantize", torch.device("cpu"))


def test_engine_config_rejects_what_it_does_not_know():
    from dsv3.engine.config import EngineConfig

    with pytest.raises(TypeError, match="max_num_seq.*EngineConfig has"):
        EngineConfig.of(max_num_seq=4)
    with pytest.raises(ValueError, match="fp8 must be one of auto, keep, dequantize"):
        EngineConfig(fp8="yes")
    assert EngineConfig.of(dtype=torch.bfloat16).dtype == "bfloat16"
    with pytest.raises(ValueError, match="cuda_graph_max_tokens cannot be negative"):
        EngineConfig(cuda_graph_max_tokens=-1)


def test_graph_sizes_follow_cuda_graph_max_tokens():
    """The graphs captured for prefilling steps stop at the option (or at the largest size below it); above 2,048
    rows the sizes are at most 25% apart, since a compute-bound step pays for its padding rows."""
    from dsv3.engine.runner import GRAPH_BATCH_SIZES, graph_sizes

    assert graph_sizes(256, 0) == list(GRAPH_BATCH_SIZES)
    assert graph_sizes(256, 2048)[-1] == 2048 and graph_sizes(256, 8192)[-1] == 8192
    assert graph_sizes(256, 5000)[-1] == 4096 and graph_sizes(64, 0)[-1] == 64
    big = [b for b in graph_sizes(256, 8192) if b >= 2048]
    assert all(b / a <= 1.25 for a, b in zip(big, big[1:]))
