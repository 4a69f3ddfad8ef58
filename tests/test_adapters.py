"""A library of adapters on one model: add, switch, disable, delete; each with its own head."""

import pytest
import torch

import lorakit
from conftest import randomize_adapters


def cfg(**kw):
    return lorakit.LoraConfig(**{**dict(r=4, alpha=8, target_modules=["query", "out"]), **kw})


def test_switching_gives_each_adapters_own_outputs(tiny, ids):
    tiny.eval()
    base = tiny(ids)
    lorakit.apply_lora(tiny, cfg(), adapter_name="a")
    randomize_adapters(tiny, seed=1)
    out_a = tiny(ids)
    lorakit.add_adapter(tiny, "b", cfg(r=2))
    assert lorakit.active_adapters(tiny) == ["a"], "a new adapter is added inactive"
    assert torch.equal(tiny(ids), out_a)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(tiny):
            layer.lora["b"].B.normal_()
    lorakit.set_adapter(tiny, "b")
    out_b = tiny(ids)
    assert (out_b - out_a).abs().max() > 1e-3 and (out_b - base).abs().max() > 1e-3
    lorakit.set_adapter(tiny, "a")
    assert torch.equal(tiny(ids), out_a)
    with lorakit.disable_adapter(tiny):
        assert torch.equal(tiny(ids), base)
    assert torch.equal(tiny(ids), out_a)


def test_only_active_adapter_trains(tiny):
    lorakit.apply_lora(tiny, cfg(), adapter_name="a")
    lorakit.add_adapter(tiny, "b", cfg())
    lorakit.set_adapter(tiny, "b")
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert trainable and all(".lora.b." in n for n in trainable)


def test_two_active_adapters_sum(tiny, ids):
    tiny.eval()
    base = tiny.layers[0].out.weight.detach().clone()
    lorakit.apply_lora(tiny, cfg(target_modules=["out"]), adapter_name="a")
    lorakit.add_adapter(tiny, "b", cfg(target_modules=["out"]))
    randomize_adapters(tiny)
    lorakit.set_adapter(tiny, ["a", "b"])
    layer = tiny.layers[0].out
    x = torch.randn(2, 32)
    expected = torch.nn.functional.linear(x, base, layer.bias) + \
        layer.lora_forward(x, layer.lora["a"]) + layer.lora_forward(x, layer.lora["b"])
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_each_adapter_has_its_own_head(tiny, ids):
    tiny.eval()
    lorakit.apply_lora(tiny, cfg(modules_to_save=["classifier"]), adapter_name="a")
    lorakit.add_adapter(tiny, "b", cfg(modules_to_save=["classifier"]))
    with torch.no_grad():
        tiny.classifier.modules_to_save["b"].weight.fill_(0.5)
    out_a = tiny(ids)
    lorakit.set_adapter(tiny, "b")
    assert not torch.equal(tiny(ids), out_a)
    assert tiny.classifier.weight is tiny.classifier.modules_to_save["b"].weight
    lorakit.set_adapter(tiny, "a")
    assert torch.equal(tiny(ids), out_a)


def test_delete_adapter(tiny, ids):
    tiny.eval()
    lorakit.apply_lora(tiny, cfg(), adapter_name="a")
    lorakit.add_adapter(tiny, "b", cfg())
    out_a = tiny(ids)
    lorakit.delete_adapter(tiny, "b")
    assert list(lorakit.list_adapters(tiny)) == ["a"]
    assert all("b" not in layer.lora for _, layer in lorakit.lora_layers(tiny))
    assert torch.equal(tiny(ids), out_a)


def test_disable_adapter_on_merged_model(tiny, ids):
    tiny.eval()
    base = tiny(ids)
    lorakit.apply_lora(tiny, cfg())
    randomize_adapters(tiny)
    lorakit.merge_lora(tiny)
    merged = tiny(ids)
    with lorakit.disable_adapter(tiny):
        assert (tiny(ids) - base).abs().max() < 1e-5
    assert (tiny(ids) - merged).abs().max() < 1e-5
    assert all(layer.merged_adapters for _, layer in lorakit.lora_layers(tiny))


def test_switch_refused_while_merged(tiny):
    lorakit.apply_lora(tiny, cfg(), adapter_name="a")
    lorakit.add_adapter(tiny, "b", cfg())
    lorakit.merge_lora(tiny)
    with pytest.raises(lorakit.LoraError, match="unmerge_lora"):
        lorakit.set_adapter(tiny, "b")
    assert lorakit.active_adapters(tiny) == ["a"]
