"""Invariants of the LoRA math on every layer type: zero delta at init, merged == unmerged,
idempotent merge, exact-up-to-the-bound unmerge, gradients only where they belong."""

import math

import pytest
import torch
from torch import nn

import lorakit
from conftest import ALL_TARGETS, randomize_adapters

FUSED = {"qkv": [True, False, True]}


def config(**kw):
    base = dict(r=4, alpha=8, target_modules=ALL_TARGETS, fused_slices=FUSED)
    return lorakit.LoraConfig(**{**base, **kw})


@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_zero_delta_at_init(tiny, ids, init):
    before = tiny(ids)
    lorakit.apply_lora(tiny, config(init=init))
    assert torch.equal(tiny(ids), before)
    for _, layer in lorakit.lora_layers(tiny):
        delta = layer.lora["default"]
        assert torch.count_nonzero(layer.delta_weight(delta)) == 0
        assert delta.A.abs().sum() + delta.B.abs().sum() > 0, "one factor must be random"


def _init_draws(init: str, r: int, fan_in: int) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(fan_in, 8))
    lorakit.apply_lora(model, lorakit.LoraConfig(r=r, target_modules=["0"], init=init))
    return model[0].lora["default"].A.detach().flatten()


def test_gaussian_init_std_is_one_over_r():
    """A ~ N(0, 1/r^2), PEFT's 'gaussian'. A is (16, 1024): with n = 16,384 draws the sample std is
    within 1/sqrt(2n) = 0.55% of the true one (one sigma), so a 3% tolerance is 5 sigma. Kaiming-uniform
    (a = sqrt 5) has std 1/sqrt(3 * fan_in) = 0.018, 3.5x below 1/r = 0.0625: both are measured and must
    lie more than 20 tolerances apart. A uniform draw with the right std is caught by its excess kurtosis
    (-1.2 against the normal's 0; the estimate's sd is sqrt(24/n) = 0.04 here)."""
    r, fan_in = 16, 1024
    gaussian, kaiming = _init_draws("gaussian", r, fan_in), _init_draws("kaiming", r, fan_in)
    tol = 0.03 / r
    kaiming_std = 1 / math.sqrt(3 * fan_in)
    assert abs(gaussian.std().item() - 1 / r) < tol
    assert abs(kaiming.std().item() - kaiming_std) < 0.03 * kaiming_std
    assert abs(kaiming.std().item() - 1 / r) > 20 * tol
    assert abs(gaussian.mean().item()) < 5 / (r * math.sqrt(gaussian.numel()))
    z = (gaussian - gaussian.mean()) / gaussian.std()
    assert abs((z ** 4).mean().item() - 3) < 0.3


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_merged_equals_unmerged(tiny, ids, rslora, bias):
    tiny.eval()
    base = tiny(ids)
    lorakit.apply_lora(tiny, config(rslora=rslora, bias=bias))
    randomize_adapters(tiny)
    unmerged = tiny(ids)
    assert (unmerged - base).abs().max() > 1e-2, "the adapter must change the output"
    lorakit.merge_lora(tiny)
    merged = tiny(ids)
    assert (merged - unmerged).abs().max() < 1e-5


def test_scale_alpha_over_r_and_rslora(tiny):
    lorakit.apply_lora(tiny, config(r=16, alpha=32, target_modules=["out"]))
    assert tiny.layers[0].out.lora["default"].scale == 2.0
    torch.manual_seed(0)
    other = type(tiny)()
    lorakit.apply_lora(other, config(r=16, alpha=32, rslora=True, target_modules=["out"]))
    assert other.layers[0].out.lora["default"].scale == 8.0


def test_forward_is_the_formula(tiny):
    """h = W0 x + b + s B A x, written out by hand for one Linear and the GPT-2 Conv1D."""
    lorakit.apply_lora(tiny, config(target_modules=["query", "c_fc"]))
    randomize_adapters(tiny)
    x = torch.randn(5, 16)
    q = tiny.layers[0].query
    d = q.lora["default"]
    expected = x @ q.weight.T + q.bias + d.scale * (x @ d.A.T @ d.B.T)
    assert torch.allclose(q(x), expected, atol=1e-6)
    c = tiny.layers[0].c_fc
    d = c.lora["default"]
    expected = x @ c.weight + c.bias + d.scale * (x @ d.A.T @ d.B.T)
    assert torch.allclose(c(x), expected, atol=1e-6)


