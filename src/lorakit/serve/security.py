"""What a client can reach: the API key check and the adapter folders.

Keys are compared with ``hmac.compare_digest``, whose time does not depend on where two strings first
differ, so a client cannot find the key one character at a time by timing refusals. Adapter paths
come from clients (``/v1/load_lora_adapter``), so a path is served only when, symlinks resolved, it
lies inside one of the folders given with ``--adapters``; pickle files are refused unopened
(``io.files.adapter_dir``).
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from lorakit.errors import LoraError
from lorakit.io.files import adapter_dir
from lorakit.io.names import PICKLE_SUFFIXES


def key_matches(header: str | None, api_key: str | None) -> bool:
    """``Authorization: Bearer KEY`` against the server's key (always True when none is set)."""
    if not api_key:
        return True
    given = (header or "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode(), api_key.encode())


def adapter_path(path: str, roots: list[Path]) -> Path:
    """The adapter folder ``path`` names, refused unless it resolves inside one of ``roots``.
    A relative path is read against each root in turn."""
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise LoraError(f"lora_path {path!r} must be a non-empty path string")
    given = Path(path)
    if ".." in given.parts:
        raise LoraError(f"lora_path {path!r} contains '..'; name a folder inside the served adapter "
                        f"folders {[str(r) for r in roots]} directly")
    if given.suffix in PICKLE_SUFFIXES:
        raise LoraError(f"lora_path {path!r} is a pickle file; lorakit never unpickles (pickles run "
                        "code when loaded); save the adapter as adapter_model.safetensors")
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        root = next((r for r in roots if resolved.is_relative_to(r.resolve())), None)
        if root is not None and resolved.exists():
            return adapter_dir(resolved)
    outside = given.is_absolute() and not any(given.resolve().is_relative_to(r.resolve()) for r in roots)
    if outside:
        raise LoraError(f"lora_path {path!r} is outside the served adapter folders "
                        f"{[str(r) for r in roots]}; only adapters inside them can be loaded "
                        "(start the server with another --adapters folder to serve others)")
    raise LoraError(f"lora_path {path!r}: no such adapter folder inside {[str(r) for r in roots]}")


def discover(roots: list[Path]) -> dict[str, tuple[Path, Path]]:
    """{name: (adapter folder, root)} for every folder holding adapter_config.json under ``roots``.

    The name is the folder's path below its root with a final ``adapter`` part dropped (``lorakit
    finetune --out runs/sql`` writes runs/sql/adapter, served as ``sql``). Symlinks leading outside a
    root and temporary ``.tmp-*`` folders are skipped."""
    found: dict[str, tuple[Path, Path]] = {}
    for root in roots:
        real_root = root.resolve()
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if "adapter_config.json" not in files:
                continue
            path = Path(folder)
            if not path.resolve().is_relative_to(real_root):
                continue
            parts = path.relative_to(root).parts
            if parts and parts[-1] == "adapter":
                parts = parts[:-1]
            name = "/".join(parts) or _root_name(real_root)
            if name in found and found[name][0].resolve() != path.resolve():
                name = f"{_root_name(real_root)}/{name}"
            found.setdefault(name, (path, root))
    return found


def _root_name(root: Path) -> str:
    return root.parent.name if root.name == "adapter" else root.name
