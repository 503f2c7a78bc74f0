"""Training: data packing, the losses (CE, MTP, sequence-wise balance), the bias update, exact resume, atomic
checkpoints, the exported model (dsv3 and transformers), tokenizer training, the classifier head, and the
quality of the shipped default model on a play it never saw (The Tempest)."""

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3.checkpoint import CheckpointError
from dsv3.default_model import HERE as DEFAULT_MODEL
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.model.moe import sequence_balance_loss
from dsv3.tokenizer import DEEPSEEK_V3_CHAT_TEMPLATE, Tokenizer
from dsv3.train import checkpoints
from dsv3.train.balance import moe_layers, update_expert_bias
from dsv3.train.bpe import CHAT_TOKENS, train_tokenizer
from dsv3.train.classify import accuracy, classifier_from_lm, finetune_classifier, play_examples, split_examples
from dsv3.train.data import (BatchStream, PackedSequences, eval_batches, passages, read_documents, split_held_out,
                             tokenize_documents)
from dsv3.train.losses import CausalLMObjective, evaluate
from dsv3.train.trainer import TrainConfig, Trainer, model_config_for

DATA = Path(__file__).parent / "data" / "shakespeare"
PLAYS = [DATA / f"{p}.txt.gz" for p in ("tempest", "macbeth", "midsummer_nights_dream", "comedy_of_errors")]
TEST_PLAY, TRAIN_PLAYS = PLAYS[0], PLAYS[1:]
TINY = {"model_type": "deepseek_v3", "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
        "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_nextn_predict_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
        "v_head_dim": 8, "n_routed_experts": 8, "n_shared_experts": 1, "n_group": 4, "topk_group": 2,
        "num_experts_per_tok": 2, "routed_scaling_factor": 1.0, "max_position_embeddings": 128}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: one thread is fastest, and it does not spin against other processes on a small CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(DEFAULT_MODEL)


def tiny_config(**changes) -> TrainConfig:
    base = dict(steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=0, eval_batches=2,
                save_every=3, keep_checkpoints=5, log_every=1, progress=False, max_shard_mib=0.25)
    return TrainConfig(**{**base, **changes})


def tiny_model(tokenizer, seed=0) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(model_config_for(TINY, tokenizer), dtype=torch.float32)
    dsv3.model.init_weights(model, 0.02)
    return model.train()


# ---- data ----------------------------------------------------------------------------------------

