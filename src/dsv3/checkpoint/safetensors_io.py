"""A checkpoint directory on disk: one `model.safetensors`, or shards named by `model.safetensors.index.json`.

Reading goes file by file through safetensors' memory-mapped `safe_open`, so only the slices a
caller asks for are ever copied out. Writing is atomic per file (temp file + os.replace), so an
interrupted save never leaves a half-written shard under its final name.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the tensor or file at fault."""


def listing(names: Iterable[str], limit: int = 5) -> str:
    """'a, b, c and 7 more': enough names to find the problem without flooding the terminal."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class CheckpointFiles:
    """The tensor names of a checkpoint directory and the file that holds each."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file_of: dict[str, Path] = {}
        self.keys_in: dict[Path, list[str]] = {}
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                names = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e})") from None
            if not isinstance(names, dict):
                raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
            for key, name in names.items():
                # A bare file name: the index must not send the loader to ../../etc/passwd or /dev/zero.
                if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                    raise CheckpointError(f"{index}: {key} is said to be in {name!r}, which is not a file name "
                                          f"inside {self.path}")
            self.file_of = {key: self.path / name for key, name in names.items()}
            absent = {f.name for f in self.file_of.values() if not f.exists()}
            if absent:
                raise CheckpointError(f"{index} names files that do not exist in {self.path}: {listing(absent)}")
        elif (self.path / SINGLE_FILE).exists():
            single = self.path / SINGLE_FILE
            with self.open(single) as f:
                self.file_of = {key: single for key in f.keys()}
        else:
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.path}")
        # Files in the order the index lists them: the order DeepSeek's shards are numbered.
        self.files = list(dict.fromkeys(self.file_of.values()))
        for key, file in self.file_of.items():  # the index is what says which file holds a tensor
            self.keys_in.setdefault(file, []).append(key)

    @property
    def keys(self) -> set[str]:
        return set(self.file_of)

    @contextmanager
    def open(self, file: Path) -> Iterator:
        """safe_open, with safetensors' errors (truncated or corrupt file) re-raised naming the file; a
        tensor the index puts in this file that the file does not hold is an error too, not a tensor skipped."""
        try:
            with safe_open(file, framework="pt") as handle:
                absent = set(self.keys_in.get(file, ())) - set(handle.keys())
                if absent:
                    raise CheckpointError(f"{INDEX_FILE} puts {len(absent)} tensor(s) in {file.name} that it does "
                                          f"not hold: {listing(absent)}")
                yield handle
        except SafetensorError as e:
            raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None

    def read(self, key: str, region: tuple[slice, ...], handle, file: Path) -> torch.Tensor:
        """Part of tensor `key`: through `handle` when `file` holds it, else from its own file (an FP8
        scale stored in another shard than its weight)."""
        if self.file_of[key] == file:
            return handle.get_slice(key)[region]
        with self.open(self.file_of[key]) as other:
            return other.get_slice(key)[region]

    def shape(self, key: str, handle, file: Path) -> tuple[int, ...]:
        if self.file_of[key] == file:
            return tuple(handle.get_slice(key).get_shape())
        with self.open(self.file_of[key]) as other:
            return tuple(other.get_slice(key).get_shape())


def progress_bar(total: int | None, desc: str, enabled: bool, unit: str = "tensor") -> tqdm:
    """A bar on a terminal only: logs of batch jobs stay clean."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                disable=not enabled or not sys.stderr.isatty())


def write_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Atomic save: written beside the target, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_text(directory / INDEX_FILE, json.dumps(index, indent=2) + "\n")


def write_shards(directory: Path, groups: Iterable[dict[str, torch.Tensor]], max_shard_bytes: int,
                 progress: bool = True) -> None:
    """Write groups of tensors (a weight and its scale stay together) into shards of at most
    max_shard_bytes (a larger group gets a shard of its own). Groups are consumed lazily and each
    shard is written as soon as it is full, so about one shard is in memory at a time.

    One shard is `model.safetensors`; more are `model-0000i-of-0000n.safetensors` with an index.
    """
    directory.mkdir(parents=True, exist_ok=True)
    parts: list[Path] = []  # shards written under temporary names until their count is known
    weight_map: dict[int, list[str]] = {}
    total = 0
    current: dict[str, torch.Tensor] = {}
    size = 0
    bar = progress_bar(None, "saving", progress, unit="B")

    def flush() -> None:
        part = directory / f"model-part{len(parts):05d}.safetensors"
        write_file(part, current)
        weight_map[len(parts)] = list(current)
        parts.append(part)

    for group in groups:
        group = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in group.items()}
        # Data plus its entry in the file's JSON header (name, dtype, shape, offsets: under 160 + name bytes).
        nbytes = sum(t.numel() * t.element_size() + 160 + len(k) for k, t in group.items())
        if current and size + nbytes > max_shard_bytes:
            flush()
            current, size = {}, 0
        current.update(group)
        size += nbytes
        total += nbytes
        bar.update(nbytes)
    if current or not parts:
        flush()
    total -= sum(160 + len(k) for keys in weight_map.values() for k in keys)  # the index counts data bytes only
    bar.close()

    stale = {directory / SINGLE_FILE, directory / INDEX_FILE} | set(directory.glob("model-*-of-*.safetensors"))
    if len(parts) == 1:
        final = {0: directory / SINGLE_FILE}
    else:
        final = {i: directory / f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))}
    for i, part in enumerate(parts):
        os.replace(part, final[i])
    if len(parts) > 1:
        write_index(directory, {k: final[i].name for i, keys in weight_map.items() for k in keys}, total)
    # Files of an earlier save that this one did not replace would be read in place of the new ones.
    for path in stale - set(final.values()) - ({directory / INDEX_FILE} if len(parts) > 1 else set()):
        path.unlink(missing_ok=True)
