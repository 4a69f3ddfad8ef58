"""combine_adapters: exactness of cat, reported errors against a direct dense computation, refusals."""

import copy

import pytest
import torch

from conftest import ALL_TARGETS, randomize_adapters, tiny_bert
from lorakit import (LoraConfig, LoraError, add_adapter, apply_lora, combine_adapters, lora_layers,
                     save_adapter, set_adapter)

FUSED = {"qkv": [True, False, True]}


def two_adapters(tiny, rank_b=2, alpha_b=3.0):
    """Adapters 'a' (r=4, alpha=8) and 'b' (r=rank_b) on every layer type, random non-zero factors."""
    apply_lora(tiny, LoraConfig(r=4, alpha=8, target_modules=ALL_TARGETS, fused_slices=FUSED), "a")
    add_adapter(tiny, "b", LoraConfig(r=rank_b, alpha=alpha_b, target_modules=ALL_TARGETS,
                                      fused_slices=FUSED))
    randomize_adapters(tiny, seed=3)
    return tiny


def dense_errors(model, weights, new_name):
    """||dW_new - sum_i w_i dW_i||_F / ||sum_i w_i dW_i||_F, overall, from each layer's own delta_weight."""
    err_sq = norm_sq = 0.0
    for _, layer in lora_layers(model):
        target = sum(w * layer.delta_weight(layer.lora[n]).double() for n, w in weights.items())
        got = layer.delta_weight(layer.lora[new_name]).double()
        err_sq += (got - target).norm().item() ** 2
        norm_sq += target.norm().item() ** 2
    return (err_sq / norm_sq) ** 0.5


def test_cat_is_exact_on_outputs(tiny, ids):
    weights = {"a": 0.7, "b": -1.3}
    model = two_adapters(tiny)
    reference = copy.deepcopy(model)              # each adapter's B scaled by its weight, both active
    with torch.no_grad():
        for _, layer in lora_layers(reference):
            for name, w in weights.items():
                layer.lora[name].B.mul_(w)
    set_adapter(reference, ["a", "b"])
    report = combine_adapters(model, weights, mode="cat")
    set_adapter(model, "combined")
    torch.testing.assert_close(model(ids), reference(ids), atol=1e-5, rtol=1e-5)
    assert report["rel_error"] < 1e-6
    assert report["rank"] == 6
    assert dense_errors(model, weights, "combined") < 1e-6


@pytest.mark.parametrize("mode", ["linear", "svd", "ties", "dare"])
def test_reported_error_matches_dense_computation(tiny, mode):
    model = two_adapters(tiny, rank_b=4, alpha_b=3.0)
    weights = {"a": 0.6, "b": 0.9}
    report = combine_adapters(model, weights, mode=mode, rank=3, density=0.7, seed=1)
    direct = dense_errors(model, weights, "combined")
    assert report["rel_error"] == pytest.approx(direct, rel=1e-4)
    assert report["rel_error"] > 1e-3                  # none of these is exact here
    assert set(report["modules"]) == {n for n, _ in lora_layers(model)}


def test_linear_has_cross_terms_that_vanish_for_one_adapter(tiny):
    model = two_adapters(tiny, rank_b=4)
    assert combine_adapters(model, {"a": 1.0, "b": 1.0}, mode="linear")["rel_error"] > 0.1
    # with one adapter there is no cross term: PEFT's linear is then exact
    single = combine_adapters(model, {"a": 2.0}, mode="linear", new_name="only_a")
    assert single["rel_error"] < 1e-6


def test_svd_with_full_rank_is_exact_and_truncation_is_optimal(tiny):
    model = two_adapters(tiny)
    full = combine_adapters(model, {"a": 1.0, "b": 0.5}, mode="svd", rank=6, new_name="full")
    assert full["rel_error"] < 1e-6
    low = combine_adapters(model, {"a": 1.0, "b": 0.5}, mode="svd", rank=1, new_name="low")
    layer = dict(lora_layers(model))["layers.0.query"]
    target = sum(w * layer.delta_weight(layer.lora[n]).double() for n, w in (("a", 1.0), ("b", 0.5)))
    s = torch.linalg.svdvals(target)                  # Eckart-Young: error = tail singular values
    expected = (s[1:].square().sum().sqrt() / s.square().sum().sqrt()).item()
    assert low["modules"]["layers.0.query"]["rel_error"] == pytest.approx(expected, rel=1e-6)