def test_documents_are_packed_with_bos_and_eos(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("To be, or not to be")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "that is"}) + "\n\n" + json.dumps({"text": "the question"}))
    with gzip.open(tmp_path / "c.txt.gz", "wt") as f:
        f.write("Ay, there's the rub")
    docs = read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.txt.gz"])
    assert docs == ["To be, or not to be", "that is", "the question", "Ay, there's the rub"]
    stream = tokenize_documents(docs, tokenizer).tolist()
    assert stream.count(tokenizer.bos_token_id) == 4 and stream.count(tokenizer.eos_token_id) == 4
    assert stream[0] == tokenizer.bos_token_id and stream[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(stream, skip_special_tokens=True) == "".join(docs)

    # Passages: a BOS at every blank-line boundary past ~max_chars, EOS only at the document's end.
    play = read_documents([TEST_PLAY])[0]
    cut = tokenize_documents([play], tokenizer, passage_chars=1500).tolist()
    assert cut.count(tokenizer.bos_token_id) == len(passages(play, 1500)) > 50 and cut.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(cut, skip_special_tokens=True) == play

    packed = PackedSequences(torch.tensor(stream), seq_len=5)
    rows = packed.rows(torch.arange(len(packed)))
    assert rows.shape == (len(packed), 6)
    assert torch.equal(rows[:-1, -1], rows[1:, 0])                   # consecutive sequences share one token
    assert rows[:, :-1].flatten().tolist() == stream[: 5 * len(packed)]  # each token is an input once


def test_bad_data_is_reported(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*\"text\""):
        read_documents([tmp_path / "bad.jsonl"])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_documents([tmp_path / "missing.txt"])


def test_batch_order_is_seeded_split_and_resumable():
    data = PackedSequences(torch.arange(1000, dtype=torch.int32), seq_len=10)
    train, held = split_held_out(len(data), 0.1, seed=3)
    assert len(held) == 10 and not set(train.tolist()) & set(held.tolist())
    assert len(train) + len(held) == len(data)

    a, b = BatchStream(data, train, seed=1), BatchStream(data, train, seed=1)
    first = [a.next_batch(7) for _ in range(20)]                       # crosses two epochs
    assert all(torch.equal(x, y) for x, y in zip(first, (b.next_batch(7) for _ in range(20))))
    assert a.epoch == 1
    state = a.state_dict()
    later = [a.next_batch(7) for _ in range(5)]
    c = BatchStream(data, train, seed=1)
    c.load_state_dict(state)
    assert all(torch.equal(x, c.next_batch(7)) for x in later)
    assert not torch.equal(BatchStream(data, train, seed=2).next_batch(7), first[0])
    # Two ranks split each global batch: together they see what one rank of twice the batch sees.
    ranks = [BatchStream(data, train, seed=1, rank=r, world_size=2).next_batch(4) for r in (0, 1)]
    assert torch.equal(torch.cat(ranks), BatchStream(data, train, seed=1).next_batch(8))


# ---- losses --------------------------------------------------------------------------------------

def test_balance_loss_matches_hand_computation():
    torch.manual_seed(0)
    B, T, E, k = 2, 5, 6, 2
    scores = torch.rand(B, T, E)
    indices = torch.stack([torch.randperm(E)[:k] for _ in range(B * T)]).view(B, T, k)
    expected = 0.0
    for b in range(B):                     # V3 Eq. 17-20, one sequence at a time
        loss = 0.0
        for i in range(E):
            f_i = E / (k * T) * sum(int(i in indices[b, t].tolist()) for t in range(T))
            p_i = sum(float(scores[b, t, i] / scores[b, t].sum()) for t in range(T)) / T
            loss += f_i * p_i
        expected += loss / B
    assert sequence_balance_loss(scores, indices, k).item() == pytest.approx(expected, rel=1e-6)


def test_objective_sums_ce_mtp_and_balance(tokenizer):
    model = tiny_model(tokenizer)
    tokens = torch.randint(0, tokenizer.vocab_size, (3, 17))
    out = CausalLMObjective(model)(tokens, mtp_lambda=0.3, balance_alpha=0.01)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    ce = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten())
    # MTP depth 1 (Eq. 24) through the model's own mtp_forward: row i predicts token i+2.
    mtp = F.cross_entropy(model.mtp_forward(inputs).flatten(0, 1), labels[:, 1:].flatten())
    moes = moe_layers(model)
    assert len(moes) == 2 and all(m.balance_loss is not None for m in moes)   # main MoE layer + the MTP block's
    balance = sum(m.balance_loss for m in moes)
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["mtp"], mtp)
    torch.testing.assert_close(out["balance"], balance)
    torch.testing.assert_close(out["loss"], ce + 0.3 * mtp + 0.01 * balance)
    out["loss"].backward()
    assert model.mtp_layers[0].eh_proj.weight.grad.abs().sum() > 0       # the MTP module trains


# ---- the bias update -----------------------------------------------------------------------------

def test_bias_update_moves_toward_balance(tokenizer):
    model = tiny_model(tokenizer)
    moes = moe_layers(model)
    load = torch.tensor([40.0, 0.0, 10.0, 10.0, 10.0, 10.0, 5.0, 15.0])   # mean 12.5
    for m in moes:
        m.expert_load.copy_(load)
    ratio = update_expert_bias(moes, gamma=0.01)
    bias = moes[0].gate.e_score_correction_bias
    assert torch.equal(bias, 0.01 * torch.sign(12.5 - load))             # overloaded down, underloaded up
    assert bias[0] < 0 and bias[1] > 0
    assert all(m.expert_load.sum() == 0 for m in moes)                   # counts restart each step
    assert ratio.tolist() == pytest.approx([40 / 12.5] * 2)

    # Counted by the forward (k experts per token). A router that prefers experts 0 and 1 for most tokens is
    # evened out by repeated updates on the same hidden states.
    moe = moes[0]
    moe.gate.e_score_correction_bias.zero_()
    torch.manual_seed(1)
    lean = F.normalize(torch.randn(TINY["hidden_size"]), dim=0)
    hidden = 2 * lean + torch.randn(1, 256, TINY["hidden_size"])            # (1, T, D)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.3)
        moe.gate.weight[:2] = lean
    ratios = []
    for step in range(60):
        with torch.no_grad():
            moe(hidden)
        if step == 0:
            assert moe.expert_load.sum() == 256 * 2 and moe.expert_load.argsort()[-2:].sort().values.tolist() == [0, 1]
        ratios.append(update_expert_bias([moe], gamma=0.01)[0].item())
    assert ratios[0] > 2.5 and max(ratios[-20:]) < 2.0, ratios
    assert moe.gate.e_score_correction_bias[:2].max() < -0.1                 # the overloaded experts' bias fell


