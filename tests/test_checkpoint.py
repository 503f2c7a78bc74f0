"""Checkpoints: transformers' and DeepSeek's layouts load to the same model, FP8 dequantizes exactly,
saves round-trip bit for bit, and every broken checkpoint fails naming the tensor or file."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager

import pytest
import torch
from helpers import make_dsv3_checkpoint, make_hf_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv3.checkpoint.safetensors_io as sio
from dsv3.checkpoint import CheckpointError, convert_fp8_to_bf16, load_model, save_checkpoint
from dsv3.kernels.reference import fp8_dequantize, fp8_quantize
from dsv3.parallel import Parallel

IDS = torch.randint(3, 256, (2, 13), generator=torch.Generator().manual_seed(0))
BLOCK16 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
# Dims that are not multiples of the 16x16 block: partial edge blocks (kv_a_proj_with_mqa is 56 x 72).
ODD = dict(hidden_size=72, q_lora_rank=40, kv_lora_rank=40, qk_nope_head_dim=24, v_head_dim=20,
           intermediate_size=120, quantization_config=BLOCK16)


def load(path, **kw):
    return load_model(path, progress=False, **kw)


def tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out |= load_file(file)
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (FP8 has no CPU equality kernel; bytes compare every dtype)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert same(a[key], b[key]), key


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    err = ((a - b).norm() / b.norm()).item()
    print(f"relative error {err:.2e}")
    return err


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf"))


def test_hf_checkpoint_matches_transformers_and_drops_missing_mtp(hf):
    path, hf_model = hf
    with pytest.warns(UserWarning, match="no MTP weights"):
        model = load(path)
    assert model.config.num_nextn_predict_layers == 0 and not model.mtp_layers
    with torch.no_grad():
        assert rel_err(model(IDS), hf_model(IDS).logits) < 1e-4


def test_fused_expert_keys_load_like_per_expert_keys(hf, tmp_path):
    path, hf_model = hf
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(path / "config.json", fused)
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, fused / "model.safetensors")
    assert "model.layers.1.mlp.experts.gate_up_proj" in tensors(fused)
    with pytest.warns(UserWarning):
        assert_same(load(fused).state_dict(), load(path).state_dict())


def test_tied_embeddings_fill_the_head(tmp_path):
    path, hf_model = make_hf_checkpoint(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in tensors(path)
    with pytest.warns(UserWarning):
        model = load(path)
    assert same(model.lm_head.weight, model.model.embed_tokens.weight)
    with torch.no_grad():
        assert rel_err(model(IDS), hf_model(IDS).logits) < 1e-4


def test_sequence_classification(tmp_path):
    path, hf_model = make_hf_checkpoint(tmp_path, "DeepseekV3ForSequenceClassification", pad_token_id=2, num_labels=3)
    model = load(path)
    assert type(model).__name__ == "DeepseekV3ForSequenceClassification"
    ids = IDS.clone()
    ids[0, -4:] = 2  # right padding: pooled at the last real token
    with torch.no_grad():
        assert rel_err(model(ids), hf_model(ids).logits) < 1e-4


@contextmanager
def recorded_opens(monkeypatch):
    """Every safe_open call, and the most files open at once."""
    opened, state = [], {"open": 0, "most": 0}
    real = sio.safe_open

    @contextmanager
    def recording(file, **kw):
        opened.append(file.name)
        state["open"] += 1
        state["most"] = max(state["most"], state["open"])
        with real(file, **kw) as handle:
            yield handle
        state["open"] -= 1

    monkeypatch.setattr(sio, "safe_open", recording)
    yield opened, state


def test_sharded_save_respects_max_bytes_and_loads_one_file_at_a_time(tmp_path, monkeypatch):
    model = load(make_dsv3_checkpoint(tmp_path))
    out = tmp_path / "sharded"
    save_checkpoint(model, None, out, max_shard_bytes=100_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and not (out / "model.safetensors").exists()
    total = 0
    for name in files:
        with safe_open(out / name, "pt") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(sizes) <= 100_000 or len(sizes) == 1, name
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    with recorded_opens(monkeypatch) as (opened, state):
        loaded = load(out)
    assert sorted(opened) == files and state["most"] == 1  # each shard once, never two at a time
    assert_same(loaded.state_dict(), model.state_dict())


def test_fp8_dequantize_partial_edge_blocks():
    w = torch.randn(56, 72) * torch.logspace(-2, 2, 56)[:, None]  # scales differ from block to block
    q, s = fp8_quantize(w, (16, 16))
    assert s.shape == (4, 5)
    expanded = s.repeat_interleave(16, 0)[:56].repeat_interleave(16, 1)[:, :72]
    assert torch.equal(fp8_dequantize(q, s, torch.float32), q.float() * expanded)


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_load_dequantizes_exactly_and_keep_fp8_agrees(tmp_path, scale_fmt):
    quant = {**BLOCK16, "scale_fmt": scale_fmt} if scale_fmt else BLOCK16
    path = make_dsv3_checkpoint(tmp_path, fp8=True, **{**ODD, "quantization_config": quant})
    stored = tensors(path)
    assert stored["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (4, 5)
    if scale_fmt:
        scales = torch.cat([t.flatten() for k, t in stored.items() if k.endswith("_scale_inv")])
        assert torch.equal(scales.log2(), scales.log2().round())
    model = load(path)
    assert model.config.quant is None
    resaved = tmp_path / "dequantized"
    save_checkpoint(model, None, resaved, progress=False)
    dequantized = tensors(resaved)
    for key, t in stored.items():
        if key.endswith("_scale_inv"):
            assert key not in dequantized
        elif key + "_scale_inv" in stored:
            assert torch.equal(dequantized[key], fp8_dequantize(t, stored[key + "_scale_inv"], torch.float32)), key
        else:
            assert same(dequantized[key], t), key
    kept = load(path, keep_fp8=True)
    assert kept.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert kept.config.quant.scale_fmt == scale_fmt
    with torch.no_grad():
        assert torch.equal(kept(IDS), model(IDS))
        # Absorbed decode dequantizes an FP8 kv_b_proj once, and again only when its weight or scales change.
        attn = kept.model.layers[1].self_attn
        w_uk, _ = attn.absorbed_weights()
        assert attn.absorbed_weights()[0].data_ptr() == w_uk.data_ptr()
        attn.kv_b_proj.weight_scale_inv.mul_(2)
        assert torch.equal(attn.absorbed_weights()[0].float(), 2 * w_uk.float())


def test_keep_fp8_refuses_expert_scales_it_cannot_pack(tmp_path):
    path = make_dsv3_checkpoint(tmp_path, fp8=True, moe_intermediate_size=24, quantization_config=BLOCK16)
    with pytest.raises(CheckpointError, match="moe_intermediate_size=24"):
        load(path, keep_fp8=True)
    load(path)  # dequantizing needs no packing of scales


@pytest.mark.parametrize("fp8", [False, True])
def test_round_trip_is_exact_with_mtp_in_deepseek_layout(tmp_path, fp8):
    extra = {"quantization_config": BLOCK16} if fp8 else {}
    path = make_dsv3_checkpoint(tmp_path, fp8=fp8, dtype=torch.bfloat16, **extra)
    stored = tensors(path)
    for key in ("embed_tokens.weight", "shared_head.head.weight", "eh_proj.weight", "mlp.experts.7.up_proj.weight"):
        assert f"model.layers.3.{key}" in stored
    model = load(path, keep_fp8=fp8)
    assert len(model.mtp_layers) == 1
    with torch.no_grad():
        assert model.mtp_forward(IDS).shape == (2, 12, 256)
    out = tmp_path / "again"
    save_checkpoint(model, None, out, progress=False)
    assert_same(tensors(out), stored)  # save(load(checkpoint)) == checkpoint
    assert_same(load(out, keep_fp8=fp8).state_dict(), model.state_dict())  # load(save(model)) == model


def test_tensor_and_expert_parallel_slices(tmp_path):
    for name, dims, keep in (("odd", ODD, False), ("aligned", {"quantization_config": BLOCK16}, True)):
        path = make_dsv3_checkpoint(tmp_path, fp8=True, name=name, **dims)
        full = load(path, keep_fp8=keep).state_dict()
        for rank in (0, 1):
            part = load(path, keep_fp8=keep, par=Parallel(tp_rank=rank, tp_size=2, ep_rank=rank, ep_size=2))
            for key, local in part.state_dict(keep_vars=True).items():
                shard, whole = getattr(local, "shard", None), full[key]
                if shard is not None:
                    whole = whole.narrow(shard.dim, shard.index * local.shape[shard.dim], local.shape[shard.dim])
                assert same(local.detach(), whole), key
    # kv_b_proj of ODD has 176 rows: 88 per rank is not a whole number of 16-row blocks.
    with pytest.raises(CheckpointError, match="kv_b_proj.weight_scale_inv.*keep_fp8=False"):
        load(tmp_path / "odd", keep_fp8=True, par=Parallel(tp_rank=1, tp_size=2, ep_rank=1, ep_size=2))


def test_convert_fp8_to_bf16(tmp_path):
    fp8 = tmp_path / "fp8"
    source = make_dsv3_checkpoint(tmp_path, fp8=True, dtype=torch.bfloat16, **ODD)
    save_checkpoint(load(source, keep_fp8=True), None, fp8, max_shard_bytes=60_000, progress=False)
    (fp8 / "tokenizer.json").write_text("{}")
    out = tmp_path / "bf16"
    convert_fp8_to_bf16(fp8, out, progress=False)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "tokenizer.json").read_text() == "{}"
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert weight_map.keys() == tensors(out).keys() and not any(k.endswith("_scale_inv") for k in weight_map)
    assert all(t.dtype == torch.bfloat16 for k, t in tensors(out).items() if "bias" not in k)
    assert_same(load(out).state_dict(), load(fp8, dtype=torch.bfloat16).state_dict())


def rewrite(path, edit) -> None:
    stored = tensors(path)
    edit(stored)
    save_file(stored, path / "model.safetensors")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.0.self_attn.q_a_proj.weight"), "lacks 1 tensor.*layers.0.self_attn.q_a_proj.weight"),
    (lambda t: t.pop("model.layers.3.eh_proj.weight"), "lacks 1 tensor.*layers.3.eh_proj.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}), "does not.*self_attn.extra.weight"),
    (lambda t: t.update({"model.layers.2.self_attn.kv_b_proj.weight": torch.zeros(200, 32)}),
     r"model.layers.2.self_attn.kv_b_proj.weight: expected \(224, 32\) found \(200, 32\)"),
    (lambda t: t.update({"lm_head.weight": t["lm_head.weight"].to(torch.int32)}),
     "lm_head.weight: dtype I32 in model.safetensors, expected F32 or BF16"),
])
def test_broken_checkpoint_names_the_tensor(tmp_path, edit, message):
    path = make_dsv3_checkpoint(tmp_path)
    rewrite(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load(path)


def test_truncated_file_and_missing_shard_name_the_file(tmp_path):
    path = make_dsv3_checkpoint(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable"):
        load(path)
    sharded = tmp_path / "sharded"
    save_checkpoint(load(make_dsv3_checkpoint(tmp_path, name="whole")), None, sharded, max_shard_bytes=100_000,
                    progress=False)
    second = sorted(sharded.glob("model-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(CheckpointError, match=f"names files that do not exist.*{second.name}"):
        load(sharded)


def sharded_checkpoint(tmp_path, name="sharded"):
    path = tmp_path / name
    save_checkpoint(load(make_dsv3_checkpoint(tmp_path, name=f"{name}-whole")), None, path, max_shard_bytes=100_000,
                    progress=False)
    return path, json.loads((path / "model.safetensors.index.json").read_text())


def test_tensor_missing_from_its_shard_is_an_error(tmp_path):
    path, index = sharded_checkpoint(tmp_path)
    shard = path / index["weight_map"]["lm_head.weight"]
    stored = load_file(shard)
    del stored["lm_head.weight"]                          # the index still names it
    save_file(stored, shard)
    with pytest.raises(CheckpointError, match=f"puts 1 tensor.* in {shard.name} that it does not hold: lm_head.weight"):
        load(path)


@pytest.mark.parametrize("outside", ["../other/model.safetensors", "/etc/passwd", "..", ""])
def test_index_may_not_name_files_outside_the_checkpoint(tmp_path, outside):
    path, index = sharded_checkpoint(tmp_path)
    make_dsv3_checkpoint(tmp_path, name="other", seed=1)   # a valid file beside it, which the index must not reach
    index["weight_map"]["lm_head.weight"] = outside
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"lm_head.weight is said to be in '{outside}', which is not a file name"):
        load(path)


def test_shards_stay_under_the_limit_header_included(tmp_path):
    import dsv3
    from dsv3.checkpoint import save_checkpoint

    model = dsv3.load_model(make_dsv3_checkpoint(tmp_path / "a"), dtype=torch.float32, progress=False)
    limit = 100_000
    save_checkpoint(model, None, tmp_path / "b", max_shard_bytes=limit, progress=False)
    shards = sorted((tmp_path / "b").glob("model-*.safetensors"))
    assert len(shards) > 1
    too_big = [p.stat().st_size for p in shards if p.stat().st_size > limit]
    # a single tensor group larger than the limit gets a shard of its own; none here is
    assert not too_big