def test_fused_slices_leave_disabled_slice_alone(tiny):
    lorakit.apply_lora(tiny, config(target_modules=["qkv"]))
    randomize_adapters(tiny)
    layer = tiny.layers[0].qkv
    dw = layer.delta_weight(layer.lora["default"])
    assert torch.count_nonzero(dw[16:32]) == 0                   # k slice untouched
    assert torch.count_nonzero(dw[:16]) > 0 and torch.count_nonzero(dw[32:]) > 0
    x = torch.randn(3, 16)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.allclose(layer(x)[:, 16:32], base[:, 16:32], atol=1e-6)
    assert torch.allclose(layer(x), base + x @ dw.T, atol=1e-5)


def test_merge_idempotent_and_unmerge_restores_within_bound(tiny, ids):
    original = {k: v.clone() for k, v in tiny.state_dict().items()}
    lorakit.apply_lora(tiny, config())
    randomize_adapters(tiny)
    lorakit.merge_lora(tiny)
    once = {k: v.clone() for k, v in tiny.state_dict().items()}
    lorakit.merge_lora(tiny)
    assert all(torch.equal(once[k], v) for k, v in tiny.state_dict().items())
    lorakit.unmerge_lora(tiny)
    lorakit.unmerge_lora(tiny)
    u = 2.0 ** -24
    for name, layer in lorakit.lora_layers(tiny):
        w0 = original[f"{name}.weight"]
        bound = u * (2 * w0.abs() + layer.delta_weight(layer.lora["default"]).abs())
        assert ((layer.weight - w0).abs() <= bound + 1e-30).all(), name


def test_unmerge_bound_holds_in_bf16(tiny):
    lorakit.apply_lora(tiny, config(target_modules=["query", "out"]))
    randomize_adapters(tiny)
    tiny.to(torch.bfloat16)
    layer = tiny.layers[0].out
    w0 = layer.weight.detach().clone()
    lorakit.merge_lora(tiny)
    assert layer.weight.dtype == torch.bfloat16 and not torch.equal(layer.weight, w0)
    lorakit.unmerge_lora(tiny)
    dw = layer.delta_weight(layer.lora["default"])
    bound = 2.0 ** -8 * (2 * w0.float().abs() + dw.abs())
    assert ((layer.weight.float() - w0.float()).abs() <= bound).all()


def test_merge_is_explicit_not_hidden_in_eval(tiny, ids):
    """loralib merges on ``.eval()``; here only merge_lora merges. Checked right after ``.eval()``: no
    adapter is marked merged, every base weight is bit-identical, and the output is bit-identical to the
    train-mode output (dropout is 0, so only a different computation, such as the merged weight, could
    change a bit), while the adapters do change it."""
    lorakit.apply_lora(tiny, config())
    randomize_adapters(tiny)
    weights = {name: layer.weight.detach().clone() for name, layer in lorakit.lora_layers(tiny)}
    tiny.train()
    with torch.no_grad():
        train_out = tiny(ids)
    tiny.eval()
    layers = dict(lorakit.lora_layers(tiny))
    assert all(not layer.merged_adapters for layer in layers.values())
    assert all(torch.equal(layer.weight, weights[name]) for name, layer in layers.items())
    with torch.no_grad():
        eval_out = tiny(ids)
        assert torch.equal(eval_out, train_out)
        with lorakit.disable_adapter(tiny):
            assert (tiny(ids) - eval_out).abs().max() > 1e-2, "the adapters must change the output"
    tiny.train()
    assert all(not layer.merged_adapters for layer in layers.values())


def test_safe_merge_refuses_nan_and_changes_nothing(tiny):
    lorakit.apply_lora(tiny, config())
    randomize_adapters(tiny)
    with torch.no_grad():
        tiny.layers[1].out.lora["default"].B[0, 0] = float("nan")
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    with pytest.raises(lorakit.LoraError, match="NaN"):
        lorakit.merge_lora(tiny)
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) or before[k].isnan().any() for k in before)
    assert all(not layer.merged_adapters for _, layer in lorakit.lora_layers(tiny))


