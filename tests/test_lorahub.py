"""LoraHub's search on a tiny model: it recovers known weights, cleans up, refuses bad input."""

import pytest
import torch

from conftest import randomize_adapters
from lorakit import LoraConfig, LoraError, active_adapters, add_adapter, apply_lora, list_adapters
from lorakit.tools.lorahub import TRIAL, evaluate, lorahub

TARGETS = ["query", "value", "out"]


@pytest.fixture(autouse=True)
def one_thread():
    """A search is hundreds of forwards of a tiny model; on a busy 2-core machine a second torch
    thread made each op wait (13 s instead of 2 s for 100 evaluations)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def library(tiny):
    apply_lora(tiny, LoraConfig(r=2, alpha=4, target_modules=TARGETS), "a")
    add_adapter(tiny, "b", LoraConfig(r=2, alpha=3, target_modules=TARGETS))
    add_adapter(tiny, "c", LoraConfig(r=2, alpha=4, target_modules=TARGETS))
    randomize_adapters(tiny, seed=5, std=0.4)
    return tiny


def mse_to(target):
    return lambda model, ids: float((model(ids) - target).square().mean())


@pytest.mark.parametrize("mode", ["cat", "linear"])
def test_search_recovers_the_weights_that_made_the_target(library, ids, mode):
    # positive weights: PEFT's linear puts a weight's sign on A only, and with its cross terms a
    # negative weight leaves Nelder-Mead in a local minimum here (it found loss 8e-3 vs 3e-2 uniform)
    true = {"a": 1.0, "b": 0.5, "c": 0.0}
    outputs = []                                   # the model's output under the true combination
    evaluate(library, true, mode, ids, lambda model, x: outputs.append(model(x)) or 0.0)
    target = outputs[0]
    weights, report = lorahub(library, ["a", "b", "c"], ids, mse_to(target), mode=mode, l1=0.0,
                              max_evals=100)
    assert report["best"]["loss"] < 0.02 * report["uniform"]["loss"]
    assert weights["a"] == pytest.approx(1.0, abs=0.15) and weights["b"] == pytest.approx(0.5, abs=0.15)
    assert report["evaluations"] <= 100 and report["uniform"]["weights"] == pytest.approx(
        {n: 1 / 3 for n in "abc"})
    assert active_adapters(library) == ["lorahub"] and TRIAL not in list_adapters(library)


def test_l1_penalty_prefers_sparse_weights(library, ids):
    with torch.no_grad():
        flat = library(ids).detach()                      # adapter 'a' alone is active here
    weights, report = lorahub(library, ["a", "b", "c"], ids, mse_to(flat), l1=0.5, max_evals=80)
    assert sum(abs(w) for w in weights.values()) < sum(abs(w) for w in report["uniform"]["weights"].values())
    assert report["best"]["objective"] <= report["uniform"]["objective"]


def test_refusals_and_cleanup_after_a_failing_loss(library, ids):
    with pytest.raises(LoraError, match="at least two"):
        lorahub(library, ["a"], ids, mse_to(None))
    with pytest.raises(LoraError, match="no adapter named"):
        lorahub(library, ["a", "zz"], ids, mse_to(None))
    with pytest.raises(LoraError, match="l1"):
        lorahub(library, ["a", "b"], ids, mse_to(None), l1=-1.0)

    def broken(model, x):
        raise RuntimeError("loss failed")
    with pytest.raises(RuntimeError, match="loss failed"):
        lorahub(library, ["a", "b"], ids, broken)
    assert active_adapters(library) == ["a"] and sorted(list_adapters(library)) == ["a", "b", "c"]


def test_binary_text_tasks_read_real_files():
    from lorakit.tasks import binary_text
    words = binary_text.load("word-polarity")
    assert len(words) > 3000 and {label for _, label in words} == {0, 1}
    assert ("abandon", 0) in words and all(" " not in w and "#" not in w for w, _ in words)
    debate = binary_text.load("debate-party")
    assert 700 < len(debate) < 800                         # moderators dropped
    train, val = binary_text.split("word-strength", seed=3)
    assert (train, val) == binary_text.split("word-strength", seed=3)
    assert not {t for t, _ in train} & {t for t, _ in val}
    with pytest.raises(LoraError, match="unknown binary text task"):
        binary_text.load("nope")


@pytest.mark.slow
def test_cli_lorahub_end_to_end_on_minilm(tmp_path):
    import json

    from lorakit.cli import main
    args = ["lorahub", "--upstream", "word-strength,word-activity", "--shots", "8", "--steps", "3",
            "--max-evals", "4", "--out", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / "lorahub.json").read_text())
    assert set(result["rows"]["LoraHub (cat)"]["weights"]) == {"word-strength", "word-activity"}
    assert result["rows"]["uniform (cat)"]["combine_rel_error"] < 1e-5
    assert (tmp_path / "lorahub.png").is_file() and (tmp_path / "adapters" / "word-strength").is_dir()
    assert main(args) == 0                                 # second run reuses the saved adapters
    again = json.loads((tmp_path / "lorahub.json").read_text())
    assert not any(info["trained_now"] for info in again["library"].values())
    assert again["rows"]["only word-strength"] == result["rows"]["only word-strength"]
