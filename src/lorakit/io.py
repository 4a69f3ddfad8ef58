"""Adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys (adapter name dropped, as PEFT writes them):
    base_model.model.<path>.lora_A.weight / .lora_B.weight          Linear, Conv1D, Conv, fused
    base_model.model.<path>.lora_embedding_A / .lora_embedding_B    Embedding
    base_model.model.<path>.base_layer.bias                         trained bias of an adapted layer
    base_model.model.<path>.bias                                    trained bias elsewhere (bias="all")
    base_model.model.<head>.<param>                                 modules_to_save (e.g. classifier)
    base_model.model.<path>.lora_magnitude_vector                   DoRA's magnitude (use_dora=true)
A method that changed the frozen weight itself (PiSSA's residual, ReLoRA's merges) records the change on
the adapter as ``offset_B @ offset_A`` (W = W_original + s offset_B offset_A); the file then holds the whole
change against the *original* weight, [B, offset_B] [A; offset_A] at the same scale (PEFT's PiSSA
conversion), so it loads, in lorakit and PEFT, onto the untouched base model.
The safetensors metadata ``lorakit`` (JSON) records the base model's weight shape for every adapted
module and the fused-slice layouts, so loading onto the wrong base fails with both shapes named.

Loading checks everything (paths, config, keys, shapes) before it touches the model. Only safetensors
is read: a pickle (``.bin``/``.pt``) can run code when unpickled, so it is refused, never opened.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.inject import apply_lora, lora_layers, saved_module_wrappers
from lorakit.layers import LoraEmbedding, LoraFusedLinear, LoraLayer, wrap_module
from lorakit.state import check_adapter, has_lora, lora_state
from lorakit.targeting import module_kind

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# PEFT options that change what the adapter computes; loading one without them would be wrong.
UNSUPPORTED_PEFT_FIELDS = ("alora_invocation_tokens", "layer_replication", "trainable_token_indices",
                           "target_parameters", "use_qalora", "use_bdlora", "megatron_config")
_LORA_KEY = re.compile(r"^(?P<path>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                       r"lora_embedding_B|base_layer\.bias|lora_magnitude_vector)$")


# --- saving -----------------------------------------------------------------------------------------
def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (what ``save_adapter`` writes)."""
    cfg = check_adapter(model, adapter_name).configs[adapter_name]
    out = {}
    for path, layer in lora_layers(model):
        if adapter_name not in layer.lora:
            continue
        delta = layer.lora[adapter_name]
        a, b = ("lora_embedding_A", "lora_embedding_B") if isinstance(layer, LoraEmbedding) else \
            ("lora_A.weight", "lora_B.weight")
        out[f"{path}.{a}"], out[f"{path}.{b}"] = _export_factors(delta)
        if getattr(delta, "magnitude", None) is not None:
            out[f"{path}.lora_magnitude_vector"] = delta.magnitude
        if cfg.bias == "lora_only" and layer.bias is not None:
            out[f"{path}.base_layer.bias"] = layer.bias
    if cfg.bias == "all":
        out.update(_all_biases(model))
    for path, wrapper in saved_module_wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for pname, p in wrapper.modules_to_save[adapter_name].named_parameters():
                out[f"{path}.{pname}"] = p
    return {PREFIX + k: v.detach().contiguous().clone() for k, v in out.items()}


