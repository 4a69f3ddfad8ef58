"""Saving and loading the methods that have no PEFT format (bitfit, adapter-houlsby, adapter-lin, prefix).

    folder/adapter_config.json        {"lorakit_method": NAME, "spec": {r, head, extra},
                                       "base_shapes": {base parameter name: shape}}
    folder/adapter_model.safetensors  every tensor that trained, under the adapted model's state-dict
                                      names, e.g. "bert.encoder.layer.0.output.dense.adapter.up.weight",
                                      "bert.encoder.layer.0.output.dense.bias" (bitfit), "classifier.weight"

``base_shapes`` holds the shape of every base weight the method's own tensors are sized from (the
wrapped Linear of an adapter, the key/value projections of a prefix), so a load onto another base is
refused, naming the module and both shapes, before anything changes. Only safetensors and JSON are
read; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.errors import LoraError
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME, atomic_write
from lorakit.methods.spec import AdaptSpec


@dataclass
class MethodIO:
    """``model.method_io`` for one applied method: save / load (and merge where the method folds away).

    apply: the method's ``apply_X(model, spec)``; base_shapes: {base weight name: shape} the method's
    tensors are sized from, measured when it was applied; merge: None when the method cannot be
    folded into the weights (experiments/run.py then checks only the reload)."""

    method: str
    spec: AdaptSpec
    apply: Callable
    base_shapes: dict = field(default_factory=dict)
    merge: Callable | None = None

    def save(self, model: nn.Module, folder: str | os.PathLike) -> Path:
        tensors = {name: p.detach().contiguous().clone()
                   for name, p in model.named_parameters() if p.requires_grad}
        config = {"lorakit_method": self.method, "spec": _spec_fields(self.spec),
                  "base_shapes": {k: list(v) for k, v in self.base_shapes.items()}}
        return write_folder(folder, tensors, config)

    def load(self, base: nn.Module, folder: str | os.PathLike) -> nn.Module:
        return load_method(base, folder, self.method, self.apply)


def load_method(base: nn.Module, folder, method: str, apply: Callable) -> nn.Module:
    """Check the files against ``base``, then apply the method to it and copy the saved tensors in."""
    config, tensors = read_method_files(folder, method)
    spec = AdaptSpec(**config["spec"])
    params = dict(base.named_parameters())
    # Everything that can be checked on the untouched base is checked first.
    check_shapes(params, config["base_shapes"], folder)
    check_shapes(params, {k: v.shape for k, v in tensors.items() if k in params}, folder)
    model = apply(base, spec)
    found = model.method_io.base_shapes
    if sorted(found) != sorted(config["base_shapes"]):
        missing = sorted(set(config["base_shapes"]) - set(found))[:3]
        extra = sorted(set(found) - set(config["base_shapes"]))[:3]
        raise LoraError(f"{folder} was saved from a model with other {method} sites (saved only: "
                        f"{missing}, this base only: {extra}); load it onto the base it was trained on")
    load_trained(model, tensors, folder)
    return model


def load_trained(model: nn.Module, tensors: dict, folder) -> None:
    """Copy ``tensors`` into the model's trainable parameters; the two name sets must be equal."""
    own = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if sorted(own) != sorted(tensors):
        raise LoraError(f"{folder} holds tensors {sorted(set(tensors) - set(own))[:3]} the model lacks "
                        f"and lacks {sorted(set(own) - set(tensors))[:3]}; it was saved from another "
                        "model or method")
    check_shapes(own, {k: v.shape for k, v in tensors.items()}, folder)
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)


def check_shapes(params: dict, wanted: dict, folder) -> None:
    for name, shape in wanted.items():
        if name not in params:
            raise LoraError(f"{folder} needs the base module {name.rpartition('.')[0]!r} "
                            f"({name}, shape {list(shape)}), which this model does not have; "
                            "load it onto the base model it was trained on")
        if list(params[name].shape) != list(shape):
            raise LoraError(f"{folder} was saved for {name} of shape {list(shape)}, but this base's "
                            f"{name} has shape {list(params[name].shape)}; load it onto the base "
                            "model it was trained on")


def read_folder(folder, kind: str, check_config) -> tuple[dict, dict]:
    """An adapter folder's config (JSON) and tensors (safetensors), each with a clear error when
    missing or unreadable; ``check_config(config, path)`` refuses a config of the wrong kind."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise LoraError(f"{path} does not exist; {kind} folder holds {CONFIG_NAME} and "
                            f"{WEIGHTS_NAME}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise LoraError(f"{config_path} is not valid JSON ({err})") from None
    check_config(config if isinstance(config, dict) else {}, config_path)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise LoraError(f"{weights_path} is not a readable safetensors file ({err})") from None
    return config, tensors


def read_method_files(folder, method: str) -> tuple[dict, dict]:
    def check(config: dict, path: Path) -> None:
        if config.get("lorakit_method") != method:
            raise LoraError(f"{path} holds lorakit_method={config.get('lorakit_method')!r}, not "
                            f"{method!r}; load it with the method it was saved by")
    return read_folder(folder, f"a {method} adapter (written by model.method_io.save)", check)


def check_head(model: nn.Module, head: list[str]) -> None:
    """Every head name must be a module of the model (checked before a method changes anything)."""
    modules = dict(model.named_modules())
    unknown = [name for name in head if name not in modules]
    if unknown:
        raise LoraError(f"head module(s) {unknown} are not in the model; pass the names of the task "
                        f"head, e.g. one of {[n for n in modules if n and '.' not in n][:8]}")


def train_only(model: nn.Module, trainable, head: list[str]) -> None:
    """Freeze the model, then let ``trainable`` (parameters) and the head modules train."""
    check_head(model, head)
    model.requires_grad_(False)
    for param in trainable:
        param.requires_grad_(True)
    for name in head:
        model.get_submodule(name).requires_grad_(True)


def _spec_fields(spec) -> dict:
    fields = asdict(spec)
    return {"head": fields["head"], "r": fields["r"], "extra": fields["extra"]}


def write_folder(folder, tensors: dict, config: dict) -> Path:
    """An adapter folder: tensors (safetensors) and config (JSON), each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return folder