def test_bf16_merge_computes_delta_in_fp32(tiny):
    """A delta far below bf16's resolution of W is lost if summed in bf16, kept if summed in fp32
    first and rounded once: the merged weight must equal round_bf16(W + dW)."""
    lorakit.apply_lora(tiny, config(target_modules=["out"]))
    randomize_adapters(tiny, std=0.05)
    tiny.to(torch.bfloat16)
    layer = tiny.layers[0].out
    w0 = layer.weight.detach().clone()
    expected = (w0.float() + layer.delta_weight(layer.lora["default"])).to(torch.bfloat16)
    lorakit.merge_lora(tiny)
    assert torch.equal(layer.weight, expected)


def test_only_adapter_params_train_and_they_get_gradients(tiny, ids):
    lorakit.apply_lora(tiny, config(modules_to_save=["classifier"]))
    randomize_adapters(tiny)
    tiny(ids).sum().backward()
    for name, p in tiny.named_parameters():
        is_adapter = ".lora.default." in name or "modules_to_save.default" in name
        assert p.requires_grad == is_adapter, name
        if is_adapter:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("bias, expected", [("none", 0), ("lora_only", 6), ("all", 13)])
def test_bias_modes_choose_trainable_biases(tiny, bias, expected):
    """all = every bias in the model (LayerNorm too, as PEFT); lora_only = adapted layers with one."""
    lorakit.apply_lora(tiny, config(target_modules=["query", "qkv", "c_fc"], bias=bias))
    trainable_biases = [n for n, p in tiny.named_parameters() if n.endswith("bias") and p.requires_grad]
    assert len(trainable_biases) == expected, trainable_biases


def test_base_state_dict_keys_stay_stable(tiny):
    keys = set(tiny.state_dict())
    lorakit.apply_lora(tiny, config())
    assert keys <= set(tiny.state_dict())
    assert all(".lora." in k for k in set(tiny.state_dict()) - keys)


def test_merge_and_unload_gives_plain_modules_same_outputs(tiny, ids):
    lorakit.apply_lora(tiny, config(modules_to_save=["classifier"]))
    randomize_adapters(tiny)
    with torch.no_grad():
        tiny.classifier.modules_to_save["default"].weight.mul_(2)
    expected = tiny(ids)
    plain = lorakit.merge_and_unload(tiny)
    assert not any("Lora" in type(m).__name__ or "ModulesToSave" in type(m).__name__
                   for m in plain.modules())
    assert type(plain.layers[0].query) is nn.Linear
    assert (plain(ids) - expected).abs().max() < 1e-5


def test_print_shows_lora_modules(tiny):
    lorakit.apply_lora(tiny, config(target_modules=["query"]))
    text = str(tiny)
    assert "LoraLinear" in text and "r=4" in text and "default*" in text


def test_dropout_only_in_train_mode(tiny, ids):
    lorakit.apply_lora(tiny, config(dropout=0.5))
    randomize_adapters(tiny, std=0.5)
    tiny.eval()
    assert torch.equal(tiny(ids), tiny(ids))
    tiny.train()
    torch.manual_seed(0)
    a = tiny(ids)
    torch.manual_seed(1)
    assert not torch.equal(a, tiny(ids))


def test_merge_inside_autocast_keeps_fp32_math():
    """A merge inside torch.autocast(bf16) must still form s B A in fp32: unmerge restores W0 within
    the fp32 bound (bf16 products would leave errors near 1e-3)."""
    layer = nn.Linear(64, 64)
    w0 = layer.weight.detach().clone()
    model = nn.Sequential(layer)
    lorakit.apply_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["0"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    delta = model[0].delta_weight(model[0].lora["default"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lorakit.merge_lora(model)
    assert torch.allclose(model[0].weight, w0 + delta, atol=1e-5)
    lorakit.unmerge_lora(model)
    bound = 2.0 ** -24 * (2 * w0.abs() + delta.abs())
    assert ((model[0].weight - w0).abs() <= bound + 1e-30).all()