def _export_factors(delta) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as saved: with a recorded weight offset, [A; offset_A] (r+k, in) and [B, offset_B] (out, r+k)."""
    if getattr(delta, "offset_A", None) is None:
        return delta.A, delta.B
    return torch.cat([delta.A, delta.offset_A]), torch.cat([delta.B, delta.offset_B], dim=1)


def _export_config(model: nn.Module, cfg: LoraConfig, adapter_name: str) -> LoraConfig:
    """``cfg`` with the rank of the exported factors and the alpha that keeps the scale s unchanged."""
    extra = {getattr(l.lora[adapter_name], "offset_A", torch.empty(0, 0)).shape[0]
             for _, l in lora_layers(model) if adapter_name in l.lora}
    if extra <= {0}:
        return cfg
    if len(extra) > 1 or cfg.rank_pattern or cfg.alpha_pattern:
        raise LoraError(f"adapter {adapter_name!r} records weight offsets of ranks {sorted(extra)} with "
                        "rank/alpha patterns; saving needs one offset rank and no patterns")
    r = cfg.r + extra.pop()
    alpha = cfg.alpha * (math.sqrt(r / cfg.r) if cfg.rslora else r / cfg.r)
    return replace(cfg, r=r, alpha=alpha)


def _all_biases(model: nn.Module) -> dict[str, torch.Tensor]:
    owners = dict(model.named_modules())
    out = {}
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if leaf != "bias" or any(s in name for s in (".lora.", "original_module.", "modules_to_save.")):
            continue
        out[f"{owner}.base_layer.bias" if isinstance(owners.get(owner), LoraLayer) else name] = p
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None) -> Path:
    """Write ``path/adapter_config.json`` and ``path/adapter_model.safetensors`` (atomically)."""
    cfg = check_adapter(model, adapter_name).configs[adapter_name]
    tensors = lora_state_dict(model, adapter_name)
    cfg = _export_config(model, cfg, adapter_name)
    layers = [(p, l) for p, l in lora_layers(model) if adapter_name in l.lora]
    dora = any(getattr(l.lora[adapter_name], "magnitude", None) is not None for _, l in layers)
    meta = {"adapter_name": adapter_name,
            "base_shapes": {p: list(l.weight.shape) for p, l in layers},
            "fused_slices": {p: l.mask for p, l in layers if isinstance(l, LoraFusedLinear)},
            "init": cfg.init,
            # lorakit-only settings PEFT's config has no field for:
            "config": {"fused_slices": cfg.fused_slices, "strict": cfg.strict}}
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    conv1d = any(getattr(l, "fan_in_fan_out", False) for _, l in layers)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(
        tensors, tmp, metadata={"format": "pt", "lorakit": json.dumps(meta)}))
    config = {**peft_config_dict(cfg, base_model_name_or_path, fan_in_fan_out=conv1d), "use_dora": dora}
    _atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return out


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


def _atomic_write(target: Path, write) -> None:
    """Write to a temp file beside ``target``, fsync, then rename: a crash never leaves half a file."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def peft_config_dict(cfg: LoraConfig, base_model_name_or_path: str | None = None,
                     fan_in_fan_out: bool = False) -> dict:
    """``cfg`` in the field names PEFT's LoraConfig reads."""
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": cfg.bias,
        "target_modules": cfg.target_modules, "exclude_modules": cfg.exclude_modules,
        "modules_to_save": cfg.modules_to_save, "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
        "use_rslora": cfg.rslora, "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern), "layers_to_transform": cfg.layers_to_transform,
        "layers_pattern": cfg.layers_pattern, "use_dora": False,
    }


def config_from_peft(data: dict) -> LoraConfig:
    """A LoraConfig from PEFT's adapter_config.json fields; unsupported variants are refused."""
    if data.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"adapter_config.json has peft_type={data.get('peft_type')!r}; lorakit "
                        "loads LORA adapters")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in data:
            raise LoraError(f"adapter_config.json lacks {key!r}; it is not a LoRA adapter config")
    unsupported = [k for k in UNSUPPORTED_PEFT_FIELDS if data.get(k)]
    if unsupported:
        raise LoraError(f"this adapter uses PEFT features lorakit cannot reproduce: {unsupported}; "
                        "loading it would silently compute something else")
    if data.get("lora_bias"):
        raise LoraError("this adapter has lora_bias=true (a bias on lora_B), which lorakit does not "
                        "load")
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init != "gaussian":
        raise LoraError(f"init_lora_weights={init!r} changes the base weights as well (PiSSA/OLoRA/"
                        "LoftQ style); convert it to a plain LoRA in PEFT first "
                        "(save_pretrained(path_initial_model_for_weight_conversion=...))")
    return LoraConfig(
        r=data["r"], alpha=data["lora_alpha"], target_modules=data["target_modules"],
        dropout=data.get("lora_dropout") or 0.0, bias=data.get("bias") or "none",
        modules_to_save=data.get("modules_to_save"),
        init="gaussian" if init == "gaussian" else "kaiming", rslora=bool(data.get("use_rslora")),
        rank_pattern=data.get("rank_pattern") or {}, alpha_pattern=data.get("alpha_pattern") or {},
        exclude_modules=data.get("exclude_modules"),
        layers_to_transform=data.get("layers_to_transform"),
        layers_pattern=data.get("layers_pattern"), strict=False)


# --- loading ----------------------------------------------------------------------------------------
def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor], dict]:
    """Config, tensors (keys without the ``base_model.model.`` prefix) and lorakit metadata."""
    folder = _adapter_dir(Path(path))
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise LoraError(f"{folder} has no {CONFIG_NAME}; point load_adapter at the folder "
                        "save_adapter (or PEFT's save_pretrained) wrote") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoraError(f"{folder / CONFIG_NAME} is not valid JSON ({err}); the file is damaged")
    if not isinstance(raw, dict):
        raise LoraError(f"{folder / CONFIG_NAME} must hold a JSON object, got {type(raw).__name__}")
    try:
        cfg = config_from_peft(raw)
    except TypeError as err:
        raise LoraError(f"{folder / CONFIG_NAME} has a field of the wrong type ({err})") from None
    try:
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as handle:
            tensors = {_strip(k): handle.get_tensor(k) for k in handle.keys()}
            meta = json.loads((handle.metadata() or {}).get("lorakit", "{}"))
            meta["use_dora"] = bool(raw.get("use_dora"))         # load_adapter needs it; not in cfg
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraError(f"{folder / WEIGHTS_NAME} is corrupt or truncated ({err}); save it again")
    return cfg, tensors, meta


