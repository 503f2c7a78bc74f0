"""Training checkpoints that a killed run can never leave half-written.

A checkpoint is a folder checkpoints/step-NNNNNNNN holding state.pt (model, optimizer, data position, RNG
states, step). It is written under a temporary name, every file and the folder fsync'ed, then renamed into
place; a rename is atomic, so a folder with a final name is always complete and anything else (a
leftover .tmp-* from a killed run) is ignored by resume and cleaned up by the next save.

state.pt is read with torch.load(weights_only=True): tensors and plain data only (which is all a checkpoint
holds, the RNG states included), so a crafted file cannot run code when a run is resumed.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import torch

from dsv3.checkpoint.safetensors_io import CheckpointError

STATE_FILE = "state.pt"
_FINAL = re.compile(r"step-(\d{8})")


class DamagedCheckpoint(CheckpointError):
    """A state.pt that cannot be read back (cut short by a full disk or a copy): an older checkpoint may do."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _FINAL.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint_atomic(root: str | Path, step: int, state: dict, keep: int) -> Path:
    """Write state as checkpoint `step` under root; keep the newest `keep` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # what a killed save left behind
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}"
    tmp.mkdir()
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. after a resume): move the old one aside first
        old = root / f".tmp-old-{final.name}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def load_checkpoint_state(path: str | Path) -> dict:
    file = Path(path) / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler met a class or function (e.g. a __reduce__ that calls os.system): never run it.
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line),
                      "the weights-only unpickler stopped")
        raise CheckpointError(f"{file}: refused, it holds Python objects other than tensors and plain data, which "
                              f"loading could run as code ({reason})") from None
    except (RuntimeError, EOFError) as e:
        reason = str(e).split("\n")[0] or type(e).__name__  # torch's first line says what failed; the rest is advice
        raise DamagedCheckpoint(f"{file}: unreadable, truncated or damaged ({reason})") from None


def load_latest_state(root: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint under root that reads back, and its state; None when there is none. A damaged
    newer one is passed over with a warning naming it; when every one is damaged, DamagedCheckpoint."""
    damaged = []
    for path in reversed(checkpoint_dirs(root)):
        try:
            state = load_checkpoint_state(path)
        except DamagedCheckpoint as e:
            damaged.append(str(e))
            continue
        if damaged:
            warnings.warn(f"{'; '.join(damaged)}: resuming from the newest intact checkpoint, {path}", stacklevel=2)
        return path, state
    if damaged:
        raise DamagedCheckpoint(f"no checkpoint under {root} can be read back: {'; '.join(damaged)}")
    return None


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
