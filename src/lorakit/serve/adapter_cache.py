"""The adapter library behind the server: every adapter under the ``--adapters`` folders is servable,
at most ``max_loaded`` are resident on the model, the least recently used one is evicted to make room
and loaded again when a request names it (LoRAX's policy; S-LoRA, Sheng et al. 2023).

A load is checked before the adapter can serve a token, and a refused load changes nothing:
    files      safetensors only (pickles refused unopened), a readable config, paths inside the folders
    shapes     every factor fits this base (``io.load_adapter`` names both shapes otherwise)
    values     every tensor finite
    servable   plain LoRA on linear layers, which the gathered mixed-batch matmul computes
    parity     the probe outputs recorded when the adapter was saved (``io/fingerprint.py``) are
               reproduced through the serving path, within tolerance

Language-model adapters are loaded on the base and mixed per batch row; adapters that carry a
sequence-classification head (``modules_to_save`` classifier/score) go to a classification copy of
the base (``classify.py``) and answer ``/v1/classify``. Everything here runs on the scheduler thread,
except the registry reads (``names``, ``describe``), which take the lock.
"""

from __future__ import annotations

import json
import re
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapters import delete_adapter, set_adapter, set_row_adapters
from lorakit.errors import LoraError
from lorakit.inject import activate
from lorakit.io import load_adapter, read_adapter, read_metadata
from lorakit.io.fingerprint import FINGERPRINT_KEY, compare, probe_output
from lorakit.io.names import CONFIG_NAME, WEIGHTS_NAME
from lorakit.serve.classify import ClassifierPool, head_size, label_names
from lorakit.serve.metrics import ServeMetrics
from lorakit.serve.security import adapter_path, discover

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,127}$")


class UnknownAdapter(LoraError):
    pass


class AdapterBusy(LoraError):
    """Every resident adapter is in use: the request waits until one is free."""


@dataclass
class Adapter:
    name: str
    path: Path
    kind: str                        # "lm" (mixed in the decoding batch) or "classify"
    signature: tuple                 # (mtime_ns, size) of its two files: a change means reload
    hot: bool = False                # added by /v1/load_lora_adapter
    key: str | None = None           # its name on the model while resident
    pins: int = 0                    # active requests using it
    error: str | None = None         # why its last load was refused
    parity: str = "not loaded yet"
    removed: bool = False            # unloaded while in use: evicted when the last request ends
    labels: list[str] | None = None
    load_seconds: float | None = None


def _signature(folder: Path) -> tuple:
    try:
        stats = [(folder / n).stat() for n in (CONFIG_NAME, WEIGHTS_NAME)]
    except OSError:
        return ()
    return tuple((s.st_mtime_ns, s.st_size) for s in stats)


