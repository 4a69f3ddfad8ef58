"""Safe file helpers: atomic writes, paths kept inside the folder a user named, no pickles."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from safetensors import SafetensorError, safe_open

from lorakit.errors import LoraError
from lorakit.io.names import PICKLE_SUFFIXES, WEIGHTS_NAME


def atomic_write(target: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` for a temp path beside ``target`` (``.tmp-<name>-<pid>``), fsync what it
    wrote (a file, or every file of a folder), rename it over ``target``, then fsync the parent folder.
    After a crash at any moment ``target`` is the old version or the whole new one, never a mix, and the
    rename survives a power cut; a leftover ``.tmp-*`` is what readers must ignore. Returns ``target``.
    Replacing an existing *folder* removes the old one just before the rename (os.replace cannot move
    a folder over a non-empty one), so readers must accept a moment with neither (checkpoints do)."""
    target = Path(target)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    _remove(tmp)
    try:
        write(str(tmp))
        for path in ([tmp] if tmp.is_file() else sorted(p for p in tmp.rglob("*") if p.is_file())):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if tmp.is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        _remove(tmp)
    return target


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def inside(root: str | os.PathLike, name: str | os.PathLike) -> Path:
    """``root / name``, refused when it would land outside ``root``: an absolute ``name``, a ``..``
    part, or a symlink already there that points elsewhere (a reused --out). Nothing is written."""
    root_path, relative = Path(root), Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise LoraError(f"{str(name)!r} would be written outside the output folder {root_path}; use a "
                        "plain name inside it (no absolute path, no '..')")
    target = (root_path / relative).resolve()
    if not target.is_relative_to(root_path.resolve()):
        raise LoraError(f"{root_path / relative} resolves to {target}, outside the output folder "
                        f"{root_path} (a symlink?); remove it or pick another output folder")
    return root_path / relative


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file under ``path``: what an adapter (or a saved model) costs on disk."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def adapter_dir(path: Path) -> Path:
    """The adapter folder ``path`` names (a folder, or its weights file), refusing pickles unopened."""
    if path.suffix in PICKLE_SUFFIXES:
        raise LoraError(pickle_refusal(path))
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if not path.is_dir():
        raise LoraError(f"adapter folder {path} does not exist")
    if not (path / WEIGHTS_NAME).is_file():
        full = full_model_refusal(path)
        if full:
            raise LoraError(full)
        pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise LoraError(pickle_refusal(pickles[0]))
        raise LoraError(f"{path} has no {WEIGHTS_NAME}; found {sorted(p.name for p in path.iterdir())}")
    return path


FULL_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")


def full_model_refusal(path: Path) -> str | None:
    """What to say when ``path`` holds a whole model (a Trainer checkpoint or save_pretrained of a
    model without lorakit.hf), not an adapter; None when it does not."""
    found = [name for name in FULL_MODEL_FILES if (path / name).is_file()]
    if not found:
        return None
    lora_keys = False
    if (path / "model.safetensors").is_file():
        try:                                  # the header only: names, never the tensors or a pickle
            with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
                lora_keys = any(".lora." in key for key in handle.keys())
        except (SafetensorError, OSError):
            pass
    advice = ("Its LoRA factors sit under lorakit's own keys ('...lora.default.A'), which "
              "from_pretrained drops: rebuild the model with apply_lora(model, the same config), "
              "model.load_state_dict(safetensors.torch.load_file(path + '/model.safetensors'), "
              "strict=False), then save_adapter(model, dir)" if lora_keys else
              "Load it with transformers' AutoModel...from_pretrained(path)")
    return (f"{path} is a full-model checkpoint ({', '.join(found)}), not an adapter folder "
            f"({WEIGHTS_NAME} + adapter_config.json). {advice}. To make Trainer checkpoints and "
            "save_model hold the adapter, call lorakit.hf.prepare_for_trainer(model) before training")


def pickle_refusal(path: Path) -> str:
    return (f"{path} is a pickle file; lorakit never unpickles files (they can run code). If you trust "
            f"it, convert it once: python -c \"import torch; from safetensors.torch import save_file; "
            f"save_file(torch.load('{path}', weights_only=True), '{path.with_suffix('.safetensors')}')\" "
            f"and name the result {WEIGHTS_NAME}")


def json_lines(path: str | os.PathLike, example: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON Lines file; a line that is not JSON,
    or not a JSON object, is refused naming ``file:line`` (``example`` shows what a line should hold)."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LoraError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); "
                                f"a .jsonl file holds one JSON object per line, like {example}") from None
            if not isinstance(record, dict):
                raise LoraError(f"{path}:{number}: a JSON {type(record).__name__}, not an object; "
                                f"each line must be one record like {example}")
            yield number, record
