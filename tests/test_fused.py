"""The fused LoRA Function (layers/lora_function.py) against the eager reference layer.

Same inputs, same seed, both paths: outputs and every gradient (x, A, B, bias) must agree.
Tolerances: fp32 max |diff| <= 1e-5 (only summation order differs); bf16 autocast: relative to the
output's scale, 2e-2 (the fused path rounds the low-rank sum once where eager rounds three times, and
bf16 has 8 bits of mantissa). Dropout masks are bit-identical (same RNG draw), so dropout runs are
held to the same bounds.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.layers import LoraLinear, use_fused
from lorakit.layers.lora_function import LoraLinearFunction
from conftest import Conv1D, randomize_adapters


def _layer(kind: str, dropout: float = 0.0, bias: bool = True) -> LoraLinear:
    torch.manual_seed(0)
    base = Conv1D(24, 16) if kind == "conv1d" else nn.Linear(16, 24, bias=bias)
    layer = LoraLinear(base, fan_in_fan_out=kind == "conv1d")
    layer.add_adapter("default", r=4, alpha=8, dropout=dropout, rslora=False, init="gaussian")
    layer.set_active(["default"])
    with torch.no_grad():
        layer.lora["default"].B.normal_(std=0.1)
    return layer


def _run(layer, x, fused: bool, precision: str, seed: int = 3):
    """Output and grads (x, A, B, bias) of sum(out * w) for a fixed random w."""
    x = x.clone().requires_grad_(True)
    delta = layer.lora["default"]
    for p in (delta.A, delta.B, layer.bias):
        if p is not None:
            p.grad = None
    torch.manual_seed(seed)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast(
        "cpu", enabled=False)
    with use_fused(fused), ctx:
        out = layer(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out.float() * w).sum().backward()
    grads = [x.grad, delta.A.grad, delta.B.grad, None if layer.bias is None else layer.bias.grad]
    return out.detach().float(), [g if g is None else g.float() for g in grads], out.grad_fn


def _fused(grad_fn) -> bool:
    """Whether the graph's last nodes (through a reshape) are the fused Function's."""
    nodes = [grad_fn] + [f for f, _ in grad_fn.next_functions if f is not None]
    return any(type(f).__name__ == "LoraLinearFunctionBackward" for f in nodes)


def _close(a, b, precision):
    if precision == "fp32":
        return (a - b).abs().max().item() <= 1e-5
    return (a - b).abs().max().item() <= 2e-2 * max(a.abs().max().item(), 1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_fused_matches_eager(kind, precision, dropout):
    layer = _layer(kind, dropout)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 5, 16)
    ref_out, ref_grads, ref_fn = _run(layer, x, fused=False, precision=precision)
    out, grads, fn = _run(layer, x, fused=True, precision=precision)
    assert _fused(fn) and not _fused(ref_fn)
    assert _close(out, ref_out, precision)
    for name, g, ref in zip(["x", "A", "B", "bias"], grads, ref_grads):
        assert g is not None and _close(g, ref, precision), name


def test_dropout_mask_is_eagers_and_rng_is_left_as_eager_leaves_it():
    layer = _layer("linear", dropout=0.5)
    x = torch.randn(4, 16)
    states = []
    for fused in (False, True):
        out, grads, _ = _run(layer, x, fused=fused, precision="fp32")
        states.append(torch.get_rng_state())
        # half the inputs dropped: an all-kept or all-dropped mask would not test the replay
        assert 0 < (grads[1].abs() > 0).float().mean() <= 1
    assert torch.equal(states[0], states[1])


def test_eval_mode_applies_no_dropout():
    layer = _layer("linear", dropout=0.5).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        fused = layer(x)
        with use_fused(False):
            eager = layer(x)
    assert torch.allclose(fused, eager, atol=1e-6)


def test_fused_saves_less_than_eager_with_dropout():
    """Eager keeps the mask and the dropped input; fused keeps x and the (N, r) projection only."""
    layer = _layer("linear", dropout=0.1, bias=False)
    x = torch.randn(64, 16)

    def saved_bytes(fused: bool) -> int:
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size() if t.data_ptr() != layer.weight.data_ptr() else 0)
            return t
        with use_fused(fused), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x.requires_grad_(True))
        return sum(total)
    eager, fused = saved_bytes(False), saved_bytes(True)
    assert fused < eager
    assert fused <= x.numel() * 4 + 64 * 4 * 4 + 4 * 16 * 4 + 24 * 4 * 4 + 10_000   # x, ax, A, B, rng


def test_fused_path_is_an_explicit_property_of_layer_and_delta():
    layer = _layer("linear")
    x = torch.randn(2, 16, requires_grad=True)
    assert layer.takes_fused_path() and _fused(layer(x).grad_fn)

    class EagerOnly(LoraLinear):                  # a layer whose math the kernel does not compute
        fused_kernel = False
    sub = EagerOnly(nn.Linear(16, 24))
    sub.add_adapter("default", 4, 8, 0.0, False, "gaussian")
    sub.set_active(["default"])
    assert not sub.takes_fused_path() and not _fused(sub(x).grad_fn)
    dora = LoraLinear(nn.Linear(16, 24))          # DoRA's delta is not plain s B A x
    dora.add_adapter("default", 4, 8, 0.0, False, "gaussian", dora=True)
    dora.set_active(["default"])
    assert not dora.takes_fused_path() and not _fused(dora(x).grad_fn)
    layer.add_adapter("other", 4, 8, 0.0, False, "gaussian")
    layer.set_active(["default", "other"])
    assert not _fused(layer(x).grad_fn)
    layer.set_active(["default"])
    layer.merge()
    assert not _fused(layer(x).grad_fn)


def test_whole_model_training_step_matches_eager(tiny, ids):
    cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules=["query", "value", "c_fc", "out"],
                             dropout=0.1)
    lorakit.apply_lora(tiny, cfg)
    randomize_adapters(tiny)
    tiny.train()
    grads = []
    for fused in (False, True):
        torch.manual_seed(11)
        with use_fused(fused):
            loss = tiny(ids).square().mean()
        tiny.zero_grad(set_to_none=True)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in tiny.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 16
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


def test_function_is_a_true_autograd_function():
    """gradcheck in float64: the hand-written backward is the derivative of the forward."""
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    for fif in (False, True):
        weight = (w.t().detach().clone().requires_grad_(True)) if fif else w
        assert torch.autograd.gradcheck(
            lambda *t: LoraLinearFunction.apply(*t, 0.5, 0.0, torch.float64, fif),
            (x, weight, b, a, bb))