def _delete(model, key: str) -> None:
    """Remove an adapter from a model; the server keeps no adapter active, so the "no adapter left"
    and "active adapter changed" notes that delete_adapter gives an interactive user do not apply."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        delete_adapter(model, key)


def _kind(folder: Path) -> str:
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return "lm"                  # the load will say what is wrong
    heads = raw.get("modules_to_save") if isinstance(raw, dict) else None
    task = raw.get("task_type") if isinstance(raw, dict) else None
    return "classify" if heads or task in ("SEQ_CLS", "TOKEN_CLS") else "lm"


def base_mismatch(folder: Path, model) -> str | None:
    """The first module whose base shape the adapter recorded at save (``base_shapes`` in lorakit's
    safetensors metadata) that ``model`` lacks or shapes differently, described; None when every
    recorded shape fits, nothing was recorded, or the header cannot be read (the load will say why).
    Reads the header only, so it is cheap enough to explain a refused request."""
    if model is None:
        return None
    try:
        meta = read_metadata(folder)
    except LoraError:
        return None
    shapes = meta.get("base_shapes")
    if not isinstance(shapes, dict):
        return None
    for path, shape in shapes.items():
        try:
            weight = model.get_submodule(path).weight
        except AttributeError:
            return f"it adapts {path!r}, which this base does not have"
        if isinstance(shape, list) and list(weight.shape) != shape:
            return f"it was saved for {path!r} of shape {tuple(shape)}, this base has {tuple(weight.shape)}"
    return None


class AdapterCache:
    def __init__(self, model, classifiers: ClassifierPool, roots: list[Path], max_loaded: int,
                 metrics: ServeMetrics, base_name: str):
        self.model, self.classifiers, self.roots = model, classifiers, list(roots)
        self.max_loaded, self.metrics, self.base_name = max_loaded, metrics, base_name
        self.lock = threading.Lock()
        self.entries: dict[str, Adapter] = {}
        self.hidden: set[str] = set()          # unloaded through the API: not rediscovered
        self.resident: OrderedDict[str, None] = OrderedDict()   # least recently used first
        self.generation = 0                    # bumped on every change to the model's adapters
        self._count = 0
        self._base_probe = None
        self.scan()

    # --- the registry ---------------------------------------------------------------------------
    def scan(self) -> None:
        """Pick up adapters added to (or removed from) the folders since the last look."""
        found = discover(self.roots)
        with self.lock:
            for name, (folder, _) in found.items():
                if name in self.hidden or name == self.base_name:
                    continue
                entry = self.entries.get(name)
                if entry is None or (not entry.hot and entry.path.resolve() != folder.resolve()):
                    if entry is None or (entry.key is None and not entry.pins):
                        self.entries[name] = Adapter(name, folder, _kind(folder), _signature(folder))
            for name, entry in list(self.entries.items()):
                if not entry.hot and name not in found and entry.key is None and not entry.pins:
                    del self.entries[name]

    def names(self) -> list[str]:
        with self.lock:
            return sorted(n for n, e in self.entries.items() if not e.removed)

    def get(self, name: str) -> Adapter:
        with self.lock:
            entry = self.entries.get(name)
        if entry is None or entry.removed:
            self.scan()
            with self.lock:
                entry = self.entries.get(name)
        if entry is None or entry.removed:
            raise UnknownAdapter(f"no model or adapter named {name!r}; GET /v1/models lists them")
        return entry

    def describe(self) -> list[dict]:
        with self.lock:
            return [{"id": e.name, "kind": e.kind, "resident": e.key is not None, "parity": e.parity,
                     "error": e.error, "path": str(e.path)}
                    for e in sorted(self.entries.values(), key=lambda e: e.name) if not e.removed]

    # --- residency ------------------------------------------------------------------------------
    def ensure_resident(self, name: str) -> Adapter:
        """Load ``name`` if it is not resident (evicting the least recently used free adapter);
        AdapterBusy when every resident adapter is in use; LoraError when its load is refused."""
        entry = self.get(name)
        if entry.key is not None:
            self.resident.move_to_end(name)
            return entry
        signature = _signature(entry.path)
        if entry.error is not None and signature == entry.signature:
            raise LoraError(entry.error)
        entry.signature = signature
        while len(self.resident) >= self.max_loaded:
            victim = next((n for n in self.resident if not self.entries[n].pins), None)
            if victim is None:
                raise AdapterBusy(f"all {self.max_loaded} resident adapters are in use")
            self._evict(victim)
            self.metrics.adapter_evictions.inc()
        self._load(entry)
        return entry

    def pin(self, name: str) -> None:
        self.entries[name].pins += 1

    def unpin(self, name: str) -> None:
        entry = self.entries.get(name)
        if entry is None:
            return
        entry.pins -= 1
        if entry.removed and entry.pins == 0:
            self._forget(entry)

    def _evict(self, name: str) -> None:
        entry = self.entries[name]
        model = self.model if entry.kind == "lm" else self.classifiers.model_for(entry.key)
        _delete(model, entry.key)
        if entry.kind == "classify":
            self.classifiers.forget(entry.key)
        entry.key = None
        self.resident.pop(name, None)
        self.generation += 1
        self.metrics.resident_adapters.set(len(self.resident))

    def _forget(self, entry: Adapter) -> None:
        if entry.key is not None:
            self._evict(entry.name)
        with self.lock:
            if self.entries.get(entry.name) is entry:
                del self.entries[entry.name]

    # --- hot loading (vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter) ----------------
    def register(self, name, path) -> Adapter:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise LoraError(f"lora_name {name!r} must be 1-128 characters: letters, digits and "
                            "._/:@+- (starting with a letter or digit)")
        if name == self.base_name:
            raise LoraError(f"lora_name {name!r} is the base model's name; pick another")
        folder = adapter_path(path, self.roots)
        with self.lock:
            existing = self.entries.get(name)
        if existing is not None and not existing.removed:
            if existing.path.resolve() != folder.resolve():
                raise LoraError(f"an adapter named {name!r} is already served from {existing.path}; "
                                "unload it first or pick another lora_name")
            existing.error = None if _signature(folder) != existing.signature else existing.error
            self.ensure_resident(name)
            return existing
        entry = Adapter(name, folder, _kind(folder), _signature(folder), hot=True)
        with self.lock:
            self.entries[name] = entry
            self.hidden.discard(name)
        try:
            self.ensure_resident(name)
        except AdapterBusy:
            return entry                # checked when a request first needs it
        except LoraError:
            with self.lock:
                del self.entries[name]
            raise
        return entry

    def unregister(self, name) -> None:
        entry = self.get(name) if isinstance(name, str) else None
        if entry is None:
            raise LoraError(f"lora_name must be a string, got {type(name).__name__}")
        with self.lock:
            self.hidden.add(name)
            entry.removed = True
        if entry.pins == 0:
            self._forget(entry)

    # --- loading and checking -------------------------------------------------------------------
    def _load(self, entry: Adapter) -> None:
        start = time.perf_counter()
        try:
            if entry.kind == "lm":
                self._load_lm(entry)
            else:
                self._load_classifier(entry)
        except LoraError as err:
            entry.error = f"adapter {entry.name!r} ({entry.path}) cannot be served: {err}"
            entry.parity = "refused"
            self.metrics.adapter_loads.labels("refused").inc()
            raise LoraError(entry.error) from None
        entry.error = None
        entry.load_seconds = time.perf_counter() - start
        self.resident[entry.name] = None
        self.generation += 1
        self.metrics.adapter_loads.labels("ok").inc()
        self.metrics.adapter_load_seconds.observe(entry.load_seconds)
        self.metrics.resident_adapters.set(len(self.resident))

    def _read_checked(self, entry: Adapter):
        cfg, tensors, meta = read_adapter(entry.path)
        bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
        if bad:
            raise LoraError(f"tensors {bad[:3]} hold NaN or infinite values; the adapter is damaged "
                            "(retrain it, or lower the learning rate if training diverged)")
        return cfg, tensors, meta

    def _new_key(self) -> str:
        self._count += 1
        return f"serve_{self._count}"

    def _load_lm(self, entry: Adapter) -> None:
        if self.model is None:
            raise LoraError(f"the base model {self.base_name} is not a causal language model, so it "
                            "serves classification adapters only")
        _, _, meta = self._read_checked(entry)
        key = self._new_key()
        set_row_adapters(self.model, None)
        load_adapter(self.model, entry.path, adapter_name=key)
        try:
            activate(self.model, [])                 # nothing active: each batch row picks its own
            set_row_adapters(self.model, [key])      # refuses what the mixed matmul cannot compute
            try:
                adapted = probe_output(self.model)
            finally:
                set_row_adapters(self.model, None)
            entry.parity = self._parity(meta, adapted, self._lm_base_probe(), head=False)
        except LoraError:
            _delete(self.model, key)
            self.generation += 1
            raise
        entry.key = key

    def _lm_base_probe(self):
        if self._base_probe is None:
            set_row_adapters(self.model, None)
            self._base_probe = probe_output(self.model)
        return self._base_probe

    def _load_classifier(self, entry: Adapter) -> None:
        cfg, tensors, meta = self._read_checked(entry)
        num_labels = head_size(cfg.modules_to_save, tensors)
        if num_labels is None:
            raise LoraError("it declares modules_to_save but carries no classifier/score head weights")
        key = self._new_key()
        model = self.classifiers.model_for_labels(num_labels, key)
        try:
            load_adapter(model, entry.path, adapter_name=key)
        except LoraError:
            self.classifiers.forget(key)
            raise
        try:
            set_adapter(model, [key])
            adapted = probe_output(model)
            activate(model, [])
            entry.parity = self._parity(meta, adapted, None, head=True)
        except LoraError:
            _delete(model, key)
            self.classifiers.forget(key)
            raise
        entry.labels = label_names(entry.path, num_labels)
        entry.key = key

    @staticmethod
    def _parity(meta: dict, adapted, base, head: bool) -> str:
        record = meta.get(FINGERPRINT_KEY)
        if not record:
            return "unchecked (no fingerprint recorded at save)"
        check = compare(record, adapted, base, head_adapter=head)
        if not check.ok:
            quant = meta.get("quantized_base")
            hint = (f"; it was trained on a {quant.get('scheme')}-quantized base (QLoRA): serve its "
                    "merge (lorakit merge quantizes the base as in training) or run it with lorakit "
                    "generate, which does the same") if isinstance(quant, dict) else ""
            raise LoraError(check.message + hint)
        return f"checked (max probe difference {check.error:.1e})"
