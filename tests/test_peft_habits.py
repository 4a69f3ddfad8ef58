"""What a PEFT user does in the first hour keeps working (issue 16): multi-adapter state, PEFT's config
names, unload, the trainable-parameter report, dtype rules.

Each test names the PEFT habit it checks; every one failed on the code before the change it guards.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lorakit
from conftest import TinyNet, randomize_adapters


def fresh() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


def cfg(**kw) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(**{"r": 4, "alpha": 8, "target_modules": ["query", "value"], **kw})


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --- item 5: multi-adapter state ------------------------------------------------------------------
def test_new_inactive_adapter_is_frozen():
    """PEFT's add_adapter leaves the new adapter frozen until set_adapter: the optimizer's parameter
    groups must not grow with factors that never get a gradient."""
    model = lorakit.apply_lora(fresh(), cfg(modules_to_save=["classifier"]), adapter_name="a")
    before = trainable_names(model)
    lorakit.add_adapter(model, "b", cfg(r=2, dora=True, modules_to_save=["classifier"]))
    assert lorakit.active_adapters(model) == ["a"]
    assert trainable_names(model) == before
    assert all(".lora.a." in n or ".modules_to_save.a." in n for n in before)
    lorakit.set_adapter(model, "b")
    assert trainable_names(model) and all(".lora.b." in n or ".modules_to_save.b." in n
                                          for n in trainable_names(model))


def test_deleting_the_active_adapter_switches_to_a_remaining_one_with_a_warning(ids):
    model = lorakit.apply_lora(fresh(), cfg(), adapter_name="a")
    lorakit.add_adapter(model, "b", cfg(r=2))
    randomize_adapters(model)
    lorakit.set_adapter(model, "b")
    out_b = model(ids)
    lorakit.set_adapter(model, "a")
    with pytest.warns(UserWarning, match=r"'a' was active.*now 'b'"):
        lorakit.delete_adapter(model, "a")
    assert lorakit.active_adapters(model) == ["b"]
    assert all(layer.active_adapters == ["b"] for _, layer in lorakit.lora_layers(model))
    assert torch.equal(model(ids), out_b)
    assert trainable_names(model) and all(".lora.b." in n for n in trainable_names(model))


def test_deleting_one_of_two_active_adapters_keeps_the_other_silently():
    model = lorakit.apply_lora(fresh(), cfg(), adapter_name="a")
    lorakit.add_adapter(model, "b", cfg())
    lorakit.set_adapter(model, ["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.delete_adapter(model, "a")
    assert lorakit.active_adapters(model) == ["b"]


def test_deleting_the_last_adapter_warns_and_gives_back_the_plain_model(ids):
    model = fresh()
    base = model(ids)
    keys = set(model.state_dict())
    lorakit.apply_lora(model, cfg(modules_to_save=["classifier"]))
    randomize_adapters(model)
    with pytest.warns(UserWarning, match="no adapter is left"):
        lorakit.delete_adapter(model, "default")
    assert lorakit.active_adapters(model) == []
    assert torch.equal(model(ids), base)
    assert set(model.state_dict()) == keys and not lorakit.lora_layers(model)


# --- item 3: PEFT's configuration names ------------------------------------------------------------
PEFT_STYLE = dict(r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True, use_dora=False,
                  init_lora_weights="gaussian", task_type="CAUSAL_LM", target_modules=["q_proj"],
                  bias="none", fan_in_fan_out=False, inference_mode=False, modules_to_save=None)


def test_from_peft_and_from_dict_take_peft_names():
    cfg = lorakit.LoraConfig.from_peft(PEFT_STYLE)
    want = lorakit.LoraConfig(r=4, alpha=16, dropout=0.1, rslora=True, init="gaussian",
                              task_type="CAUSAL_LM", target_modules=["q_proj"])
    assert cfg == want == lorakit.LoraConfig.from_dict(PEFT_STYLE)
    assert lorakit.LoraConfig.from_dict({"r": 4, "lora_alpha": 16, "target_modules": ["q"]}).alpha == 16
    assert lorakit.LoraConfig.from_peft({"target_modules": ["q"]}).init == "kaiming"   # PEFT's True
    with pytest.raises(lorakit.LoraError, match="lora_alpha=16 and alpha=8"):
        lorakit.LoraConfig.from_dict({"lora_alpha": 16, "alpha": 8, "target_modules": ["q"]})


def test_from_peft_takes_peft_config_objects():
    peft = pytest.importorskip("peft")
    theirs = peft.LoraConfig(r=2, lora_alpha=5, target_modules={"q_proj", "v_proj"}, use_dora=True,
                             task_type=peft.TaskType.SEQ_CLS)
    cfg = lorakit.LoraConfig.from_peft(theirs)
    assert (cfg.r, cfg.alpha, cfg.target_modules, cfg.dora, cfg.task_type, cfg.lora_bias, cfg.init) == \
        (2, 5, ["q_proj", "v_proj"], True, "SEQ_CLS", False, "kaiming")
    assert lorakit.LoraConfig.from_peft(peft.LoraConfig(target_modules=["q"], lora_bias=True)).lora_bias
    with pytest.raises(lorakit.LoraError, match="lora_bias=True with dora=True"):
        lorakit.LoraConfig(target_modules=["q"], lora_bias=True, dora=True)


@pytest.mark.parametrize("option, value", [
    ("kasa_config", {"r": 4}), ("monteclora_config", {"num_samples": 2}),
    ("target_parameters", ["lin1.weight"]), ("trainable_token_indices", {"emb": [0]}),
    ("layer_replication", [[0, 1]]), ("init_lora_weights", "pissa"), ("init_lora_weights", "mica"),
    ("init_lora_weights", False), ("eva_config", {"rho": 2.0})])
def test_unimplemented_peft_options_are_refused_by_name(option, value):
    with pytest.raises(lorakit.LoraError, match=option):
        lorakit.LoraConfig.from_peft({"target_modules": ["q"], option: value})


def _llama(**overrides):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32, **overrides)
    return transformers.LlamaForCausalLM(config).eval()


def test_target_modules_none_picks_the_architecture_defaults_and_says_which(tmp_path):
    peft = pytest.importorskip("peft")
    with pytest.warns(UserWarning, match=r"\['q_proj', 'v_proj'\].*'llama'"):
        model = lorakit.apply_lora(_llama(), lorakit.LoraConfig.from_peft({"r": 4}))
    ours = sorted(n for n, _ in lorakit.lora_layers(model))
    theirs_model = peft.get_peft_model(_llama(), peft.LoraConfig(r=4))
    theirs = sorted(n.removeprefix("base_model.model.") for n, m in theirs_model.named_modules()
                    if hasattr(m, "lora_A") and len(m.lora_A))
    assert ours == theirs and len(ours) == 4
    assert lorakit.list_adapters(model)["default"].target_modules == ["q_proj", "v_proj"]
    lorakit.save_adapter(model, tmp_path)
    assert '"q_proj"' in (tmp_path / "adapter_config.json").read_text()


def test_target_modules_none_on_an_unknown_architecture_is_refused():
    model = fresh()
    with pytest.raises(lorakit.LoraError, match="model_type is None"):
        lorakit.apply_lora(model, lorakit.LoraConfig(target_modules=None))
    assert not lorakit.lora_layers(model)


def test_task_type_seq_cls_trains_the_head_as_peft_does():
    from conftest import tiny_bert
    torch.manual_seed(0)
    model = lorakit.apply_lora(tiny_bert("BertForSequenceClassification", num_labels=3),
                               lorakit.LoraConfig.from_peft({"task_type": "SEQ_CLS", "r": 4}))
    assert lorakit.list_adapters(model)["default"].modules_to_save == ["classifier"]
    assert model.classifier.weight.requires_grad


# --- item 4: the verbs PEFT users reach for ---------------------------------------------------------
def test_unload_removes_lora_without_merging(ids):
    model = fresh()
    base, keys = model(ids), set(model.state_dict())
    lorakit.apply_lora(model, cfg(modules_to_save=["classifier"], target_modules=["query", "qkv"]))
    randomize_adapters(model)
    lorakit.add_adapter(model, "other", cfg())
    lorakit.merge_lora(model)                     # merged adapters are subtracted first
    assert (model(ids) - base).abs().max() > 1e-3
    plain = lorakit.unload(model)
    assert plain is model and not lorakit.lora_layers(model) and lorakit.list_adapters(model) == {}
    assert set(model.state_dict()) == keys
    assert (model(ids) - base).abs().max() < 1e-5
    assert type(model.classifier) is torch.nn.Linear


def test_print_trainable_parameters_speaks_peft(capsys):
    peft = pytest.importorskip("peft")
    from conftest import tiny_bert
    torch.manual_seed(0)
    ours = lorakit.apply_lora(tiny_bert("BertForSequenceClassification", num_labels=3),
                              lorakit.LoraConfig(r=4, target_modules=["query", "value"],
                                                 modules_to_save=["classifier"]))
    lorakit.print_trainable_parameters(ours)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_bert("BertForSequenceClassification", num_labels=3),
                                 peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                 modules_to_save=["classifier"]))
    theirs.print_trainable_parameters()
    mine, peft_line = capsys.readouterr().out.strip().splitlines()
    assert mine == peft_line and mine.startswith("trainable params: ")
    assert lorakit.get_nb_trainable_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_dora_as_a_config_field_end_to_end(tmp_path):
    """LoraConfig(dora=True): trains (magnitude gets a gradient), saves in PEFT's format, loads in
    lorakit and PEFT with the same outputs, and merges exactly."""
    peft = pytest.importorskip("peft")
    model = lorakit.apply_lora(_llama(), lorakit.LoraConfig(r=4, alpha=8, dora=True,
                                                            target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, std=0.2)
    ids_ = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids_).logits.square().mean().backward()
    magnitudes = [p for n, p in model.named_parameters() if n.endswith("magnitude")]
    assert len(magnitudes) == 4 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in magnitudes)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids_).logits
    lorakit.save_adapter(model, tmp_path)
    ours = lorakit.load_adapter(_llama(), tmp_path)
    theirs = peft.PeftModel.from_pretrained(_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        assert (ours(input_ids=ids_).logits - want).abs().max() < 1e-5
        assert (theirs(input_ids=ids_).logits - want).abs().max() < 1e-5
        assert (lorakit.merge_and_unload(ours)(input_ids=ids_).logits - want).abs().max() < 1e-4


# --- item 9: dtype rules -----------------------------------------------------------------------------
@pytest.mark.parametrize("cast", ["half", "bfloat16", "to"])
def test_half_precision_model_keeps_lora_factors_fp32(cast, ids, tmp_path):
    model = lorakit.apply_lora(fresh(), cfg(dora=True, target_modules=["query", "out"],
                                            modules_to_save=["classifier"]))
    randomize_adapters(model)
    factors = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora." in n}
    model = model.half() if cast == "half" else model.bfloat16() if cast == "bfloat16" else \
        model.to(torch.bfloat16)
    low = torch.float16 if cast == "half" else torch.bfloat16
    assert model.layers[0].query.weight.dtype == low and model.classifier.weight.dtype == low
    for name, p in model.named_parameters():
        if ".lora." in name:
            assert p.dtype == torch.float32 and torch.equal(p, factors[name]), name
    model.train()
    out = model(ids)                                      # half base, fp32 factors: one forward
    assert out.dtype == low
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for n, p in model.named_parameters() if ".lora." in n and "layers.0" in n)
    lorakit.save_adapter(model, tmp_path / "as-held")
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "as-held" / "adapter_model.safetensors"))
    assert {v.dtype for k, v in saved.items() if "lora_" in k} == {torch.float32}
    lorakit.save_adapter(model, tmp_path / "small", dtype=torch.bfloat16)
    small = load_file(str(tmp_path / "small" / "adapter_model.safetensors"))
    assert {v.dtype for v in small.values()} == {torch.bfloat16}


def test_device_moves_still_apply_to_factors():
    model = lorakit.apply_lora(fresh(), cfg())
    layer = model.layers[0].query
    before = layer.lora["default"].A
    model.to("meta")
    assert before.device.type == "cpu" and layer.lora["default"].A.device.type == "meta"


# --- item 7: PEFT's stored base embedding weights ---------------------------------------------------
def test_peft_adapter_with_stored_embedding_weights(tmp_path):
    """PEFT's save_embedding_layers="auto" writes the base embed_tokens / lm_head weights too when they
    are targeted: accepted when they equal the model's, refused (model unchanged) when they differ."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["embed_tokens",
                                                                                "q_proj", "lm_head"]))
    randomize_adapters(theirs, std=0.2)
    theirs.save_pretrained(str(tmp_path))
    weights = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(weights)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in tensors
    ids_ = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    ours = lorakit.load_adapter(_llama(), tmp_path)
    with torch.no_grad():
        assert (ours(input_ids=ids_).logits - theirs.eval()(input_ids=ids_).logits).abs().max() < 1e-5
    tensors["base_model.model.model.embed_tokens.base_layer.weight"][5, 3] += 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.LoraError, match=r"base weight of 'model.embed_tokens'.*differs"):
        lorakit.load_adapter(model, tmp_path)
    assert not lorakit.lora_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
