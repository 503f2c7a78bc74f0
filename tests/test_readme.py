"""The README's examples, run: every `dsv3 ...` command (in-process, tiny sizes appended: argparse keeps the last
value) and every Python block, on the embedded model. A command the test does not know fails it, so the README
cannot drift; what needs a GPU, several processes, the network or a running server is skipped by name."""

import glob
import gzip
import io
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3 import cli
from dsv3.default_model import default_model_path
from helpers import make_dsv3_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDERS = ("/path/to/DeepSeek-V3", "/path/to/checkpoint")
TINY = {  # appended to each command of the README: seconds on 2 cores
    "generate": ["--max-new-tokens", "4"], "chat": ["--max-new-tokens", "4"],
    "bench": ["--batch", "1", "2", "--prompt-len", "8", "--new-tokens", "3"], "convert": [],
    "train-tokenizer": ["--vocab-size", "512"],
    "train": ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--save-every", "1",
              "--warmup-steps", "1", "--no-progress"],
}
SKIPPED = {  # first word -> why
    "pip": "installs packages", "python": "the test suite itself", "torchrun": "several processes (GPUs)",
    "PYTHONPATH=src:bench": "GPU benchmark", "PYTHONPATH=src": "GPU benchmark", "bash": "GPU benchmark (one lease)",
}
SKIPPED_DSV3 = {"serve": "a long-running server (tests/test_serve_openai.py runs it)"}
SKIPPED_PYTHON = {"import openai": "needs a running `dsv3 serve` (tests/test_serve_openai.py drives one with openai)"}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def commands() -> list[list[str]]:
    """Each shell command of the README's bash blocks, split as the shell would (`&&`, `\\`, comments)."""
    found = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                found.append(words[:end])
                words = words[end + 1:]
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """What the README's commands expect in the current directory: prompts.txt, plays/*.txt, an FP8 DeepSeek-V3/."""
    work = tmp_path_factory.mktemp("readme")
    (work / "prompts.txt").write_text("ROMEO:\nJULIET:\n")
    (work / "plays").mkdir()
    source = Path(__file__).parent / "data" / "shakespeare" / "macbeth.txt.gz"
    (work / "plays" / "macbeth.txt").write_text(gzip.decompress(source.read_bytes()).decode()[:40000])
    make_dsv3_checkpoint(work, fp8=True, name="DeepSeek-V3")
    return work


@pytest.fixture
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return workdir


def as_run(words: list[str]) -> list[str]:
    """The README's argv for dsv3's main: placeholders -> the embedded model, globs expanded, tiny sizes."""
    argv = []
    for word in words[1:]:
        word = str(default_model_path()) if word in PLACEHOLDERS else word
        if word.startswith("bench/"):  # a path of the repository, as from its root
            word = str(README.parent / word)
        argv += sorted(glob.glob(word)) if "*" in word else [word]
    return argv + TINY[argv[0]]


@pytest.mark.parametrize("words", commands(), ids=" ".join)
def test_readme_command(words, in_workdir, monkeypatch, capsys):
    if words[0] != "dsv3":
        if words[0] not in SKIPPED:
            pytest.fail(f"README command {' '.join(words)!r} is neither run nor skipped by this test")
        pytest.skip(SKIPPED[words[0]])
    if words[1] in SKIPPED_DSV3:
        pytest.skip(SKIPPED_DSV3[words[1]])
    if words[1] not in TINY:
        pytest.fail(f"README command {' '.join(words)!r} is neither run nor skipped by this test")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hail!\n/exit\n"))
    assert cli.main(as_run(words)) == 0
    out = capsys.readouterr().out
    if words[1] == "generate":
        assert out.strip()


@pytest.mark.parametrize("code", blocks("python"), ids=lambda code: code.splitlines()[0])
def test_readme_python(code):
    for start, why in SKIPPED_PYTHON.items():
        if code.startswith(start):
            pytest.skip(why)
    for placeholder in PLACEHOLDERS:
        code = code.replace(f'"{placeholder}"', repr(str(default_model_path())))
    code = code.replace("max_tokens=32", "max_tokens=4")
    exec(compile(code, str(README), "exec"), {"dsv3": dsv3})  # later snippets continue the first's `import dsv3`
