"""How checkpoint tensor names map onto the model's tensors, in both directions.

The model already uses Hugging Face names. The differences this module knows:
- routed experts are packed in the model (experts.gate_up_proj (E, 2I, D), experts.down_proj (E, D, I));
  files hold them per expert (DeepSeek, transformers v4) or packed the same way (transformers v5);
- an FP8 weight `X` comes with a float32 `X_scale_inv`, one scale per block of its last two dims;
- DeepSeek's files repeat the embedding and LM head inside each MTP layer (embed_tokens,
  shared_head.head); the model shares the main ones;
- parallel ranks hold a slice: a tensor's `shard` attribute says which (dsv3.parallel.Shard).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from dsv3.checkpoint.safetensors_io import CheckpointError, listing
from dsv3.kernels.reference import block_length

FP8 = torch.float8_e4m3fn
SCALE = "_scale_inv"
PACKED = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)(_scale_inv)?")
LAYER = re.compile(r"model\.layers\.(\d+)\.(.*)")
MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


@dataclass
class Route:
    """Where one checkpoint tensor goes: the part `source` of it is copied into dest[at]."""
    name: str                       # the model tensor, for messages
    dest: torch.Tensor
    shape: tuple[int, ...]          # the whole checkpoint tensor's expected shape
    source: tuple[slice, ...]       # the part this rank reads
    at: tuple = ()                  # where in dest: all of it, or one expert's gate or up rows


def cut(dest: torch.Tensor, at: tuple = ()) -> tuple[tuple[int, ...], tuple[slice, ...]]:
    """The whole checkpoint shape and the slice this rank reads, from dest's `shard` attribute.
    `at` indexes leading dims of dest (one expert), which the checkpoint tensor does not have."""
    local = list(dest[at].shape)
    source = [slice(None)] * len(local)
    shard = getattr(dest, "shard", None)
    if shard is not None and shard.count > 1:
        dim = shard.dim - sum(isinstance(a, int) for a in at)  # an int index removes a dim, a slice keeps it
        if dim < 0:  # split over experts: the caller already picked this rank's experts
            return tuple(local), tuple(source)
        source[dim] = slice(shard.index * local[dim], (shard.index + 1) * local[dim])
        local[dim] *= shard.count
    return tuple(local), tuple(source)


def check_scale_alignment(name: str, scale: torch.Tensor, weight: torch.Tensor) -> None:
    """A kept FP8 scale must cover exactly this rank's rows/cols: the weight slice must start and end on
    block edges, or the blocks straddle two ranks and this rank's scales would be wrong."""
    shard = getattr(scale, "shard", None)
    if shard is None or shard.count == 1 or shard.dim < weight.dim() - 2:
        return
    block = scale.block[shard.dim - (weight.dim() - 2)]
    if weight.shape[shard.dim] % block:
        raise CheckpointError(f"{name}: this rank's slice ({weight.shape[shard.dim]} along dim {shard.dim}) is not a "
                              f"multiple of the FP8 block {block}, so the scales cannot be split; load with "
                              "keep_fp8=False to dequantize")


def expert_routes(name: str, dest: torch.Tensor, weight: torch.Tensor) -> tuple[dict, set[str]]:
    """Routes from per-expert tensors into a packed one; also the keys of other ranks' experts (skipped)."""
    prefix, kind, suffix = PACKED.fullmatch(name).groups()
    suffix = suffix or ""
    shard = getattr(dest, "shard", None)
    n_local = dest.shape[0]
    split_by_expert = shard is not None and shard.dim == 0  # expert parallel; else each rank has every expert
    first, total = (shard.index * n_local, n_local * shard.count) if split_by_expert else (0, n_local)
    if suffix and kind == "gate_up_proj":
        inter, block = weight.shape[1] // 2, block_length(weight.shape[1], dest.shape[1])
        if inter % block:
            raise CheckpointError(f"{name}: moe_intermediate_size={inter} is not a multiple of the FP8 block {block}, "
                                  "so per-expert gate and up scales cannot be packed; load with keep_fp8=False")
    parts = (("gate_proj", 0), ("up_proj", 1)) if kind == "gate_up_proj" else (("down_proj", None),)
    rows = dest.shape[1] // 2  # gate rows, then up rows
    routes, others = defaultdict(list), set()
    for e in range(total):
        for proj, half in parts:
            key = f"{prefix}.{e}.{proj}.weight{suffix}"
            if not first <= e < first + n_local:
                others |= {key, key + SCALE}
                continue
            at = (e - first,) if half is None else (e - first, slice(half * rows, (half + 1) * rows))
            routes[key].append(Route(name, dest, *cut(dest, at), at))
    return routes, others