def test_ties_and_dare_sanity(tiny):
    model = two_adapters(tiny)
    weights = {"a": 1.0, "b": 1.0}
    # density 1 keeps everything: dare is then the plain sum, so with a high enough rank it is exact
    assert combine_adapters(model, weights, mode="dare", density=1.0, rank=6,
                            new_name="d1")["rel_error"] < 1e-6
    first = combine_adapters(model, weights, mode="dare", density=0.5, seed=0, new_name="d2")
    again = combine_adapters(model, weights, mode="dare", density=0.5, seed=0, new_name="d3")
    assert first["rel_error"] == again["rel_error"]                    # seeded
    # ties with one adapter and density 1: nothing to trim or disagree, so exact at full rank
    assert combine_adapters(model, {"a": 1.0}, mode="ties", density=1.0, rank=4,
                            new_name="t1")["rel_error"] < 1e-6
    sparse = combine_adapters(model, weights, mode="ties", density=0.2, rank=6, new_name="t2")
    dense = combine_adapters(model, weights, mode="ties", density=0.9, rank=6, new_name="t3")
    assert sparse["rel_error"] > dense["rel_error"]                    # more trimming, more error


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, dict(model._lorakit.configs)


@pytest.mark.parametrize("kwargs, message", [
    ({"weights": {"a": 1.0}, "mode": "magic"}, "unknown combination mode"),
    ({"weights": {"a": 1.0, "zzz": 1.0}}, "no adapter named 'zzz'"),
    ({"weights": {"a": 1.0, "b": 1.0}, "mode": "linear"}, "same rank"),
    ({"weights": {"a": 1.0}, "new_name": "b"}, "already exists"),
    ({"weights": {"a": 1.0}, "density": 0.0}, "density"),
    ({"weights": {"a": float("nan")}}, "finite"),
])
def test_refused_inputs_leave_model_unchanged(tiny, kwargs, message):
    model = two_adapters(tiny)
    before, configs = snapshot(model)
    with pytest.raises(LoraError, match=message):
        combine_adapters(model, **kwargs)
    after, configs_after = snapshot(model)
    assert after.keys() == before.keys() and configs_after == configs
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_different_module_sets_and_heads_are_refused(tiny):
    apply_lora(tiny, LoraConfig(r=2, target_modules=["query", "value"]), "a")
    add_adapter(tiny, "b", LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(LoraError, match="adapt different modules.*layers.0.value"):
        combine_adapters(tiny, {"a": 1.0, "b": 1.0})
    add_adapter(tiny, "h", LoraConfig(r=2, target_modules=["query", "value"],
                                      modules_to_save=["classifier"]))
    with pytest.raises(LoraError, match="heads"):
        combine_adapters(tiny, {"a": 1.0, "h": 1.0})
    assert sorted(tiny._lorakit.configs) == ["a", "b", "h"]


@pytest.mark.parametrize("mode", ["linear", "cat"])
def test_same_outputs_as_peft_add_weighted_adapter(tmp_path, mode):
    """PEFT 0.21's add_weighted_adapter on the same two saved adapters gives the same model, so
    'linear' here is PEFT's linear, cross terms included."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")

    def bert():
        torch.manual_seed(0)
        return tiny_bert(vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=16).eval()

    ours = bert()
    apply_lora(ours, LoraConfig(r=4, alpha=8, target_modules=["query", "value"]), "a")
    add_adapter(ours, "b", LoraConfig(r=4, alpha=2, target_modules=["query", "value"]))
    randomize_adapters(ours, seed=7, std=0.3)
    for name in ("a", "b"):
        save_adapter(ours, tmp_path / name, adapter_name=name)
    weights = {"a": 0.7, "b": 0.4}
    report = combine_adapters(ours, weights, mode=mode, new_name="m")
    set_adapter(ours, "m")

    theirs = peft.PeftModel.from_pretrained(bert(), str(tmp_path / "a"), adapter_name="a")
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    theirs.add_weighted_adapter(["a", "b"], list(weights.values()), "m", combination_type=mode)
    theirs.set_adapter("m")
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).last_hidden_state, theirs(ids).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
    assert (report["rel_error"] > 0.05) == (mode == "linear")