def _strip(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def _adapter_dir(path: Path) -> Path:
    if path.suffix in PICKLE_SUFFIXES:
        raise LoraError(_pickle_refusal(path))
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if not path.is_dir():
        raise LoraError(f"adapter folder {path} does not exist")
    if not (path / WEIGHTS_NAME).is_file():
        pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise LoraError(_pickle_refusal(pickles[0]))
        raise LoraError(f"{path} has no {WEIGHTS_NAME}; found {sorted(p.name for p in path.iterdir())}")
    return path


def _pickle_refusal(path: Path) -> str:
    return (f"{path} is a pickle file; lorakit never unpickles files (they can run code). If you trust "
            f"it, convert it once: python -c \"import torch; from safetensors.torch import save_file; "
            f"save_file(torch.load('{path}', weights_only=True), '{path.with_suffix('.safetensors')}')\" "
            f"and name the result {WEIGHTS_NAME}")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 trainable: bool = False) -> nn.Module:
    """Load an adapter saved by lorakit or PEFT onto ``model`` (in place; returns it).

    ``trainable=False`` (default) loads it for inference; ``trainable=True`` to continue training it.
    The adapter becomes active if it is the model's first.
    """
    cfg, tensors, meta = read_adapter(path)
    if has_lora(model) and adapter_name in lora_state(model).configs:
        raise LoraError(f"the model already has an adapter named {adapter_name!r}; pass another "
                        "adapter_name or delete_adapter first")
    cfg = _heads_in_model(model, cfg)
    groups, extra = _group_keys(tensors)
    fused = meta.get("fused_slices", {})
    ranks = _check_lora_tensors(model, groups, meta.get("base_shapes", {}), fused, path)
    _check_magnitudes(groups, meta["use_dora"], path)
    heads = _check_head_tensors(model, cfg, extra, path)
    exact = "|".join(re.escape(p) for p in groups)
    inject_cfg = LoraConfig(**{**cfg.to_dict(), "target_modules": f"(?:{exact})",
                               "exclude_modules": None, "layers_to_transform": None,
                               "fused_slices": fused, "strict": True})
    apply_lora(model, inject_cfg, adapter_name, ranks=ranks)
    lora_state(model).configs[adapter_name] = replace(cfg, **meta.get("config", {}))
    if meta["use_dora"]:
        from lorakit.layers.dora import to_dora
        to_dora(model, adapter_name)
    with torch.no_grad():
        for mod_path, parts in groups.items():
            layer = model.get_submodule(mod_path)
            delta = layer.lora[adapter_name]
            delta.A.copy_(parts["A"]), delta.B.copy_(parts["B"])
            if "magnitude" in parts:
                delta.magnitude.copy_(parts["magnitude"])
            if "bias" in parts:
                layer.bias.copy_(parts["bias"])
        for key, (head_path, pname, param) in heads.items():
            if head_path is not None:         # the adapter's own copy, made by apply_lora above
                param = model.get_submodule(head_path).modules_to_save[adapter_name] \
                    .get_parameter(pname)
            param.copy_(extra[key])
    from lorakit.adapters import set_trainable
    return set_trainable(model, adapter_name, trainable)


def _heads_in_model(model: nn.Module, cfg: LoraConfig) -> LoraConfig:
    """``cfg`` without the modules_to_save entries that name no module of ``model``, and without repeats.

    PEFT's task_type="SEQ_CLS" (and "TOKEN_CLS") adds both "classifier" and "score" to the
    saved modules_to_save whatever the model has, and PEFT skips names that match nothing. Loading does
    the same, because the file's keys are the truth: a head whose weights are in the file but not in the
    model is still refused (as an unexpected key). apply_lora stays strict: there an unmatched name is
    a typo.
    """
    from lorakit.targeting import candidate_modules
    names = [n for n, _ in candidate_modules(model)]
    kept = [p for p in dict.fromkeys(cfg.modules_to_save or [])
            if any(n == p or n.endswith("." + p) for n in names)]
    return cfg if kept == (cfg.modules_to_save or []) else replace(cfg, modules_to_save=kept or None)


def _group_keys(tensors: dict) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    groups, extra = {}, {}
    for key, value in tensors.items():
        found = _LORA_KEY.match(key)
        if not found:
            extra[key] = value
            continue
        part = {"lora_A.weight": "A", "lora_embedding_A": "A", "lora_B.weight": "B",
                "lora_embedding_B": "B", "base_layer.bias": "bias",
                "lora_magnitude_vector": "magnitude"}[found["part"]]
        groups.setdefault(found["path"], {})[part] = value
    for path, parts in list(groups.items()):
        if set(parts) == {"bias"}:                    # bias of a layer without LoRA: bias="all"
            extra[f"{path}.bias"] = groups.pop(path)["bias"]
    return groups, extra


