"""``lorakit check-adapter DIR --model M``: the checks a server runs before an adapter serves
(adapter_cache.py: files, shapes, finite values, mixed-batch support, serve parity), from the command
line, so a broken adapter is found before it is deployed."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LoraError
from lorakit.io import read_adapter
from lorakit.io.fingerprint import FINGERPRINT_KEY
from lorakit.models import LoadedModel
from lorakit.serve.server import build_server
from lorakit.serve.settings import ServeSettings


def check_folder(folder: str | Path, model: str, loaded: LoadedModel | None = None) -> dict:
    """A report of the adapter in ``folder`` on base ``model``; LoraError naming the failed check."""
    folder = Path(folder)
    cfg, tensors, meta = read_adapter(folder)             # pickles and damaged files refused here
    server = build_server(ServeSettings(model=model, adapters=[folder], max_loaded=1), loaded)
    names = server.adapters.names()
    if len(names) != 1:
        raise LoraError(f"{folder} should hold exactly one adapter (adapter_config.json), found {names}")
    entry = server.adapters.ensure_resident(names[0])
    return {"adapter": str(folder), "base": model, "kind": entry.kind, "r": cfg.r, "alpha": cfg.alpha,
            "targets": cfg.target_modules, "tensors": len(tensors),
            "parameters": sum(t.numel() for t in tensors.values()),
            "fingerprint": FINGERPRINT_KEY in meta, "parity": entry.parity,
            "mixed_batches": entry.kind == "lm", "labels": entry.labels,
            "load_seconds": round(entry.load_seconds or 0.0, 3)}
