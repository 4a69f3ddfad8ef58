"""Adapters on disk: exact round trip for every layer type, the trainable flag, metadata, atomicity."""

import json

import pytest
import torch
from safetensors import safe_open

import lorakit
from conftest import ALL_TARGETS, TinyNet, randomize_adapters


def fresh():
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
@pytest.mark.parametrize("rslora", [False, True])
def test_round_trip_is_exact(tmp_path, ids, bias, rslora):
    model = fresh()
    cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules=ALL_TARGETS, bias=bias, rslora=rslora,
                             fused_slices={"qkv": [True, False, True]}, modules_to_save=["classifier"],
                             rank_pattern={"out": 2}, alpha_pattern={"query": 3.0})
    lorakit.apply_lora(model, cfg)
    randomize_adapters(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ".lora." not in name:         # biases and the head
                p.add_(torch.randn_like(p) * 0.1)
    expected = model(ids)
    lorakit.save_adapter(model, tmp_path / "adapter")
    loaded = lorakit.load_adapter(fresh(), tmp_path / "adapter")
    assert torch.equal(loaded(ids), expected)
    saved, reread = lorakit.lora_state_dict(model), lorakit.lora_state_dict(loaded)
    assert saved.keys() == reread.keys() and all(torch.equal(saved[k], reread[k]) for k in saved)
    assert lorakit.list_adapters(loaded)["default"] == cfg


def test_load_is_frozen_unless_trainable(tmp_path):
    model = lorakit.apply_lora(fresh(), lorakit.LoraConfig(target_modules=["query"]))
    lorakit.save_adapter(model, tmp_path)
    frozen = lorakit.load_adapter(fresh(), tmp_path)
    assert lorakit.trainable_parameters(frozen).trainable == 0
    resumed = lorakit.load_adapter(fresh(), tmp_path, trainable=True)
    assert lorakit.trainable_parameters(resumed).trainable == 2 * 8 * (16 + 16)


def test_file_layout_and_metadata(tmp_path):
    model = lorakit.apply_lora(fresh(), lorakit.LoraConfig(r=4, target_modules=["query", "embed", "c_fc"]))
    lorakit.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json",
                                                          "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["fan_in_fan_out"] is True
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        meta = json.loads(handle.metadata()["lorakit"])
    assert "base_model.model.layers.0.query.lora_A.weight" in keys
    assert "base_model.model.embed.lora_embedding_B" in keys
    assert meta["base_shapes"]["layers.1.c_fc"] == [16, 32]


def test_second_adapter_loads_beside_first(tmp_path, ids):
    model = lorakit.apply_lora(fresh(), lorakit.LoraConfig(target_modules=["query"]))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path)
    expected = model(ids)
    other = lorakit.apply_lora(fresh(), lorakit.LoraConfig(target_modules=["out"]), adapter_name="x")
    lorakit.load_adapter(other, tmp_path, adapter_name="rt")
    lorakit.set_adapter(other, "rt")
    assert torch.equal(other(ids), expected)


def test_save_leaves_no_temp_files_and_overwrites(tmp_path, ids):
    """Saving a different adapter into the same folder replaces both files: what loads back is the second
    adapter (its rank, its targets, its values), with nothing of the first left and no temp file."""
    first_cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules=["query", "value"])
    first = lorakit.apply_lora(fresh(), first_cfg)
    randomize_adapters(first, seed=1)
    lorakit.save_adapter(first, tmp_path)
    second_cfg = lorakit.LoraConfig(r=2, alpha=4, target_modules=["query"])
    second = lorakit.apply_lora(fresh(), second_cfg)
    randomize_adapters(second, seed=2)
    lorakit.save_adapter(second, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = lorakit.load_adapter(fresh(), tmp_path)
    saved, reread = lorakit.lora_state_dict(second), lorakit.lora_state_dict(loaded)
    assert saved.keys() == reread.keys() and all(torch.equal(saved[k], reread[k]) for k in saved)
    assert lorakit.list_adapters(loaded)["default"] == second_cfg
    assert torch.equal(loaded(ids), second(ids))
    assert not torch.equal(loaded(ids), first(ids))


def test_wrong_base_refused_before_any_change(tmp_path):
    model = lorakit.apply_lora(fresh(), lorakit.LoraConfig(target_modules=["query", "value"]))
    lorakit.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    other = TinyNet(d=24).eval()
    state = {k: v.clone() for k, v in other.state_dict().items()}
    kinds = [type(m) for m in other.modules()]
    with pytest.raises(lorakit.LoraError, match=r"layers\.0\.query.*\(16, 16\).*\(24, 24\)"):
        lorakit.load_adapter(other, tmp_path)
    assert [type(m) for m in other.modules()] == kinds
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())


def test_saved_config_describes_every_module_rank(tmp_path, ids):
    """Adapters whose modules differ in rank beyond what r / rank_pattern say (a combined adapter, a
    rank override) are saved with rank / alpha patterns, so the file's config agrees with its tensors
    (issue 16: loading refuses a config that disagrees) and PEFT reads the same scales."""
    model = fresh()
    lorakit.apply_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["query", "value"]),
                       ranks={"layers.0.query": 2, "layers.1.value": 6})
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["rank_pattern"] == {"layers.0.query": 2, "layers.1.value": 6}
    assert saved["alpha_pattern"] == {} and model.layers[0].query.lora["default"].scale == 4
    loaded = lorakit.load_adapter(fresh(), tmp_path)
    assert torch.equal(loaded(ids), model.eval()(ids))
