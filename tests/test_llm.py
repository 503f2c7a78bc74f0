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