# ---- training runs -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer(TINY, TRAIN_PLAYS, out, tokenizer=DEFAULT_MODEL, eval_data=[TEST_PLAY],
                      config=tiny_config(steps=40, batch_size=8, seq_len=64, lr=1e-2, warmup_steps=4, eval_every=20,
                                         eval_batches=4, save_every=20, keep_checkpoints=1, log_every=5))
    before = trainer.evaluate()
    after = trainer.run()
    return out, trainer, before, after


def test_short_training_run_lowers_the_loss(trained):
    out, trainer, before, after = trained
    assert after["loss"] < before["loss"] - 1.0, (before, after)
    assert after["mtp1_loss"] < before["mtp1_loss"] - 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    for key in ("loss", "ce", "mtp", "balance", "tokens_per_s", "lr", "gamma", "mtp_lambda", "load_max_over_mean"):
        assert key in records[-1], key
    assert len(records[-1]["load_max_over_mean"]) == 2
    assert "eval_mtp1_acc" in records[-1] and "eval_ppl" in records[-1]
    assert records[0]["mtp_lambda"] == 0.3 and records[-1]["mtp_lambda"] == 0.1     # the lambda schedule
    assert records[0]["gamma"] == 0.001 and records[-1]["gamma"] == 0.0              # the gamma schedule
    assert {p.name for p in (out / "plots").iterdir()} == {"loss.png", "mtp_loss.png", "expert_load.png"}
    assert [p.name for p in checkpoints.checkpoint_dirs(out / "checkpoints")] == ["step-00000040"]
    assert any(m.gate.e_score_correction_bias.abs().sum() > 0 for m in moe_layers(trainer.model))