def _check_lora_tensors(model: nn.Module, groups: dict, base_shapes: dict, fused: dict,
                        path) -> dict[str, int]:
    """Every adapted module exists, has the recorded base shape and factor shapes that fit."""
    ranks = {}
    for mod_path, parts in groups.items():
        for need in ("A", "B"):
            if need not in parts:
                raise LoraError(f"{path}: key for {mod_path}.lora_{need} is missing; the file is "
                                "incomplete")
        try:
            module = model.get_submodule(mod_path)
        except AttributeError:
            raise LoraError(f"the adapter has weights for {mod_path!r}, which this model does not "
                            f"have; it was saved for another base model") from None
        kind = module_kind(module)
        if kind is None:
            raise LoraError(f"the adapter targets {mod_path!r}, which is {type(module).__name__} here; "
                            "it was saved for another base model")
        if mod_path in base_shapes and list(module.weight.shape) != list(base_shapes[mod_path]):
            raise LoraError(f"base model mismatch at {mod_path!r}: the adapter was saved for weight "
                            f"shape {tuple(base_shapes[mod_path])}, this model has "
                            f"{tuple(module.weight.shape)}. Nothing was changed")
        layer = wrap_module(module, "fused" if mod_path in fused else kind, fused.get(mod_path))
        blocks = len(layer.enabled) if isinstance(layer, LoraFusedLinear) else 1
        r = parts["A"].shape[0] // blocks if parts["A"].dim() else 0
        want = layer.factor_shapes(max(r, 1))
        got = (tuple(parts["A"].shape), tuple(parts["B"].shape))
        if r < 1 or got != (tuple(want[0]), tuple(want[1])):
            raise LoraError(f"base model mismatch at {mod_path!r}: adapter factors A{got[0]} B{got[1]} "
                            f"do not fit {layer.describe_base()} (expected A{tuple(want[0])} "
                            f"B{tuple(want[1])}). Nothing was changed")
        if "bias" in parts and (layer.bias is None or layer.bias.shape != parts["bias"].shape):
            raise LoraError(f"bias for {mod_path!r} has shape {tuple(parts['bias'].shape)}, the model's "
                            f"is {None if layer.bias is None else tuple(layer.bias.shape)}")
        ranks[mod_path] = r
    if not groups:
        raise LoraError(f"{path} holds no LoRA weights (no lora_A/lora_B keys)")
    return ranks


def _check_magnitudes(groups: dict, use_dora: bool, path) -> None:
    """DoRA files have a magnitude (out,) for every adapted layer; other files have none."""
    for mod_path, parts in groups.items():
        if ("magnitude" in parts) != use_dora:
            raise LoraError(f"{path}: use_dora={use_dora} in the config, but {mod_path} "
                            f"{'has' if 'magnitude' in parts else 'lacks'} DoRA's lora_magnitude_vector; "
                            "the file is inconsistent (save it again)")
        if use_dora and tuple(parts["magnitude"].shape) != (parts["B"].shape[0],):
            raise LoraError(f"{path}: {mod_path}.lora_magnitude_vector has shape "
                            f"{tuple(parts['magnitude'].shape)}, expected ({parts['B'].shape[0]},)")


def _check_head_tensors(model: nn.Module, cfg: LoraConfig, extra: dict, path) -> dict:
    """Map the non-LoRA keys to (head path, param name, param): modules_to_save parameters or, with
    bias="all", biases of the model. Refuse strays and shape mismatches."""
    from lorakit.plan import resolve_modules_to_save
    wanted = {}
    for head_path, module in resolve_modules_to_save(model, cfg):
        for pname, p in module.named_parameters():
            wanted[f"{head_path}.{pname}"] = (head_path, pname, p)
    params = dict(model.named_parameters())
    targets = {}
    for key, value in extra.items():
        entry = wanted.get(key)
        if entry is None and key.endswith(".bias") and cfg.bias == "all" and key in params:
            entry = (None, None, params[key])
        if entry is None:
            raise LoraError(f"{path}: unexpected key {PREFIX + key!r}; it is neither LoRA, a "
                            "modules_to_save parameter nor a bias of this model")
        if entry[2].shape != value.shape:
            raise LoraError(f"{path}: {key!r} has shape {tuple(value.shape)}, the model's is "
                            f"{tuple(entry[2].shape)}; it was saved for another base model")
        targets[key] = entry
    missing = sorted(set(wanted) - set(extra))
    if missing:
        raise LoraError(f"{path}: modules_to_save weights missing from the file: {missing[:5]}")
    return targets
