"""Serve parity: a small fingerprint of what an adapter computes, recorded when it is saved.

An adapter can load without error and still not compute what it computed in training: a head kept in
``modules_to_save`` dropped by the server (vLLM issues 9280, 32599), adapters on layers a server skips
(MoE experts, vLLM PR 41384), another scaling rule, another or a differently quantized base. Loading
checks names and shapes; only running the model shows the rest. So at save time lorakit runs the
adapted model once on a fixed probe input and stores a few of its outputs in the safetensors metadata;
a server (or ``lorakit check-adapter``) runs the same probe and compares.

    probe ids   p = (1 + 37 i) mod V, i = 0..7                    (1, T) with T = 8
    outputs     Y  = f_adapted(p), Y0 = f_base(p)                  (T', C): logits, or hidden states
    columns     the 8 columns the adapter moves most, sum_t |Y - Y0|, plus 8 evenly spaced ones
    recorded    Y[:, cols] and Y0[:, cols], 6 significant digits

A served adapter passes when max |Y_served - Y| <= tol * max(1, max |Y|), tol = 1e-3 for a float32 save
(2e-2 when the model was saved in 16-bit). Y0 is kept to say why a check failed: if the base outputs
differ too, the adapter was trained on another (or differently quantized) base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.adapters import active_adapters, disable_adapter, set_adapter
from lorakit.errors import LoraError
from lorakit.inject import activate, lora_layers

FINGERPRINT_KEY = "serve_fingerprint"
PROBE_LENGTH = 8
MOVED_COLUMNS, SPREAD_COLUMNS = 8, 8
TOLERANCE = {"float32": 1e-3, "float64": 1e-3}
LOW_PRECISION_TOLERANCE = 2e-2


def probe_ids(vocab_size: int) -> torch.Tensor:
    """The fixed probe input (1, PROBE_LENGTH): spread over the vocabulary, the same for every model."""
    return torch.tensor([[(1 + 37 * i) % vocab_size for i in range(PROBE_LENGTH)]])


def vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    return getattr(embed, "num_embeddings", None)


@torch.no_grad()
def probe_output(model: nn.Module) -> torch.Tensor | None:
    """The model's output on the probe as float64 (T', C), with whatever adapters are set up now
    (active, mixed or disabled); None for a model that does not take token ids."""
    size = vocab_size(model)
    if size is None:
        return None
    device = next(model.parameters()).device
    ids = probe_ids(size).to(device)
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError):
        return None                        # not a token model (an audio encoder), or it cannot run here
    finally:
        model.train(was_training)
    tensor = getattr(out, "logits", None)
    if tensor is None:
        tensor = getattr(out, "last_hidden_state", None)
    if tensor is None and isinstance(out, torch.Tensor):
        tensor = out
    if tensor is None:
        return None
    return tensor.detach().double().cpu().reshape(-1, tensor.shape[-1])


def fingerprint(model: nn.Module, adapter_name: str = "default") -> dict | None:
    """The record ``save_adapter`` stores: outputs of ``adapter_name`` alone and of the bare base on
    the probe. None when the model cannot be probed (no token input, merged adapters)."""
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        return None
    before = active_adapters(model)
    try:
        set_adapter(model, [adapter_name])
        adapted = probe_output(model)
        with disable_adapter(model):
            base = probe_output(model)
    except LoraError:
        return None
    finally:
        activate(model, before)
    if adapted is None or base is None or adapted.shape != base.shape:
        return None
    columns = pick_columns(adapted, base)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {"version": 1, "probe_length": PROBE_LENGTH, "vocab_size": vocab_size(model),
            "dtype": dtype, "shape": list(adapted.shape), "columns": columns,
            "adapted": _rounded(adapted[:, columns]), "base": _rounded(base[:, columns])}


def fingerprint_metadata(model: nn.Module, adapter_name: str = "default") -> dict:
    """``save_adapter(model, path, metadata=fingerprint_metadata(model))``: the fingerprint entry, or
    nothing when the model cannot be probed."""
    record = fingerprint(model, adapter_name)
    return {} if record is None else {FINGERPRINT_KEY: record}


def pick_columns(adapted: torch.Tensor, base: torch.Tensor) -> list[int]:
    width = adapted.shape[1]
    if width <= MOVED_COLUMNS + SPREAD_COLUMNS:
        return list(range(width))
    moved = (adapted - base).abs().sum(0).topk(MOVED_COLUMNS).indices.tolist()
    spread = torch.linspace(0, width - 1, SPREAD_COLUMNS).round().long().tolist()
    return sorted(set(moved) | set(spread))


def _rounded(values: torch.Tensor) -> list[list[float]]:
    return [[float(f"{v:.6g}") for v in row] for row in values.tolist()]


@dataclass
class ParityCheck:
    ok: bool
    error: float             # max |Y_served - Y_saved| over the recorded entries
    tolerance: float
    base_error: float | None  # the same for the bare base, when it was measured
    message: str


def compare(record: dict, adapted: torch.Tensor | None, base: torch.Tensor | None = None,
            head_adapter: bool = False) -> ParityCheck:
    """Compare outputs recomputed now with the ``record`` saved with the adapter. ``head_adapter``:
    the adapter brings its own head, so the bare base's outputs (a fresh head) say nothing."""
    want = torch.tensor(record["adapted"], dtype=torch.float64)
    columns = record["columns"]
    if adapted is None or list(adapted.shape) != record["shape"]:
        got = None if adapted is None else list(adapted.shape)
        return ParityCheck(False, float("inf"), 0.0, None,
                           f"the probe output has shape {got} here but {record['shape']} when the "
                           "adapter was saved: it was trained on another model or head")
    error = float((adapted[:, columns] - want).abs().max())
    scale = max(1.0, float(want.abs().max()))
    tolerance = TOLERANCE.get(record.get("dtype"), LOW_PRECISION_TOLERANCE) * scale
    base_error = None
    if base is not None and not head_adapter and list(base.shape) == record["shape"]:
        saved_base = torch.tensor(record["base"], dtype=torch.float64)
        base_error = float((base[:, columns] - saved_base).abs().max())
    if error <= tolerance:
        return ParityCheck(True, error, tolerance, base_error,
                           f"serves as it trained: probe outputs within {error:.2e} "
                           f"(tolerance {tolerance:.1e})")
    if base_error is not None and base_error > tolerance:
        why = (f"the bare base model differs too (by {base_error:.3g}): the adapter was trained on "
               "another base, or the same base quantized differently; serve it on the base it was "
               "trained on")
    else:
        why = ("the base model matches, so this adapter computes something else here than in "
               "training (a head, layer or scaling the adapter needs is not applied)")
    return ParityCheck(False, error, tolerance, base_error,
                       f"probe outputs differ from those saved with the adapter by {error:.3g} "
                       f"(tolerance {tolerance:.1e}): {why}")
