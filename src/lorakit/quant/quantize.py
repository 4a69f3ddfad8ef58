"""Quantize a model's frozen linear weights (QLoRA's base), plan it first, and undo it.

    plan = plan_quantize(model, "nf4")      # dry run: every Linear, quantized or kept and why
    lorakit.quantize_base(model, "nf4")     # in place: each chosen nn.Linear's weight -> QuantizedWeight
    lorakit.apply_lora(model, cfg)          # LoRA factors (fp32) on top; the base stays frozen
    dequantize_base(model)                  # every quantized weight back to a dense Parameter

What is quantized: the weight of every ``nn.Linear`` (and subclasses), except the output head (the
model's output embeddings, or a module named ``lm_head``/``classifier``/``score``/``qa_outputs``),
anything in ``skip``, and weights whose shape the scheme cannot store (kept, listed with the reason).
The input embeddings and the output head stay 16/32-bit as in QLoRA, unless ``embeddings=True``: then
the input embedding table (``get_input_embeddings()``, an ``nn.Embedding``; a lookup dequantizes only
the rows it reads, so NF4 needs rows of whole blocks) and the output embeddings (``lm_head``) are
quantized too. Their share of a small model is large (SmolLM2-135M: 28M of 135M weights; the
Qwen2.5-Coder-1.5B checkpoint here: 233M of 1.54B, plus an untied lm_head as large): its bf16 weight
memory goes to 0.45x under nf4 with them kept, 0.26x with them quantized (measured). Weights shared by
several modules (``tie_word_embeddings``: lm_head.weight is embed_tokens.weight) are decided together,
quantized once and stay one shared Parameter. Other embeddings (positions, token types), norms,
convolutions, biases and the task heads (``classifier``...) are never touched. Quantize before or
after adding LoRA: a LoRA layer's frozen weight is quantized in place (same Parameter key), its
factors stay fp32. Quantized weights are frozen; training them (method ``full``) is refused by
``check_frozen`` and, at the latest, by the first forward that would need their gradient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from lorakit.errors import LoraError
from lorakit.layers import LoraLayer, is_quantized
from lorakit.quant.formats import SCHEMES, scaler_block_for
from lorakit.quant.tensor import quantize_weight

HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")
KINDS = {"linear": "a linear map", "embedding": "the input embeddings", "head": "the output head"}
RECORD = "_lorakit_quant"        # model.__dict__ key: how the base was quantized (read by save_adapter)


@dataclass
class QuantRow:
    name: str
    shape: tuple
    dtype: str
    action: str                   # "quantize" | "keep"
    reason: str = ""
    bytes_before: int = 0         # a weight tied to an earlier row's counts 0 (held once)
    bytes_after: int = 0
    kind: str = "linear"          # "linear" | "embedding" (the input embeddings) | "head" (the output's)


@dataclass
class QuantPlan:
    scheme: str
    settings: dict
    rows: list[QuantRow] = field(default_factory=list)
    embeddings: bool = False      # the input embeddings and the output head quantized too

    @property
    def quantized(self) -> list[QuantRow]:
        return [r for r in self.rows if r.action == "quantize"]

    @property
    def kept(self) -> list[QuantRow]:
        return [r for r in self.rows if r.action == "keep"]

    def record(self) -> dict:
        """What ``save_adapter`` writes into the adapter's metadata (JSON)."""
        return {"scheme": self.scheme, **self.settings, "method": "QLoRA (Dettmers et al. 2023)"
                if self.scheme == "nf4" else "int8 absmax per output channel",
                "format": SCHEMES[self.scheme].bits, "quantized_modules": len(self.quantized),
                "kept_modules": {r.name: r.reason for r in self.kept}, "embeddings": self.embeddings}

    def table(self) -> str:
        """The header, then every kept weight and every embedding/head row, with the reason."""
        lines = [f"quantize {self.scheme} {self.settings}"
                 f"{' + embeddings' if self.embeddings else ''}: {len(self.quantized)} weights "
                 f"quantized, {len(self.kept)} kept"]
        lines += [f"  {r.action:<9} {r.name:<48} {str(r.shape):<14} {r.reason or KINDS[r.kind]}"
                  for r in self.rows if r.action == "keep" or r.kind != "linear"]
        return "\n".join(lines)


