"""compare --seeds: mean, std and the 95% t-interval per method, the spread in tables, curves and findings;
one end to end through the command line (mnist-lowrank, cut short)."""

import json
import math

import pytest
from matplotlib.figure import Figure

from lorakit.cli import main
from lorakit.errors import LoraError
from lorakit.experiments.compare import run_compare
from lorakit.report.markdown import findings, results_table
from lorakit.report.plots import curves_vs_time
from lorakit.report.stats import aggregate, difference, summarize


def test_summary_uses_sample_std_and_student_t():
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["n"] == 3
    half = 4.302653 / math.sqrt(3)                  # t_{0.975, 2}
    assert s["ci95"] == pytest.approx([2 - half, 2 + half], rel=1e-5)
    one = summarize([0.7])
    assert one["std"] == 0.0 and one["ci95"] is None


def test_difference_beyond_and_within_the_spread():
    tight_a, tight_b = summarize([0.90, 0.91, 0.92]), summarize([0.80, 0.81, 0.82])
    d = difference(tight_a, tight_b)
    assert d["diff"] == pytest.approx(0.10) and d["beyond_spread"] and d["ci95"][0] > 0
    noisy = summarize([0.70, 0.95, 0.82])
    assert not difference(noisy, tight_b)["beyond_spread"]
    assert difference(summarize([0.9]), tight_b)["beyond_spread"] is None     # one run: no spread


def run(seed, auc, losses):
    history = [{"step": 10 * (i + 1), "time_s": 1.0 * (i + 1), "val_auc": auc - 0.01 * (len(losses) - i),
                "val_loss": loss} for i, loss in enumerate(losses)]
    return {"method": "lora", "trainable_params": 100, "total_params": 1000, "peak_memory_mb": 500.0 + seed,
            "baseline_memory_mb": 100.0, "train_time_s": 10.0 + seed, "size_on_disk_bytes": 2048,
            "best": {"step": 20, "val_auc": auc, "val_loss": losses[-1]}, "history": history}


def test_aggregate_keeps_runs_and_averages_curves():
    agg = aggregate([run(0, 0.80, [0.6, 0.5]), run(1, 0.84, [0.7, 0.4])], [0, 1])
    assert [r["best"]["val_auc"] for r in agg["runs"]] == [0.80, 0.84] and agg["seeds"] == [0, 1]
    assert agg["best"]["val_auc"] == pytest.approx(0.82) and agg["train_time_s"] == pytest.approx(10.5)
    assert agg["stats"]["val_auc"]["std"] == pytest.approx(0.028284, rel=1e-4)
    assert agg["stats"]["min_val_loss"]["mean"] == pytest.approx(0.45)
    assert [h["step"] for h in agg["history"]] == [10, 20]
    assert agg["history"][0]["val_loss"] == pytest.approx(0.65)
    assert agg["history"][0]["val_loss_std"] == pytest.approx(0.070711, rel=1e-4)


def test_table_findings_and_band_show_the_spread(tmp_path, monkeypatch):
    results = {"task": "gw", "methods": {
        "full": aggregate([run(0, 0.90, [0.4]), run(1, 0.91, [0.4]), run(2, 0.92, [0.4])], [0, 1, 2]),
        "lora": aggregate([run(0, 0.70, [0.5]), run(1, 0.95, [0.5]), run(2, 0.83, [0.5])], [0, 1, 2]),
        "frozen": aggregate([run(0, 0.60, [0.6]), run(1, 0.61, [0.6]), run(2, 0.62, [0.6])], [0, 1, 2])}}
    table = results_table(results, "val_auc")
    assert "0.9100 ± 0.0100" in table and "0.6100 ± 0.0100" in table
    text = " ".join(findings(results, "val_auc"))
    assert "Differences beyond the spread over seeds: full - frozen" in text
    assert "within the spread" in text and "full - lora" in text
    drawn = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), real(fig, *a, **k))[1])
    curves_vs_time(results, "val_auc", tmp_path / "auc.png", "auc")
    (ax,) = drawn[0].axes
    assert len(ax.collections) == 3                      # one shaded band per method
    assert "lora (mean of 3 seeds)" in [line.get_label() for line in ax.get_lines()]


def test_seeds_refuses_bad_counts_and_a_fixed_seed(tmp_path):
    with pytest.raises(LoraError, match="positive count"):
        run_compare("mnist-lowrank", ["full"], tmp_path, quick=True, seeds=0)
    with pytest.raises(LoraError, match="not together with --seed"):
        run_compare("mnist-lowrank", ["full"], tmp_path, quick=True, seeds=2, train_args=["--seed", "3"])


@pytest.mark.slow
def test_compare_seeds_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--task", "mnist-lowrank", "--quick", "--methods", "lora-r4", "--seeds", "2",
                 "--max-steps", "30", "--eval-every", "15", "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1]
    lora = results["methods"]["lora-r4"]
    assert [r["settings"]["seed"] for r in lora["runs"]] == [0, 1]
    values = lora["stats"]["val_accuracy"]["values"]
    assert values[0] != values[1]                         # different seeds, different runs
    lo, hi = lora["stats"]["val_accuracy"]["ci95"]
    assert lo < lora["best"]["val_accuracy"] < hi
    assert (out / "runs" / "lora-r4-seed1" / "val_logits.safetensors").exists()
    assert " ± " in (out / "report.md").read_text()
    # --report-only: seed 2 never ran, nothing is trained, the two finished seeds are kept
    assert main(["compare", "--task", "mnist-lowrank", "--quick", "--methods", "lora-r4", "--seeds", "3",
                 "--report-only", "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())["methods"]["lora-r4"]
    assert again["stats"]["val_accuracy"]["values"] == values and not (out / "runs" / "lora-r4-seed2").exists()
