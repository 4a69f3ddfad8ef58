"""Which modules get LoRA: suffixes, regex, all-linear, exclusions, layer selection, strict errors."""

import pytest

import lorakit
from conftest import TinyNet
from lorakit.targeting import layer_index


def targets(model, **kw):
    plan = lorakit.plan_lora(model, lorakit.LoraConfig(**kw))
    return [row.name for row in plan.rows]


def test_suffix_match(tiny):
    assert targets(tiny, target_modules=["query"]) == ["layers.0.query", "layers.1.query"]


def test_regex_is_full_match(tiny):
    assert targets(tiny, target_modules=r"layers\.1\.(query|value)") == ["layers.1.query", "layers.1.value"]


def test_all_linear_skips_head_and_saved_modules(tiny):
    names = targets(tiny, target_modules="all-linear", modules_to_save=["classifier"])
    assert "classifier" not in names
    assert {"layers.0.query", "layers.0.value", "layers.0.qkv", "layers.0.c_fc", "layers.0.out"} <= set(names)
    assert not any("embed" in n or "conv" == n for n in names)


def test_all_linear_skips_output_embeddings():
    class WithHead(TinyNet):
        def get_output_embeddings(self):
            return self.classifier

    assert "classifier" not in targets(WithHead(), target_modules="all-linear")


def test_exclude_and_layers_to_transform(tiny):
    assert targets(tiny, target_modules=["query", "value"], exclude_modules=["value"]) == \
        ["layers.0.query", "layers.1.query"]
    assert targets(tiny, target_modules=["query"], layers_to_transform=[1]) == ["layers.1.query"]
    assert targets(tiny, target_modules=["query"], layers_to_transform=1, layers_pattern="layers") == \
        ["layers.1.query"]


def test_layer_index_parsing():
    assert layer_index("encoder.layer.3.attention.self.query", None) == 3
    assert layer_index("model.layers.11.self_attn.q_proj", None) == 11
    assert layer_index("transformer.h.0.attn.c_attn", None) == 0
    assert layer_index("classifier", None) is None


def test_strict_names_the_unmatched_pattern_and_suggests(tiny):
    with pytest.raises(lorakit.LoraError, match=r"\['qeury'\].*did you mean \['query'") as err:
        lorakit.plan_lora(tiny, lorakit.LoraConfig(target_modules=["value", "qeury"]))
    assert "value" not in str(err.value).split("matched")[0]


def test_non_strict_warns_on_partial_match(tiny):
    with pytest.warns(UserWarning, match="qeury"):
        names = targets(tiny, target_modules=["value", "qeury"], strict=False)
    assert names == ["layers.0.value", "layers.1.value"]


def test_unsupported_type_is_named(tiny):
    with pytest.raises(lorakit.LoraError, match="LayerNorm"):
        lorakit.plan_lora(tiny, lorakit.LoraConfig(target_modules=["norm"]))
    with pytest.raises(lorakit.LoraError, match=r"Block.*layers\.0\.query"):
        lorakit.plan_lora(tiny, lorakit.LoraConfig(target_modules=r"layers\.0"))


def test_rank_and_alpha_pattern(tiny):
    plan = lorakit.plan_lora(tiny, lorakit.LoraConfig(
        r=4, alpha=8, target_modules=["query", "value"], rank_pattern={"value": 2},
        alpha_pattern={r"layers\.1\.query": 32}))
    rows = {row.name: row for row in plan.rows}
    assert rows["layers.0.value"].r == 2 and rows["layers.0.value"].scale == 4.0
    assert rows["layers.0.query"].scale == 2.0 and rows["layers.1.query"].scale == 8.0


def test_plan_changes_nothing_and_counts(tiny):
    before = [type(m) for m in tiny.modules()]
    plan = lorakit.plan_lora(tiny, lorakit.LoraConfig(r=4, target_modules=["query", "value"],
                                                      modules_to_save=["classifier"]))
    assert [type(m) for m in tiny.modules()] == before
    assert plan.lora_params == 4 * 4 * (16 + 16)
    assert plan.trainable_params == plan.lora_params + 32 * 3 + 3
    lorakit.apply_lora(tiny, lorakit.LoraConfig(r=4, target_modules=["query", "value"],
                                                modules_to_save=["classifier"]))
    report = lorakit.trainable_parameters(tiny)
    assert report.trainable == plan.trainable_params and report.total == plan.total_params
    assert "module" in plan.table() and "layers.0.query" in str(plan)
