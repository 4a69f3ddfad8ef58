"""``merge_and_unload`` that knows about quantized bases: exact by default, re-quantized on request.

Default (``requantize=False``): every adapted layer becomes W = dequant(Wq) + s B A in the weight's
16/32-bit dtype, and every other quantized weight W = dequant(Wq): the very model the adapter was
trained against, so the merged model computes what the unmerged quantized one did (up to float
summation order). It costs dense memory: a 16/32-bit model, as from ``dequantize_base``.

``requantize=True``: each adapted weight is re-quantized, Wq' = q(dequant(Wq) + s B A), with the
base's own scheme and settings. Rounding s B A onto the 4-bit grid loses part of the update (PEFT
issues 2501 and 2321 are users meeting this unreported), so the error is measured before anything
changes and printed:

    rel_weight_error   max over layers of ||dequant(Wq') - W|| / ||W||,  W = dequant(Wq) + s B A
    lost_update        max over layers of ||dequant(Wq') - W|| / ||s B A||  (1.0 = the update is lost)
    max_logit_diff     max |logits(merged, re-quantized) - logits(unmerged)| on a probe batch
    adapter_effect     max |logits(unmerged) - logits(adapter off)| on the same batch, for scale

Above ``threshold`` (on max_logit_diff) the merge is refused with LoraError and the model is left as
it was, unless ``force=True``. The report is printed and kept in ``model.__dict__["_lorakit_merge"]``.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.adapters import disable_adapter
from lorakit.errors import LoraError
from lorakit.inject import lora_layers
from lorakit.inject import merge_and_unload as merge_dense
from lorakit.layers import is_quantized
from lorakit.module_paths import replace_module
from lorakit.quant.quantize import dequantize_base

REPORT = "_lorakit_merge"


def merge_and_unload(model: nn.Module, requantize: bool = False, threshold: float = 0.5,
                     force: bool = False, probe=None, verbose: bool = True) -> nn.Module:
    """Merge the active adapters and return plain torch modules (see the module docstring).

    On a model without quantized weights this is ``lorakit.inject.merge_and_unload``. ``probe``:
    input ids (b, t) or a dict of model inputs for the requantized check; default 2 x 32 random ids
    of ``model.config.vocab_size`` (seeded).
    """
    if not requantize:
        return dequantize_base(merge_dense(model))       # the rest of the base, dequantized
    layers = [(n, layer) for n, layer in lora_layers(model) if is_quantized(layer.weight)]
    if not layers:
        raise LoraError("requantize=True needs LoRA layers over quantized weights; this model has "
                        "none (merge_and_unload(model) merges a 16/32-bit base exactly)")
    if any(layer.merged_adapters for _, layer in layers):
        raise LoraError("the adapters are merged already; unmerge_lora(model) first")
    requantized, rows = {}, []
    for name, layer in layers:
        delta = sum((layer.delta_weight(layer.lora[a]) for a in layer.active_adapters),
                    torch.zeros(()))
        dense = layer.weight.dequantize(torch.float32) + delta
        new = layer.weight.quantize_like(dense)
        err = (new.dequantize(torch.float32) - dense).norm()
        rows.append({"module": name, "rel_weight_error": float(err / dense.norm().clamp_min(1e-30)),
                     "lost_update": float(err / delta.norm()) if delta.norm() > 0 else 0.0})
        requantized[name] = new
    report = _logit_check(model, layers, requantized, probe)
    report["rel_weight_error"] = max(r["rel_weight_error"] for r in rows)
    report["lost_update"] = max(r["lost_update"] for r in rows)
    report.update(threshold=threshold, layers=rows)
    text = (f"requantized merge ({len(rows)} layers): max |logit diff| {report['max_logit_diff']:.4g} "
            f"(adapter's own effect {report['adapter_effect']:.4g}), relative weight error "
            f"{report['rel_weight_error']:.4g}, update lost up to {report['lost_update']:.1%}; "
            f"threshold {threshold:g}")
    if verbose:
        print(text)
    if report["max_logit_diff"] > threshold and not force:
        raise LoraError(f"refusing the requantized merge: {text}. Nothing was changed. Use "
                        "merge_and_unload(model) for the exact 16/32-bit merge, raise threshold, or "
                        "pass force=True to accept the error")
    for name, layer in layers:          # one layer at a time: no dense copy of the whole model
        base = layer.base_layer
        base.weight = nn.Parameter(requantized.pop(name), requires_grad=False)
        replace_module(model, name, base)
    merge_dense(model)                  # the rest: unquantized LoRA layers, head copies, state
    model.__dict__[REPORT] = report
    return model


@torch.no_grad()
def _logit_check(model: nn.Module, layers, requantized: dict, probe) -> dict:
    """Logits unmerged, with every adapter off, and with the re-quantized weights swapped into the
    adapted layers (their LoRA off, trained heads kept); every swap is undone before returning."""
    inputs = _probe_inputs(model, probe)
    was_training = model.training
    model.eval()
    try:
        ref = _logits(model, inputs)
        with disable_adapter(model):
            base = _logits(model, inputs)
        saved = {name: layer.weight for name, layer in layers}
        try:                             # adapted layers off, their weights re-quantized; heads on
            for name, layer in layers:
                layer.weight = nn.Parameter(requantized[name], requires_grad=False)
                layer.disabled = True
            merged = _logits(model, inputs)
        finally:
            for name, layer in layers:
                layer.weight, layer.disabled = saved[name], False
    finally:
        model.train(was_training)
    return {"max_logit_diff": float((merged - ref).abs().max()),
            "adapter_effect": float((ref - base).abs().max())}


def _probe_inputs(model: nn.Module, probe):
    if probe is not None:
        return probe
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        raise LoraError("requantize=True measures the error on a probe batch; this model has no "
                        "config.vocab_size, so pass probe=<input tensor or dict of inputs>")
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    return torch.randint(0, vocab, (2, 32), generator=g).to(device)


def _logits(model: nn.Module, inputs) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    out = getattr(out, "logits", out)
    return (out[0] if isinstance(out, (tuple, list)) else out).float()