def plan_load(model: nn.Module, keys: set[str]) -> dict[str, list[Route]]:
    """Routes for every checkpoint tensor the model needs. Raises on missing or unexpected tensors."""
    cfg = model.config
    state = model.state_dict(keep_vars=True)
    routes: dict[str, list[Route]] = defaultdict(list)
    skipped: set[str] = set()
    for name, dest in state.items():
        weight = state.get(name.removesuffix(SCALE))
        shard = getattr(dest, "shard", None)
        if PACKED.fullmatch(name) and name in keys and name.endswith("gate_up_proj") and shard and shard.dim == 1:
            raise CheckpointError(f"{name}: fused expert tensors cannot be split by the intermediate dim; "
                                  "use expert parallel (--experts ep, or DSV3_EXPERTS=ep) for this checkpoint")
        if PACKED.fullmatch(name) and name not in keys:
            more, others = expert_routes(name, dest, weight)
            for key, rs in more.items():
                routes[key] += rs
            skipped |= others
            continue
        if name.endswith(SCALE):
            check_scale_alignment(name, dest, weight)
        key = name
        if name == "lm_head.weight" and name not in keys and cfg.tie_word_embeddings:
            key = "model.embed_tokens.weight"
        routes[key].append(Route(name, dest, *cut(dest)))
    consumed = {key + SCALE for key, rs in routes.items() if rs[0].dest.dtype != FP8 and key + SCALE in keys}
    missing = routes.keys() - keys
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s) the model needs: {listing(missing)}")
    held = len(model.model.layers)
    unexpected = {k for k in keys - routes.keys() - skipped - consumed if not ignored(k, cfg.num_hidden_layers, held)}
    if unexpected:
        raise CheckpointError(f"checkpoint holds {len(unexpected)} tensor(s) the model does not: {listing(unexpected)}")
    return routes


def ignored(key: str, n_main: int, n_held: int) -> bool:
    """Tensors a checkpoint may carry that the model rebuilds or shares: rotary tables of old files, the
    MTP layers' copies of the embedding and head, and MTP layers the model was built without."""
    if key.endswith("rotary_emb.inv_freq"):
        return True
    m = LAYER.fullmatch(key)
    return m is not None and (int(m[1]) >= n_held or (int(m[1]) >= n_main and m[2] in MTP_COPIES))


def mtp_keys(keys: set[str], n_main: int) -> set[str]:
    """The checkpoint's tensors of MTP layers (layer index >= num_hidden_layers)."""
    return {k for k in keys if (m := LAYER.fullmatch(k)) and int(m[1]) >= n_main}


def checkpoint_tensors(model: nn.Module, fused_experts: bool = False
                       ) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor | None]]:
    """(model name, checkpoint key, weight, its FP8 scale or None) for every tensor to save: packed
    experts split per expert unless fused_experts, and DeepSeek's MTP copies of embedding and head."""
    for param in model.parameters():
        shard = getattr(param, "shard", None)
        if shard is not None and shard.count > 1:
            raise CheckpointError("save_checkpoint writes whole tensors; this model holds one rank's slices")
    state = model.state_dict()
    for name, tensor in state.items():
        if name.endswith(SCALE):
            continue
        scale = state.get(name + SCALE)
        m = PACKED.fullmatch(name)
        if m is None or fused_experts:
            yield name, name, tensor, scale
            continue
        prefix, kind, _ = m.groups()
        if kind == "gate_up_proj" and scale is not None:
            inter = tensor.shape[1] // 2
            if inter % block_length(tensor.shape[1], scale.shape[1]):
                raise CheckpointError(f"{name}: moe_intermediate_size={inter} is not a multiple of the FP8 block, so "
                                      "the packed scales cannot be split per expert; save with fused_experts=True")
        for e in range(tensor.shape[0]):
            if kind == "down_proj":
                yield name, f"{prefix}.{e}.down_proj.weight", tensor[e], None if scale is None else scale[e]
                continue
            scales = (None, None) if scale is None else scale[e].chunk(2)
            for proj, w, s in zip(("gate_proj", "up_proj"), tensor[e].chunk(2), scales):
                yield name, f"{prefix}.{e}.{proj}.weight", w, s
    n_main = model.config.num_hidden_layers
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    for layer in range(n_main, len(model.model.layers)):
        yield embed, f"model.layers.{layer}.embed_tokens.weight", state[embed], None
        yield head, f"model.layers.{layer}.shared_head.head.weight", state[head], None