def _matches(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) or re.fullmatch(p, name) for p in patterns)


def _settings(scheme: str, block_size: int, double_quant: bool) -> dict:
    if scheme not in SCHEMES:
        raise LoraError(f"unknown quantization {scheme!r}; use one of {sorted(SCHEMES)}")
    if scheme == "nf4":
        if not isinstance(block_size, int) or block_size < 2 or block_size & (block_size - 1):
            raise LoraError(f"block_size={block_size!r} must be a power of two, e.g. 64 (QLoRA's)")
        return {"block_size": block_size, "double_quant": bool(double_quant)}
    return {}


def _embeddings(model: nn.Module, which: str) -> nn.Module | None:
    """``model.get_input_embeddings()`` / ``get_output_embeddings()`` (which: "input" | "output"),
    or None where the model has none."""
    getter = getattr(model, f"get_{which}_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except NotImplementedError:
        return None


def head_names(model: nn.Module) -> set[str]:
    """Module names of the output head: the output embeddings, plus the usual head names."""
    names = {n for n, _ in model.named_modules() if _matches(n, HEAD_NAMES)}
    out = _embeddings(model, "output")
    names |= {n for n, m in model.named_modules() if out is not None and m is out}
    return names


def _embedding_why_not(module: nn.Module) -> str | None:
    """Why the input embeddings cannot be stored quantized, or None."""
    base = module.base_layer if isinstance(module, LoraLayer) else module
    if isinstance(module, LoraLayer) and module.merged_adapters:
        return "its adapters are merged; unmerge_lora(model) first"
    if not isinstance(base, nn.Embedding):
        return f"a {type(base).__name__}, not an nn.Embedding"
    if base.max_norm is not None:
        return f"max_norm={base.max_norm} renormalizes its rows in place; a quantized table is frozen"
    return None


def _linear_weights(model: nn.Module):
    """(name, module, why-not) for every linear map: plain nn.Linear and LoRA layers over one."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.base_layer
            if isinstance(base, nn.Linear):
                yield name, module, ("its adapters are merged; unmerge_lora(model) first"
                                     if module.merged_adapters else
                                     "a fused slice layer" if type(module).__name__ != "LoraLinear"
                                     else None)
        elif isinstance(module, nn.Linear) and not isinstance(module, LoraLayer):
            yield name, module, ("a trained head copy (modules_to_save)" if
                                 ".modules_to_save." in f".{name}." or
                                 ".original_module" in f".{name}" else None)


def _weights(model: nn.Module):
    """(name, module, kind, why-not) for every weight a plan covers: the input embeddings, then each
    linear map; kind "head" for the output embeddings (or a module named lm_head)."""
    emb, out = _embeddings(model, "input"), _embeddings(model, "output")
    if isinstance(emb, nn.Module):
        name = next((n for n, m in model.named_modules() if m is emb), None)
        if name is not None:
            yield name, emb, "embedding", _embedding_why_not(emb)
    for name, module, why_not in _linear_weights(model):
        head = module is out or name.rpartition(".")[2] == "lm_head"
        yield name, module, "head" if head else "linear", why_not


def plan_quantize(model: nn.Module, scheme: str = "nf4", block_size: int = 64,
                  double_quant: bool = True, skip=(), embeddings: bool = False) -> QuantPlan:
    """Every linear weight and the input embeddings, to be quantized or kept (with the reason);
    changes nothing. ``embeddings``: quantize the input embeddings and the output head too."""
    settings = _settings(scheme, block_size, double_quant)
    skip = [skip] if isinstance(skip, str) else list(skip)
    plan = QuantPlan(scheme, settings, embeddings=bool(embeddings))
    heads, keys = head_names(model), []
    for name, module, kind, why_not in _weights(model):
        w = module.weight
        if is_quantized(w):
            raise LoraError(f"{name!r} is already quantized ({w.describe()}); quantizing twice "
                            "would stack the rounding errors. Load the base again to re-quantize")
        row = QuantRow(name, tuple(w.shape), str(w.dtype).replace("torch.", ""), "keep",
                       bytes_before=w.numel() * w.element_size(), kind=kind)
        reason = _keep_reason(row, w, why_not, plan, skip, heads)
        if reason:
            row.reason, row.bytes_after = reason, row.bytes_before
        else:
            row.action, row.bytes_after = "quantize", _storage_bytes(w.shape, scheme, settings)
        plan.rows.append(row)
        keys.append(id(w))
    _decide_tied(plan.rows, keys)
    return plan


def _keep_reason(row: QuantRow, w, why_not, plan: QuantPlan, skip: list, heads: set) -> str | None:
    """Why this weight stays as it is, or None to quantize it."""
    if not w.is_floating_point():
        return f"its dtype {w.dtype} is not floating point"
    if why_not:
        return why_not
    if row.kind == "embedding" and not plan.embeddings:
        return "the input embeddings (kept 16/32-bit, as QLoRA does; embeddings=True quantizes them)"
    if row.name in heads and not (plan.embeddings and row.kind == "head"):
        return "the output head (kept in full precision, as QLoRA does)"
    if _matches(row.name, skip):
        return "in skip"
    scheme = SCHEMES[plan.scheme]             # a lookup reads single rows: NF4 rows of whole blocks
    fits = scheme.rows_fit if row.kind == "embedding" else scheme.fits
    return fits(row.shape, **plan.settings)


def _decide_tied(rows: list[QuantRow], keys: list[int]) -> None:
    """Rows sharing one Parameter (tied embeddings) get one decision: if any must stay as it is, all
    stay (quantizing one would untie them); else the weight is quantized once and shared. Its bytes
    count on the first row only."""
    groups: dict[int, list[QuantRow]] = {}
    for row, key in zip(rows, keys):
        groups.setdefault(key, []).append(row)
    for lead, *tied in (g for g in groups.values() if len(g) > 1):
        kept = next((r for r in (lead, *tied) if r.action == "keep"), None)
        for r in (lead, *tied):
            if kept is not None and r.action == "quantize":
                r.action, r.reason = "keep", f"tied to {kept.name}, which is kept ({kept.reason})"
            elif r is not lead and r.action == "quantize":
                r.reason = f"tied to {lead.name}: quantized once, shared"
        for r in tied:
            r.bytes_before = r.bytes_after = 0
        lead.bytes_after = lead.bytes_before if kept is not None else lead.bytes_after


def _storage_bytes(shape, scheme: str, settings: dict) -> int:
    out, inp = shape
    n = out * inp
    if scheme == "int8":
        return n + 4 * out
    blocks = n // settings["block_size"]
    if not settings["double_quant"]:
        return n // 2 + 4 * blocks
    return n // 2 + blocks + 4 * (blocks // scaler_block_for(blocks)) + 4


def release_file_backed(model: nn.Module) -> None:
    """Copy the tensors still backed by the checkpoint file into the process's own memory.

    A model loaded from safetensors holds its weights in a memory map of the file. Quantizing reads
    every weight, and each page read stays mapped (resident, counted in RSS) as long as any tensor of
    the file is alive: the kept embeddings and norms would keep the whole 16-bit checkpoint resident
    (Qwen2.5-1.5B: 3.8 GB resident, 1.3 GB after this copy). Such tensors are recognised by their
    storage, which torch cannot resize (memory it did not allocate); the copy lets the map go."""
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is not None and not is_quantized(t) and not t.untyped_storage().resizable():
                    if isinstance(t, nn.Parameter):
                        t.data = t.data.clone()          # in place: tied modules keep sharing it
                    else:
                        table[key] = t.clone()


def quantize_base(model: nn.Module, scheme: str = "nf4", block_size: int = 64,
                  double_quant: bool = True, skip=(), verbose: bool = False,
                  embeddings: bool = False) -> nn.Module:
    """Store every frozen Linear weight quantized (see the module docstring); in place, returns model.

    scheme: "nf4" (QLoRA: 4-bit NormalFloat, ``block_size`` weights per absmax scale, scales
    double-quantized to 8 bits) or "int8" (absmax per output channel; block settings unused).
    embeddings: also the input embedding table and the output head (kept 16/32-bit by default, as
    QLoRA does); tied ones stay one shared, quantized Parameter. The whole plan is checked first: a
    refused call changes nothing. Quantized weights are frozen (requires_grad=False); a forward that
    would train them raises. ``model.__dict__["_lorakit_quant"]`` keeps the plan's record for the
    adapter metadata.
    """
    plan = plan_quantize(model, scheme, block_size, double_quant, skip, embeddings)
    todo = plan.quantized
    try:
        from tqdm.auto import tqdm  # deferred: heavy optional dependency
        todo = tqdm(todo, desc=f"quantize {scheme}", disable=not verbose and len(todo) < 64,
                    leave=False)
    except ImportError:
        pass
    done: dict[int, tuple] = {}        # id(dense weight) -> (it, kept alive; its quantized Parameter)
    for row in todo:
        module = model.get_submodule(row.name)
        w = module.weight
        if id(w) not in done:          # tied weights: quantized once, one Parameter shared again
            done[id(w)] = (w, nn.Parameter(quantize_weight(w, scheme, **plan.settings),
                                           requires_grad=False))
        _set_weight(module, done[id(w)][1])
    done.clear()
    release_file_backed(model)
    model.__dict__[RECORD] = plan.record()
    if verbose:
        print(plan.table())
    return model


def _set_weight(module: nn.Module, q: nn.Parameter) -> None:
    module.weight = q
    if isinstance(module, LoraLayer):          # the wrapped layer shares the Parameter
        module.base_layer.weight = q


def quantized_weights(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) for every module whose ``weight`` is quantized (LoRA layers included)."""
    return [(n, m) for n, m in model.named_modules() if is_quantized(m._parameters.get("weight"))]


def dequantize_base(model: nn.Module) -> nn.Module:
    """Every quantized weight back to a dense, frozen Parameter of its dtype: W = dequant(Wq), the
    exact weight the quantized model computed with. In place, returns model."""
    seen = {}
    for _, module in model.named_modules():
        w = module.__dict__.get("_parameters", {}).get("weight")
        if is_quantized(w):
            if id(w) not in seen:      # a LoRA layer shares the Parameter with its base_layer
                seen[id(w)] = nn.Parameter(w.dequantize(), requires_grad=False)
            module.weight = seen[id(w)]
            base = module.__dict__.get("base_layer")
            if base is not None:
                base.weight = seen[id(w)]
    model.__dict__.pop(RECORD, None)
    return model


def quantize_with_report(model: nn.Module, scheme: str, **options) -> str:
    """``quantize_base`` and a text report: the kept layers and the weight memory per module type
    before and after (``lorakit inspect --quantize``)."""
    before = weight_memory(model)
    plan = plan_quantize(model, scheme, **options)
    quantize_base(model, scheme, **options)
    return plan.table() + "\n\nweight memory per module type:\n" + \
        memory_table(before, weight_memory(model))


def quantize_for_training(model: nn.Module, scheme: str, method: str,
                          embeddings: bool = False) -> nn.Module:
    """QLoRA set-up for a training run (``lorakit train --quantize``): refuse ``full`` (it would train
    the weights being frozen into 4/8 bits), quantize (``embeddings``: the input embeddings and the
    output head too, ``--quantize-embeddings``), check nothing quantized is set to train."""
    if method == "full":
        raise LoraError(f"--quantize {scheme} with --method full: full fine-tuning trains the base "
                        "weights, and a quantized base is frozen. Use a LoRA method (QLoRA) or drop "
                        "--quantize")
    quantize_base(model, scheme, embeddings=embeddings)
    check_frozen(model)
    return model


def quantize_as_recorded(model: nn.Module, record: dict) -> nn.Module:
    """Quantize ``model`` as the ``quantized_base`` record in a QLoRA adapter's metadata says (scheme,
    block size, double quantization, the modules kept, whether the embeddings were), so a merge or a
    generation with that adapter runs on the base it was trained against. In place, returns the model."""
    if not isinstance(record, dict) or record.get("scheme") not in SCHEMES:
        raise LoraError(f"the adapter's quantized_base record {record!r} names no known scheme "
                        f"({sorted(SCHEMES)}); the adapter metadata is damaged")
    return quantize_base(model, record["scheme"], block_size=record.get("block_size", 64),
                         double_quant=record.get("double_quant", True),
                         skip=list(record.get("kept_modules", {})),
                         embeddings=bool(record.get("embeddings", False)))


def check_embeddings_option(scheme: str | None, embeddings: bool) -> None:
    """Refuse ``--quantize-embeddings`` without ``--quantize``: it names no scheme of its own."""
    if embeddings and not scheme:
        raise LoraError("--quantize-embeddings quantizes with the scheme --quantize names; add "
                        "--quantize nf4 (or int8), or drop --quantize-embeddings")


def check_frozen(model: nn.Module) -> None:
    """Refuse a model whose quantized weights are set to train (e.g. method ``full`` on a quantized base)."""
    bad = [n for n, p in model.named_parameters() if is_quantized(p) and p.requires_grad]
    if bad:
        raise LoraError(f"{len(bad)} quantized weights are set to train (first: {bad[0]}); a quantized "
                        "base is frozen: train LoRA on top (QLoRA), or drop --quantize to train the "
                        "full model")


def weight_memory(model: nn.Module) -> dict[str, dict]:
    """Bytes held by weights per module type, e.g. {"Linear": {"count", "params", "bytes"}}; a
    quantized weight counts its 4/8-bit storage, a LoRA layer counts as the module it wraps."""
    out: dict[str, dict] = {}
    seen: set[int] = set()            # tied weights (embeddings = lm_head) count once
    for _, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen |= {id(p) for p in params}
        if not params:
            continue
        base = module.__dict__.get("base_layer")
        kind = type(base).__name__ if base is not None else type(module).__name__
        row = out.setdefault(kind, {"count": 0, "params": 0, "bytes": 0})
        row["count"] += 1
        for p in params:
            row["params"] += p.numel()
            row["bytes"] += p.storage_bytes() if is_quantized(p) else p.numel() * p.element_size()
    return out


def memory_table(before: dict, after: dict) -> str:
    """Weight memory per module type before and after quantizing, as a text table."""
    lines = [f"{'module type':<24} {'count':>6} {'params':>13} {'before':>11} {'after':>11} {'ratio':>7}"]
    for kind in sorted(before, key=lambda k: -before[k]["bytes"]):
        b, a = before[kind], after.get(kind, before[kind])
        lines.append(f"{kind:<24} {b['count']:>6} {b['params']:>13,} {_mb(b['bytes']):>11} "
                     f"{_mb(a['bytes']):>11} {a['bytes'] / max(b['bytes'], 1):>6.2f}x")
    tb, ta = (sum(r["bytes"] for r in d.values()) for d in (before, after))
    lines.append(f"{'total':<24} {'':>6} {'':>13} {_mb(tb):>11} {_mb(ta):>11} {ta / max(tb, 1):>6.2f}x")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
