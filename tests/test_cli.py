"""The command line, run in-process on the embedded default model (one LLM shared by the tests): usage errors,
chat commands and Ctrl-C, bench, and a reader that goes away."""

import io
import os
import signal
import subprocess
import sys

import pytest
import torch

import dsv3
from dsv3 import cli


@pytest.fixture(scope="module")
def shared_llm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield dsv3.LLM(max_num_seqs=8)
    torch.set_num_threads(threads)


@pytest.fixture
def llm(shared_llm, monkeypatch):
    """Every command of a test gets the shared LLM instead of loading the model again."""
    monkeypatch.setattr(cli, "build_llm", lambda args: shared_llm)
    yield shared_llm
    assert not shared_llm.engine.has_unfinished() and not shared_llm.engine.requests


def chat(monkeypatch, llm, stdin: str, *options: str) -> list[list[dict]]:
    """Run `dsv3 chat` on stdin; returns the conversation sent to the model at each turn."""
    sent, render = [], llm.chat_prompt
    monkeypatch.setattr(llm, "chat_prompt", lambda history: sent.append([dict(m) for m in history]) or render(history))
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert cli.main(["chat", "--temperature", "0", *options]) == 0
    return sent


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"dsv3 {dsv3.__version__}"


@pytest.mark.parametrize("argv, words", [
    (["generate", "hi", "--bogus"], "unrecognized arguments: --bogus"),
    (["generate"], "one of the arguments PROMPT --input-file is required"),
    (["generate", "hi", "--input-file", "f"], "not allowed with argument PROMPT"),
    (["bench", "--temperature", "0.5"], "unrecognized arguments: --temperature 0.5"),  # bench samples greedily
    (["convert", "a", "b"], "required: --fp8-to-bf16"),
])
def test_usage_errors_print_the_subcommands_usage_and_exit_2(capsys, argv, words):
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and words in err and f"usage: dsv3 {argv[0]}" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_torch_is_one_line(capsys):
    assert cli.main(["generate", "--device", "cuda", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("dsv3 generate: device cuda") and "no CUDA" in err


def test_chat_help_and_unknown_commands_are_not_sent_to_the_model(monkeypatch, llm, capsys):
    sent = chat(monkeypatch, llm, "/help\n/bogus word\nHail!\n/exit\n", "--max-new-tokens", "2")
    err = capsys.readouterr().err
    assert all(name in err for name in cli.CHAT_COMMANDS) and "unknown command /bogus" in err
    assert [[m["content"] for m in history] for history in sent] == [["Hail!"]]


def test_ctrl_c_stops_the_reply_only_and_keeps_what_was_printed(monkeypatch, llm, capsys):
    stream = llm.stream

    def interrupted_after_two_pieces(prompt, params):
        for i, piece in enumerate(stream(prompt, params)):
            if i == 2:
                os.kill(os.getpid(), signal.SIGINT)
            yield piece

    monkeypatch.setattr(llm, "stream", interrupted_after_two_pieces)
    try:
        sent = chat(monkeypatch, llm, "Hail!\nWho goes?\n/exit\n", "--max-new-tokens", "40")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during a reply ended the chat")
    out, err = capsys.readouterr()
    assert err.count("(reply stopped)") == 2 and len(sent) == 2
    first_reply = sent[1][1]
    assert first_reply["role"] == "assistant" and first_reply["content"] and first_reply["content"] in out
    assert len(llm.tokenizer.encode(first_reply["content"], add_special_tokens=False)) < 40


def test_bench_warms_up_and_reports_ms_per_step(llm, capsys):
    before = llm.engine.stats["prompt_tokens"]
    assert cli.main(["bench", "--batch", "1", "2", "--prompt-len", "8", "--new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["batch 1", "batch 2"]
    assert all("tokens/s" in line and "ms per step" in line for line in lines)
    assert llm.engine.stats["prompt_tokens"] - before == 2 * (1 + 2) * 8  # each batch once more, unmeasured


def test_a_reader_that_goes_away_ends_generate_quietly():
    """`dsv3 generate ... | head -1`: the pipe is closed before anything is printed."""
    done = subprocess.Popen([sys.executable, "-m", "dsv3", "generate", "--max-new-tokens", "4", "ROMEO:"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done.stdout.close()
    err = done.stderr.read()
    assert done.wait(timeout=120) == 1 and err == ""


def test_a_bad_kernel_setting_is_one_line():
    """DSV3_KERNELS is read once, at import: a bad value is still one line naming it, exit 2."""
    done = subprocess.run([sys.executable, "-m", "dsv3", "generate", "hi"], capture_output=True, text=True,
                          env={**os.environ, "DSV3_KERNELS": "fast"}, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "DSV3_KERNELS" in done.stderr
