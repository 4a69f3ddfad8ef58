"""torch.compile: LoRA layers trace without graph breaks, and a compiled training step is the eager one.

Graph breaks are counted with ``torch._dynamo.explain`` (tracing only, no code generation, so fast).
The compiled-step checks use the ``aot_eager`` backend: it traces forward and backward exactly as
Inductor would receive them, without spending minutes generating C++ on a 2-core CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from conftest import Conv1D, randomize_adapters, tiny_bert

transformers = pytest.importorskip("transformers")


def _mlp(dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), Conv1D(8, 32))
    lorakit.apply_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["0", "2"],
                                                 dropout=dropout))
    randomize_adapters(model)
    return model


def _breaks(module, *args) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(module)(*args).graph_break_count


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_lora_layers_have_no_graph_breaks(mode):
    model = _mlp().train(mode == "train")
    x = torch.randn(4, 16)
    assert _breaks(model[0], x) == 0                      # one LoraLinear
    assert _breaks(model, x) == 0                         # Linear and Conv1D layouts
    lorakit.add_adapter(model, "other", lorakit.LoraConfig(r=2, target_modules=["0", "2"]))
    lorakit.set_adapter(model, ["default", "other"])      # two active adapters summed
    assert _breaks(model, x) == 0
    model.eval()
    with lorakit.mixed_adapters(model, ["default", None, "other", "default"]):
        assert _breaks(model, x) == 0


def test_lora_adds_no_graph_breaks_to_a_transformer():
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 7))
    bare = _breaks(model, ids)
    lorakit.apply_lora(model, lorakit.LoraConfig(r=4, target_modules=["query", "value"], dropout=0.1))
    assert _breaks(model, ids) == bare == 0


def test_compiled_training_step_matches_eager():
    grads = []
    for compiled in (False, True):
        model = _mlp(dropout=0.0)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
        run(x).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 4
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_train_with_compile_setting(tmp_path, monkeypatch):
    """TrainSettings(compile=True) trains a compiled model and hands back the plain module."""
    from test_train_loop import SETTINGS, run
    calls = []

    def compile_(fn, **kw):
        calls.append(fn)
        return original(fn, backend="aot_eager")
    original = torch.compile
    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    plain_model, plain = run(tmp_path / "plain", settings=SETTINGS.replace(max_steps=10))
    model, compiled = run(tmp_path / "compiled", settings=SETTINGS.replace(max_steps=10, compile=True))
    assert compiled["settings"]["compile"] is True and len(calls) == 1
    assert model._compiled_call_impl is None
    assert abs(compiled["history"][-1]["train_loss"] - plain["history"][-1]["train_loss"]) < 1e-4
    for (name, p), q in zip(model.named_parameters(), plain_model.parameters()):
        assert torch.allclose(p, q, atol=1e-4), name


def _sixteen_adapters():
    model = _mlp(dropout=0.0).eval()
    for i in range(15):
        lorakit.add_adapter(model, f"a{i}", lorakit.LoraConfig(r=2 + i % 3, alpha=4,
                                                               target_modules=["0", "2"]))
    randomize_adapters(model, seed=3)
    return model, ["default"] + [f"a{i}" for i in range(15)]


def _count_compiles(model, names, x):
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward
    torch._dynamo.reset()
    run = torch.compile(model, backend=backend)
    outs = {}
    for name in names:
        lorakit.set_adapter(model, name)
        outs[name] = run(x)
    return len(compiles), outs


def test_switching_16_adapters_under_compile_compiles_once():
    """Issue 16, item 8: prepare_compiled_switching keeps the active factors in fixed tensors, so
    set_adapter under torch.compile changes no guard; each adapter still gives its own eager output."""
    model, names = _sixteen_adapters()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    eager = {}
    for name in names:
        lorakit.set_adapter(model, name)
        eager[name] = model(x)
    plain_compiles, _ = _count_compiles(model, names, x)
    lorakit.prepare_compiled_switching(model, max_rank=9)
    compiles, outs = _count_compiles(model, names, x)
    print(f"\ncompilations for 16 adapter switches: {plain_compiles} without slots, {compiles} with")
    assert compiles == 1 and plain_compiles > 1
    for name in names:
        assert torch.allclose(outs[name], eager[name], atol=1e-6), name
    assert len({round(outs[n].sum().item(), 4) for n in names}) == 16
    lorakit.set_adapter(model, ["a0", "a1"])           # two active: summed in the slot, rank 2 + 3
    with pytest.raises(lorakit.LoraError, match="max_rank=13"):
        lorakit.set_adapter(model, ["a0", "a1", "a2", "default"])
    assert lorakit.active_adapters(model) == ["a0", "a1"]
    lorakit.end_compiled_switching(model)
    lorakit.set_adapter(model, "a5")
    assert torch.allclose(model(x), eager["a5"], atol=1e-6)