def test_exported_model_loads_in_dsv3_and_transformers(trained):
    transformers = pytest.importorskip("transformers")
    out, trainer, _, _ = trained
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and all(s.stat().st_size <= 0.25 * 2**20 + 2**14 for s in shards)  # + the JSON header
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 4096 and config["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()

    ids = torch.tensor([Tokenizer.from_dir(out).encode("Full fathom five thy father lies")])
    ours = dsv3.load_model(out, dtype=torch.float32, progress=False)
    expected = trainer.model.eval()(ids)
    torch.testing.assert_close(ours(ids), expected, atol=0.05, rtol=0.05)   # bf16 weights vs float32 training
    for cls in (transformers.AutoModelForCausalLM, transformers.DeepseekV3ForCausalLM):
        theirs = cls.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


def test_init_from_a_checkpoint(trained, tmp_path):
    out, _, _, after = trained
    tuned = Trainer(TINY, TRAIN_PLAYS, tmp_path, tokenizer=out, init_from=out, eval_data=[TEST_PLAY],
                    config=tiny_config(eval_batches=4, seq_len=64, batch_size=8))
    loaded = dsv3.load_model(out, dtype=torch.float32, progress=False).state_dict()
    mine = tuned.model.state_dict()
    assert all(torch.equal(mine[k], loaded[k]) for k in loaded)
    assert tuned.evaluate()["loss"] == pytest.approx(after["loss"], abs=0.05)    # the bf16 export, not a fresh init


def test_resume_is_bit_identical(tmp_path, tokenizer):
    cfg = tiny_config(grad_accum=2)
    whole = Trainer(TINY, TRAIN_PLAYS, tmp_path / "whole", tokenizer=DEFAULT_MODEL, config=cfg)
    whole.run()

    parted = tmp_path / "parted"
    Trainer(TINY, TRAIN_PLAYS, parted, tokenizer=DEFAULT_MODEL, config=cfg).run(stop_after=4)  # "killed" at step 4
    assert [p.name for p in checkpoints.checkpoint_dirs(parted / "checkpoints")] == ["step-00000003"]
    # A save killed half-way leaves only a temporary folder: resume must not trust it.
    half = parted / "checkpoints" / ".tmp-step-00000005"
    half.mkdir()
    (half / checkpoints.STATE_FILE).write_bytes(b"\x80\x04 truncated")
    resumed = Trainer(TINY, TRAIN_PLAYS, parted, config=cfg, resume=True)      # tokenizer: the copy in out/
    assert resumed.step == 3
    resumed.run()
    assert not half.exists()                                                   # cleaned by the next save

    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = lambda out: [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert steps(parted) == steps(tmp_path / "whole") == [1, 2, 3, 4, 5, 6]
    assert (parted / "metrics.jsonl").read_text().count('"step": 4,') == 1   # the lost step 4 is logged once


def test_cpu_runs_are_bit_identical_with_several_threads(tmp_path):
    """At 2 threads (torch's default on a 2-core machine), with enough routed tokens that the backward's work is
    split between the threads: two runs, and a run stopped and resumed, end bit-identical."""
    model = {**TINY, "n_routed_experts": 16, "num_experts_per_tok": 4}
    cfg = tiny_config(steps=4, save_every=2, seq_len=64)
    torch.set_num_threads(2)
    try:
        runs = []
        for name in ("a", "b"):
            runs.append(Trainer(model, TRAIN_PLAYS[:1], tmp_path / name, tokenizer=DEFAULT_MODEL, config=cfg))
            runs[-1].run()
        Trainer(model, TRAIN_PLAYS[:1], tmp_path / "c", tokenizer=DEFAULT_MODEL, config=cfg).run(stop_after=3)
        runs.append(Trainer(model, TRAIN_PLAYS[:1], tmp_path / "c", config=cfg, resume=True))
        assert runs[-1].step == 2
        runs[-1].run()
    finally:
        torch.set_num_threads(1)
    a, b, resumed = (r.model.state_dict() for r in runs)
    assert [n for n in a if not torch.equal(a[n], b[n])] == []
    assert [n for n in a if not torch.equal(a[n], resumed[n])] == []
    assert not torch.are_deterministic_algorithms_enabled()                  # the setting stays inside the steps


def test_ddp_under_torchrun_matches_one_process(tmp_path):
    """Two CPU ranks (gloo) with 2 sequences each train like one process with 4: gradients averaged by DDP,
    expert loads summed across ranks before the bias update."""
    if not torch.distributed.is_gloo_available():
        pytest.skip("gloo is not available")
    (tmp_path / "model.json").write_text(json.dumps(TINY))
    common = ["--model-config", str(tmp_path / "model.json"), "--data", str(TRAIN_PLAYS[0]), "--tokenizer",
              str(DEFAULT_MODEL), "--steps", "3", "--seq-len", "32", "--save-every", "3", "--eval-every", "0",
              "--no-progress", "--device", "cpu", "--bias-gamma", "0.01"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(dsv3.__file__).parents[1])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29500 + os.getpid() % 1000), "-m", "dsv3", "train", *common, "--batch-size", "2",
                          "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    from dsv3.cli import main

    assert main(["train", *common, "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    ddp, one = (checkpoints.load_checkpoint_state(tmp_path / name / "checkpoints" / "step-00000003")["model"]
                for name in ("ddp", "one"))
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], atol=1e-5, rtol=1e-4, msg=name)
    assert one["model.layers.1.mlp.gate.e_score_correction_bias"].abs().sum() > 0


