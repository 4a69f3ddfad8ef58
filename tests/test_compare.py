"""compare's run plan (sizes sweep) and the paper's Figure 2 plot, without training anything."""

import pytest

from lorakit.cli_experiments import parse_size
from lorakit.compare import planned_runs
from lorakit.errors import LoraError
from lorakit.report.plots import metric_vs_params


def test_sizes_expand_sized_methods_only():
    runs = planned_runs(["full", "lora", "bitfit", "adapter-houlsby"], [2, 8])
    assert runs == [("full", "full", None), ("lora-r2", "lora", 2), ("lora-r8", "lora", 8),
                    ("bitfit", "bitfit", None), ("adapter-houlsby-r2", "adapter-houlsby", 2),
                    ("adapter-houlsby-r8", "adapter-houlsby", 8)]
    assert planned_runs(["lora"], None) == [("lora", "lora", None)]


@pytest.mark.parametrize("bad", ["0", "-2", "eight", "2.5"])
def test_bad_size_is_refused(bad):
    with pytest.raises(LoraError, match="positive whole number"):
        parse_size(bad)


def test_metric_vs_params_draws_one_line_per_method(tmp_path):
    def run(method, params, acc):
        return {"method": method, "trainable_params": params, "best": {"val_accuracy": acc}}
    results = {"task": "text-cls", "methods": {
        "lora-r2": run("lora", 100, 0.7), "lora-r8": run("lora", 400, 0.8),
        "full": run("full", 10_000, 0.82), "broken": {"error": "exit code 1"}}}
    path = metric_vs_params(results, "val_accuracy", tmp_path / "fig.png")
    assert path.stat().st_size > 5_000
