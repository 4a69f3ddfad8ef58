"""Atomic training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder ``checkpoints/step-00000100/`` with
    trainable.safetensors   the parameters that train (adapter factors, heads, or all of them)
    state.pt                optimizer, scheduler, step, RNG states (torch, numpy, python), best so far;
                            tensors, numbers and strings only, read back with weights_only=True
    COMPLETE                written last
It is built under a temporary name, every file fsync'ed, then renamed into place
(``lorakit.io.atomic_write``), so a run killed at any moment leaves either a whole checkpoint or an
ignored ``.tmp-*`` folder, never half of one.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.errors import LoraError
from lorakit.io import atomic_write


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(cached)],
            "python": _python_state_to_list(random.getstate()),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_list(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def save_checkpoint(folder: Path, step: int, model: nn.Module, optimizer, scheduler,
                    extra: dict, keep: int = 2, weights: dict | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write checkpoint ``step``. ``weights`` / ``optimizer_state`` default to the model's trainable
    tensors and ``optimizer.state_dict()``; a sharded (FSDP) run passes the gathered full ones."""
    folder.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        tmp = Path(tmp)
        tmp.mkdir()
        save_file(trainable_state(model) if weights is None else weights,
                  str(tmp / "trainable.safetensors"))
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(),
                    "extra": extra,
                    "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state},
                   tmp / "state.pt")
        (tmp / "COMPLETE").write_text(str(step))

    final = atomic_write(folder / f"step-{step:08d}", write)
    for old in complete_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


BYTES_PER_TRAINABLE_BYTE = 4      # weights + two Adam moments on disk, with room to spare


def check_output_dir(out: Path, trainable_bytes: int = 0, copies: int = 2) -> None:
    """Refuse, before any training, an ``out`` that cannot be written or whose disk lacks room for
    ``copies`` checkpoints of about ``BYTES_PER_TRAINABLE_BYTE * trainable_bytes`` each. Creates
    nothing that stays: the write test removes its probe file."""
    existing = Path(out).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LoraError(f"--out {out}: {existing} is a file, not a folder; pick another --out")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lorakit-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise LoraError(f"--out {out}: cannot write in {existing} ({err.strerror}); pick a folder "
                        "you can write to, or fix its permissions") from None
    need = copies * BYTES_PER_TRAINABLE_BYTE * trainable_bytes
    free = shutil.disk_usage(existing).free
    if free < need:
        raise LoraError(f"--out {out}: {free / 2**20:.1f} MiB free on its disk, but {copies} "
                        f"checkpoints need about {need / 2**20:.1f} MiB; free some space, pick "
                        "another --out, or lower keep_checkpoints")


def complete_checkpoints(folder: Path) -> list[Path]:
    """Whole checkpoints, oldest first; temporary and unfinished folders are ignored."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, restore=None) -> dict:
    """Restore the trainable weights, optimizer, scheduler and RNG; return the saved state.
    ``restore(model, optimizer, weights, optimizer_state)`` replaces the copy for a sharded model."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    wrong = [n for n, t in weights.items() if n in params and tuple(t.shape) != tuple(params[n].shape)]
    if missing or wrong or any(n not in params for n in weights):
        raise LoraError(f"checkpoint {path} does not fit this model (missing {missing[:3]}, other "
                        f"shapes {wrong[:3]}); was it written by another task, method or config? "
                        "Use a fresh --out")
    state = torch.load(path / "state.pt", weights_only=True)
    if restore is not None:
        restore(model, optimizer, weights, state["optimizer"])
    else:
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
