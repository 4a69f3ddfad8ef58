"""LoraHub as its paper ran it: nevergrad's search from w = 0 on a tiny model, the suite's report
arithmetic, and the suite end to end on MiniLM (cut short)."""

import json

import pytest
import torch

from conftest import randomize_adapters
from lorakit import LoraConfig, LoraError, active_adapters, add_adapter, apply_lora
from lorakit.report.lorahub_suite import suite_report
from lorakit.tools.lorahub import evaluate, lorahub

TARGETS = ["query", "value", "out"]


@pytest.fixture
def library(tiny):
    torch.set_num_threads(1)
    apply_lora(tiny, LoraConfig(r=2, alpha=4, target_modules=TARGETS), "a")
    add_adapter(tiny, "b", LoraConfig(r=2, alpha=4, target_modules=TARGETS))
    randomize_adapters(tiny, seed=5, std=0.4)
    return tiny


def test_nevergrad_search_starts_at_zero_and_finds_the_target(library, ids):
    outputs = []
    evaluate(library, {"a": 1.0, "b": 0.5}, "cat", ids, lambda model, x: outputs.append(model(x)) or 0.0)
    target = outputs[0]

    def loss(model, x):
        return float((model(x) - target).square().mean())
    weights, report = lorahub(library, ["a", "b"], ids, loss, mode="cat", l1=0.0, max_evals=40,
                              optimizer="nevergrad", seed=0)
    assert report["optimizer"] == "nevergrad" and report["evaluations"] == 40
    assert report["algorithm"] not in ("NGOpt", "Nelder-Mead")          # the algorithm NGOpt chose
    assert report["start"]["weights"] == {"a": 0.0, "b": 0.0} and report["uniform"] is None
    assert report["best"]["loss"] < 0.1 * report["start"]["loss"]
    assert weights["a"] == pytest.approx(1.0, abs=0.3)
    again, _ = lorahub(library, ["a", "b"], ids, loss, mode="cat", l1=0.0, max_evals=40,
                       optimizer="nevergrad", seed=0, new_name="again")
    assert again == weights                                 # seeded: the same search
    assert active_adapters(library) == ["again"]
    with pytest.raises(LoraError, match="optimizer"):
        lorahub(library, ["a", "b"], ids, loss, optimizer="cma")


def test_suite_report_averages_tasks_per_seed_then_seeds():
    def rows(hub, lora):
        return {"base (before)": {"val": 0.5}, "LoraHub (linear)": {"val": hub}, "LoRA on the k shots": {"val": lora}}
    results = {"tasks": {"t1": {"0": rows(0.70, 0.80), "1": rows(0.72, 0.81), "2": rows(0.71, 0.79)},
                         "t2": {"0": rows(0.60, 0.70), "1": rows(0.62, 0.71), "2": rows(0.61, 0.72)}},
               "config": {"shots": 32, "optimizer": "nevergrad", "max_evals": 40, "l1": 0.05, "val_examples": 10},
               "library": {"t1": {"own_val_accuracy": 0.9}, "t2": {"own_val_accuracy": 0.8}}, "wall_time_s": 1}
    report = suite_report(results)
    hub = report["summary"]["LoraHub (linear)"]
    assert hub["values"] == pytest.approx([0.65, 0.67, 0.66]) and hub["std"] == pytest.approx(0.01)
    assert report["comparisons"]["base (before)"]["beyond_spread"] is True     # +0.16, interval +-0.025
    assert report["comparisons"]["LoRA on the k shots"]["diff"] == pytest.approx(-0.095)
    assert "| LoraHub (linear) | 0.710 ± 0.010 | 0.610 ± 0.010 | 0.660 ± 0.010 |" in report["markdown"]


@pytest.mark.slow
def test_suite_end_to_end_on_minilm(tmp_path):
    from lorakit.cli import main
    args = ["lorahub", "--suite", "word-polarity,word-strength,word-activity", "--seeds", "2", "--shots", "8",
            "--steps", "3", "--max-evals", "6", "--quick", "--out", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / "lorahub_suite.json").read_text())
    assert set(result["tasks"]) == {"word-polarity", "word-strength", "word-activity"}
    rows = result["tasks"]["word-strength"]["1"]
    assert set(rows["LoraHub (linear)"]["weights"]) == {"word-polarity", "word-activity"}   # leave-one-out
    assert rows["LoraHub (linear)"]["evaluations"] == 6
    assert result["summary"]["LoRA on the k shots"]["n"] == 2
    assert "± " in (tmp_path / "report.md").read_text()
