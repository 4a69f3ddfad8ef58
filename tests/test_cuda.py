"""The LoRA invariants again, on a CUDA device, in fp32 and under bf16 autocast (``make gpu-check``).

Every test here is marked ``cuda``: conftest skips them where ``torch.cuda.is_available()`` is False and
scripts/run_tests.sh deselects them there. TF32 is switched off for the module (cuDNN convolutions use
it by default), so "fp32" means fp32 and the fp32 tolerances are the CPU suite's.

Tolerances are relative, max |a - b| / max |b|: fp32 1e-5 (summation order only); bf16 3e-2, from the
bf16 rounding of each matmul's inputs and output (2^-8 relative) through a few layers, measured on CPU
autocast at 1.4% at most (merged vs unmerged). Every comparison with a tolerance first checks that the
adapters move the output by several times it, so a dropped or misapplied adapter cannot pass.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import lorakit
from conftest import ALL_TARGETS, TinyNet, randomize_adapters, tiny_bert
from lorakit.layers import use_fused

pytestmark = pytest.mark.cuda

DEVICE = torch.device("cuda")
PRECISIONS = ["fp32", "bf16"]
RTOL = {"fp32": 1e-5, "bf16": 3e-2}
FUSED = {"qkv": [True, False, True]}


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def amp(precision: str):
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def tiny_on_device() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().to(DEVICE)


def ids_on_device() -> torch.Tensor:
    return torch.randint(0, 20, (4, 7), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def config(**kw) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(**{"r": 4, "alpha": 8, "target_modules": ALL_TARGETS, "fused_slices": FUSED,
                                 **kw})


def rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|, in fp32 on the CPU."""
    a, ref = a.detach().float().cpu(), ref.detach().float().cpu()
    return ((a - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_zero_delta_at_init(precision):
    model, ids = tiny_on_device().eval(), ids_on_device()
    with torch.no_grad(), amp(precision):
        before = model(ids)
        lorakit.apply_lora(model, config())
        after = model(ids)
    layers = lorakit.lora_layers(model)
    assert layers
    for name, layer in layers:
        delta = layer.lora["default"]
        assert delta.A.device.type == DEVICE.type and delta.A.dtype == torch.float32, name
        assert torch.count_nonzero(layer.delta_weight(delta)) == 0, name
        assert delta.A.abs().sum() + delta.B.abs().sum() > 0, "one factor must be random"
    assert rel_diff(after, before) <= RTOL[precision]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_merged_equals_unmerged_and_unmerge_restores(precision):
    model, ids = tiny_on_device().eval(), ids_on_device()
    with torch.no_grad(), amp(precision):
        base = model(ids)
    lorakit.apply_lora(model, config())
    randomize_adapters(model, std=0.3)
    weights = {name: layer.weight.detach().clone() for name, layer in lorakit.lora_layers(model)}
    with torch.no_grad(), amp(precision):
        unmerged = model(ids)
    assert rel_diff(unmerged, base) > 10 * RTOL[precision], "the adapters must change the output"
    lorakit.merge_lora(model)              # outside autocast, which would run B @ A in bf16
    with torch.no_grad(), amp(precision):
        merged = model(ids)
    assert rel_diff(merged, unmerged) <= RTOL[precision]
    lorakit.unmerge_lora(model)
    u = 2.0 ** -24                                     # the weights stay fp32; autocast casts copies
    for name, layer in lorakit.lora_layers(model):
        w0 = weights[name]
        bound = u * (2 * w0.abs() + layer.delta_weight(layer.lora["default"]).abs())
        assert ((layer.weight - w0).abs() <= bound + 1e-30).all(), name


@pytest.mark.parametrize("precision", PRECISIONS)
def test_only_adapter_factors_get_gradients(precision):
    model, ids = tiny_on_device().train(), ids_on_device()
    lorakit.apply_lora(model, config())
    randomize_adapters(model)
    with amp(precision):
        out = model(ids)
    out.float().square().sum().backward()
    for name, p in model.named_parameters():
        if ".lora." in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
            assert p.grad.device.type == DEVICE.type, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fused_and_eager_paths_agree(precision):
    """The fused autograd Function against the eager reference layer: outputs in the same precision, and
    factor gradients against the eager fp32 ones. In bf16 the fused path computes the low-rank backward
    from an fp32 copy of dy (measured within 1.3% of fp32 on CPU), while eager autocast runs it in bf16
    (up to 18% off there), so the bf16 gradients are held to the fp32 reference, not to eager bf16."""
    model, ids = tiny_on_device().train(), ids_on_device()
    lorakit.apply_lora(model, config(target_modules=["query", "value", "out"]))
    randomize_adapters(model, std=0.3)
    weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(5)).to(DEVICE)

    def run(fused: bool, prec: str):
        model.zero_grad(set_to_none=True)
        with use_fused(fused), amp(prec):
            out = model(ids)
        (out.float() * weight).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused_out, fused_grads = run(True, precision)
    eager_out, _ = run(False, precision)
    _, reference_grads = run(False, "fp32")
    with torch.no_grad(), lorakit.disable_adapter(model), amp(precision):
        base = model(ids)
    assert rel_diff(eager_out, base) > 10 * RTOL[precision], "the adapters must change the output"
    assert rel_diff(fused_out, eager_out) <= RTOL[precision]
    assert fused_grads.keys() == reference_grads.keys() and len(reference_grads) == 2 * 3 * 2
    for name, expected in reference_grads.items():
        err = rel_diff(fused_grads[name], expected)
        assert err <= (1e-4 if precision == "fp32" else 5e-2), (name, err)


def test_save_on_cuda_load_on_cpu(tmp_path):
    model, ids = tiny_on_device().eval(), ids_on_device()
    lorakit.apply_lora(model, config(modules_to_save=["classifier"]))
    randomize_adapters(model)
    with torch.no_grad():
        expected = model(ids).cpu()
    lorakit.save_adapter(model, tmp_path / "adapter")
    torch.manual_seed(0)
    on_cpu = lorakit.load_adapter(TinyNet().eval(), tmp_path / "adapter")
    saved, reread = lorakit.lora_state_dict(model), lorakit.lora_state_dict(on_cpu)
    assert saved.keys() == reread.keys()
    assert all(reread[k].device.type == "cpu" and torch.equal(saved[k].cpu(), reread[k]) for k in saved)
    with torch.no_grad():
        assert rel_diff(on_cpu(ids.cpu()), expected) <= RTOL["fp32"]
    back = lorakit.load_adapter(tiny_on_device().eval(), tmp_path / "adapter")
    assert all(p.device.type == DEVICE.type for p in back.parameters())
    with torch.no_grad():
        assert rel_diff(back(ids), expected) <= RTOL["fp32"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_mixed_adapter_batch_on_cuda(precision):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tiny_bert().eval().to(DEVICE)
    lorakit.apply_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["query", "value"]),
                       adapter_name="a")
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(r=8, alpha=8, target_modules=["query", "value"]))
    lorakit.add_adapter(model, "c", lorakit.LoraConfig(r=2, alpha=4, target_modules=["value", "dense"]))
    randomize_adapters(model, std=0.5)
    rows = ["a", "b", None, "c", "a"]
    ids = torch.randint(0, 100, (len(rows), 9), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad(), amp(precision):
        with lorakit.mixed_adapters(model, rows):
            mixed = model(ids).last_hidden_state
        for i, name in enumerate(rows):
            with lorakit.disable_adapter(model):
                base = model(ids[i:i + 1]).last_hidden_state[0]
            if name is None:
                alone = base
            else:
                lorakit.set_adapter(model, name)
                alone = model(ids[i:i + 1]).last_hidden_state[0]
                assert rel_diff(alone, base) > 5 * RTOL[precision], (i, name)
            assert rel_diff(mixed[i], alone) <= RTOL[precision], (i, name)


def test_train_command_quick_on_cuda(tmp_path):
    """``lorakit train --device cuda``: 20 bf16 LoRA steps on text-cls (pretrained MiniLM) learn something."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lorakit", "train", "--task", "text-cls", "--method", "lora", "--quick",
           "--device", "cuda", "--max-steps", "20", "--eval-every", "10", "--no-progress", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["device"].startswith("cuda") and result["steps"] == 20
    best = result["best"]
    assert math.isfinite(best["val_loss"]) and best["val_accuracy"] > 0.55, best
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