def test_killed_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    checkpoints.save_checkpoint_atomic(root, 1, {"step": 1}, keep=3)

    def killed(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint_atomic(root, 2, {"step": 2}, keep=3)
    path, state = checkpoints.load_latest_state(root)
    assert path.name == "step-00000001" and state == {"step": 1}
    monkeypatch.undo()
    for step in range(2, 6):
        checkpoints.save_checkpoint_atomic(root, step, {"step": step}, keep=3)
    assert [p.name for p in root.iterdir()] and sorted(p.name for p in root.iterdir()) == [
        "step-00000003", "step-00000004", "step-00000005"]


class WritesMarker:
    """Unpickling this calls Path.write_text: what a crafted state.pt would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "code ran")


def test_resume_refuses_a_state_that_would_run_code(tmp_path):
    marker = tmp_path / "marker"
    crafted = tmp_path / "out" / "checkpoints" / "step-00000003"
    crafted.mkdir(parents=True)
    torch.save({"step": 3, "model": {}, "payload": WritesMarker(marker)}, crafted / checkpoints.STATE_FILE)
    with pytest.raises(CheckpointError, match=r"step-00000003/state.pt: refused.*could run as code"):
        Trainer(TINY, TRAIN_PLAYS[:1], tmp_path / "out", tokenizer=DEFAULT_MODEL, config=tiny_config(), resume=True)
    assert not marker.exists()


def test_resume_passes_over_a_damaged_checkpoint(tmp_path):
    cfg = tiny_config()
    Trainer(TINY, TRAIN_PLAYS[:1], tmp_path, tokenizer=DEFAULT_MODEL, config=cfg).run()
    root = tmp_path / "checkpoints"
    assert [p.name for p in checkpoints.checkpoint_dirs(root)] == ["step-00000003", "step-00000006"]
    newest = root / "step-00000006" / checkpoints.STATE_FILE
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])      # a disk that filled up
    with pytest.warns(UserWarning, match=r"step-00000006/state.pt: unreadable.*intact checkpoint.*step-00000003"):
        resumed = Trainer(TINY, TRAIN_PLAYS[:1], tmp_path, config=cfg, resume=True)
    assert resumed.step == 3
    (root / "step-00000003" / checkpoints.STATE_FILE).write_bytes(b"")
    with pytest.raises(checkpoints.DamagedCheckpoint, match="no checkpoint under .* can be read back"):
        Trainer(TINY, TRAIN_PLAYS[:1], tmp_path, config=cfg, resume=True)


def test_cli_train_and_train_tokenizer(tmp_path):
    from dsv3.cli import main

    assert main(["train-tokenizer", "--data", str(TRAIN_PLAYS[0]), "--vocab-size", "600", "--out",
                 str(tmp_path / "tok")]) == 0
    (tmp_path / "model.json").write_text(json.dumps(TINY))    # no vocab_size: it comes from the tokenizer
    assert main(["train", "--model-config", str(tmp_path / "model.json"), "--data", str(TRAIN_PLAYS[0]),
                 "--out", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok"), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--no-progress", "--eval-every", "0"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 600


def test_cli_names_a_corrupt_tokenizer_in_one_line(tmp_path, capsys):
    from dsv3.cli import main

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {')
    (tmp_path / "model.json").write_text(json.dumps(TINY))
    assert main(["train", "--model-config", str(tmp_path / "model.json"), "--data", str(TRAIN_PLAYS[0]),
                 "--out", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'tok' / 'tokenizer.json'}: not a valid tokenizer file" in err, err


def test_train_without_matplotlib(tmp_path, monkeypatch):
    """The CLI refuses before training (it draws the plots after the last step); the Trainer finishes the run,
    writes the model and warns instead of losing it."""
    from dsv3.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)           # import matplotlib -> ImportError
    (tmp_path / "model.json").write_text(json.dumps(TINY))
    with pytest.raises(SystemExit, match=r"dsv3 train needs matplotlib .*pip install 'dsv3\[train\]'"):
        main(["train", "--model-config", str(tmp_path / "model.json"), "--data", str(TRAIN_PLAYS[0]), "--out",
              str(tmp_path / "cli"), "--tokenizer", str(DEFAULT_MODEL), "--steps", "2", "--no-progress"])
    assert not (tmp_path / "cli").exists()
    trainer = Trainer(TINY, TRAIN_PLAYS[:1], tmp_path / "lib", tokenizer=DEFAULT_MODEL, config=tiny_config(steps=2))
    with pytest.warns(UserWarning, match=r"no plots drawn .*pip install 'dsv3\[train\]'"):
        final = trainer.run()
    assert "loss" in final and (tmp_path / "lib" / "config.json").is_file()


# ---- tokenizer training --------------------------------------------------------------------------

def test_trained_tokenizer_is_a_deepseek_tokenizer(tmp_path):
    tok = train_tokenizer(TRAIN_PLAYS[:1], 500, tmp_path)
    assert tok.vocab_size == 500
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    for token in CHAT_TOKENS:
        assert tok.backend.token_to_id(token) is not None
    text = "Is this a dagger which I see before me?\n<｜User｜>Hi<think>hmm</think>"
    ids = tok.encode(text)
    assert ids[0] == 0 and tok.decode(ids[1:]) == text
    assert tok.decode(ids, skip_special_tokens=True) == text                  # chat tokens are kept, BOS is not
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True) == \
        "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>"
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == DEEPSEEK_V3_CHAT_TEMPLATE
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf(text)["input_ids"] == ids
    assert hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)


# ---- the shipped default model -------------------------------------------------------------------

HELD_OUT_LOSS_MAX = 4.9   # nats/token on the first 16 x 256 tokens of The Tempest; the shipped model scores 4.62


@pytest.fixture(scope="module")
def default_model():
    return dsv3.load_model(DEFAULT_MODEL, dtype=torch.float32, progress=False)


def test_default_model_held_out_loss(default_model, tokenizer):
    held = PackedSequences(tokenize_documents(read_documents([TEST_PLAY]), tokenizer), seq_len=256)
    metrics = evaluate(default_model, eval_batches(held, torch.arange(16), 8), "cpu")
    assert metrics["loss"] < HELD_OUT_LOSS_MAX, metrics
    assert metrics["mtp1_acc"] > 0.1, metrics                               # the MTP module predicts t+2


def test_default_model_greedy_text_is_mostly_real_words(default_model, tokenizer):
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", " ".join(read_documents(PLAYS)))}
    generated = []
    for prompt in ("PROSPERO.\n", "MACBETH.\nIf it were done", "First Witch.\n"):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            for _ in range(40):
                ids = torch.cat([ids, default_model(ids)[:, -1:].argmax(-1)], 1)
        generated += re.findall(r"[A-Za-z]+", tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)[len(prompt):])
    share = sum(w.lower() in words for w in generated) / len(generated)
    assert len(generated) > 40 and share > 0.85, (share, generated)                 # the shipped model: 0.96


def test_classifier_head_trains_above_chance(tokenizer):
    examples = play_examples(PLAYS, tokenizer, max_tokens=48, per_play=200, seed=0)
    train, test = split_examples(examples, 0.25, seed=0)
    model = classifier_from_lm(DEFAULT_MODEL, num_labels=len(PLAYS), pad_token_id=tokenizer.pad_token_id)
    losses = finetune_classifier(model, train, steps=300, lr=3e-3)
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 0.3
    # Chance is 0.25. One speech says little about its play; the head alone reaches 0.41 on these 200 test speeches
    # (fine-tuning the backbone too: 0.57 on 283, bench/results/default_model/summary.json).
    assert accuracy(model, train) > 0.5
    assert accuracy(model, test) > 0.31


def test_classifier_names_the_files_without_speeches(tmp_path, tokenizer):
    play, poem, abbreviated = tmp_path / "play.txt", tmp_path / "poem.txt", tmp_path / "abbreviated.txt"
    play.write_text("GONZALO.\nHere is everything advantageous to life, and yet we have no means to live here.\n")
    poem.write_text("From fairest creatures we desire increase,\nThat thereby beauty's rose might never die,\n")
    abbreviated.write_text("Ham.\nTo be, or not to be, that is the question: whether 'tis nobler in the mind\n")
    with pytest.raises(ValueError, match=f"no speeches found in {poem}, {abbreviated}: a speech is a line naming"):
        play_examples([play, poem, abbreviated], tokenizer)
    assert play_examples([play], tokenizer).labels.tolist() == [0]
