"""Load a Hugging Face DeepSeek-V3 checkpoint into the model, streaming one file at a time.

The model is built with uninitialised (torch.empty) weights directly on the target device, then
every checkpoint tensor this rank needs is sliced out of its memory-mapped file and copied into
place. Host memory therefore peaks near one shard, never two copies of the model.

FP8 checkpoints: by default every FP8 weight is dequantized (exactly, in float32) to the model's
dtype while it is read, and the model is built without quantization. keep_fp8=True keeps the e4m3
weights and their block scales instead (half the memory; the FP8 GEMM path runs on them). Dequantizing
is the default because it is the one choice that works everywhere: on CPU the FP8 path is only the
reference, which dequantizes on every call.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from dsv3.checkpoint.layout import FP8, SCALE, Route, mtp_keys, plan_load
from dsv3.checkpoint.safetensors_io import CheckpointError, CheckpointFiles, progress_bar
from dsv3.config import ModelConfig
from dsv3.default_model import default_model_path
from dsv3.kernels.reference import block_length, fp8_dequantize
from dsv3.model import DeepseekV3ForCausalLM, DeepseekV3ForSequenceClassification
from dsv3.parallel import SINGLE, Parallel

FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
ARCHITECTURES = {cls.__name__: cls for cls in (DeepseekV3ForCausalLM, DeepseekV3ForSequenceClassification)}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def model_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A model dtype given as a floating-point torch.dtype or by its name in DTYPES; None stays None."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} (or a floating-point torch.dtype)")
    return DTYPES[dtype]


def load_model(path: str | Path | None, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
               par: Parallel = SINGLE, keep_fp8: bool = False, progress: bool = True,
               architecture: str | type[nn.Module] | None = None) -> nn.Module:
    """The model of a checkpoint directory, weights loaded, in eval mode.

    path: None is the embedded default model. dtype: a torch.dtype or its name ("bfloat16", ...); None
    takes config.json's torch_dtype. device: None is the CPU. keep_fp8: keep an FP8
    checkpoint's weights and scales as they are (default: dequantize exactly to dtype). architecture:
    a class or its name; None takes config.json's `architectures` (causal LM when it names neither).
    Checkpoints without any MTP tensor (transformers' save_pretrained drops them) load without MTP.
    """
    path = default_model_path() if path is None else path
    dtype = model_dtype(dtype)
    cfg = ModelConfig.from_file(path)
    files = CheckpointFiles(path)
    arch = resolve_architecture(architecture, cfg)
    if not keep_fp8:
        cfg.quant = None
    dtype = dtype or config_dtype(cfg)
    cfg.torch_dtype = str(dtype).removeprefix("torch.")
    no_mtp = not mtp_keys(files.keys, cfg.num_hidden_layers)
    if arch is DeepseekV3ForCausalLM and cfg.num_nextn_predict_layers and no_mtp:
        warnings.warn(f"{path} holds no MTP weights although its config has num_nextn_predict_layers="
                      f"{cfg.num_nextn_predict_layers}; loading the model without MTP", stacklevel=2)
        cfg.num_nextn_predict_layers = 0
    with torch.device(device or "cpu"):
        model = arch(cfg, par=par, dtype=dtype)
    load_state_into(model, files, progress)
    return model.eval()


def resolve_architecture(architecture: str | type[nn.Module] | None, cfg: ModelConfig) -> type[nn.Module]:
    if isinstance(architecture, type):
        return architecture
    name = architecture or next((a for a in cfg.architectures or [] if a in ARCHITECTURES), "DeepseekV3ForCausalLM")
    if name not in ARCHITECTURES:
        raise CheckpointError(f"architecture {name!r} is not one dsv3 builds: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def config_dtype(cfg: ModelConfig) -> torch.dtype:
    dtype = getattr(torch, cfg.torch_dtype or "bfloat16", None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"config.json torch_dtype={cfg.torch_dtype!r} is not a floating-point torch dtype")
    return dtype


def load_state_into(model: nn.Module, path: str | Path | CheckpointFiles, progress: bool = True) -> None:
    """Fill every tensor of `model` (built for this rank, with its slices marked by `shard`) from a
    checkpoint directory. Raises CheckpointError on a missing, unexpected or misshapen tensor."""
    files = path if isinstance(path, CheckpointFiles) else CheckpointFiles(path)
    routes = plan_load(model, files.keys)
    bar = progress_bar(len(routes), "loading", progress)
    with torch.no_grad():
        for file in files.files:
            with files.open(file) as handle:
                for key in files.keys_in[file]:
                    if key not in routes:
                        continue  # skipped: another rank's expert, an MTP copy, a scale read with its weight
                    for route in routes[key]:
                        route.dest[route.at].copy_(read(files, key, route, handle, file))
                    bar.update()
    bar.close()


def read(files: CheckpointFiles, key: str, route: Route, handle, file: Path) -> torch.Tensor:
    """This rank's part of checkpoint tensor `key`, dequantized when the file holds FP8 and the model does not."""
    view = handle.get_slice(key)
    found = tuple(view.get_shape())
    if found != route.shape:
        raise CheckpointError(f"{key}: expected {route.shape} found {found} (in {file.name})")
    accepted = stored_dtypes(key, route.dest.dtype)
    if view.get_dtype() not in accepted:
        raise CheckpointError(f"{key}: dtype {view.get_dtype()} in {file.name}, expected {' or '.join(accepted)}")
    if view.get_dtype() != "F8_E4M3" or route.dest.dtype == FP8:
        return view[route.source]
    if key + SCALE not in files.file_of:
        raise CheckpointError(f"{key} is FP8 but the checkpoint has no {key + SCALE} to dequantize it")
    return dequantized(files, key, route, handle, file)


def stored_dtypes(key: str, dest: torch.dtype) -> tuple[str, ...]:
    """The safetensors dtypes a tensor may be stored in: any float is cast to the model's dtype exactly enough,
    an e4m3 weight is dequantized with its scale; integers are never weights, and an FP8 tensor the model keeps
    must be e4m3 already (casting a wider float to it would need a scale the file does not have)."""
    if dest == FP8:
        return ("F8_E4M3",)
    if key.endswith(SCALE):
        return FLOAT_DTYPES + ("F8_E8M0",)
    return FLOAT_DTYPES + ("F8_E4M3",)


def dequantized(files: CheckpointFiles, key: str, route: Route, handle, file: Path) -> torch.Tensor:
    """Dequantize a slice: widen it to whole scale blocks, dequantize exactly, then trim. A slice of a
    tensor-parallel rank may start or end inside a block."""
    shape, scale_shape = route.shape, files.shape(key + SCALE, handle, file)
    if len(scale_shape) != len(shape) or scale_shape[:-2] != shape[:-2]:
        raise CheckpointError(f"{key + SCALE}: shape {scale_shape} does not fit weight {shape}")
    wide, blocks, trim = list(route.source), list(route.source), []
    for d in (len(shape) - 2, len(shape) - 1):
        block = block_length(shape[d], scale_shape[d])
        if -(-shape[d] // block) != scale_shape[d]:
            raise CheckpointError(f"{key + SCALE}: {scale_shape[d]} blocks cannot cover {shape[d]} along dim {d}")
        start, stop, _ = route.source[d].indices(shape[d])
        first, end = start // block, -(-stop // block)
        wide[d], blocks[d] = slice(first * block, min(end * block, shape[d])), slice(first, end)
        trim.append(slice(start - first * block, stop - first * block))
    device = route.dest.device
    weight = handle.get_slice(key)[tuple(wide)].to(device)
    scale = files.read(key + SCALE, tuple(blocks), handle, file).to(device)
    return fp8_dequantize(weight, scale, route.dest.dtype)[..., trim[0], trim[1]]
