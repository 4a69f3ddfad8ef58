"""compare's run plan (sizes sweep) and the paper's Figure 2 plot, without training anything."""

import pytest
from matplotlib.figure import Figure

from lorakit.cli.compare import parse_size
from lorakit.errors import LoraError
from lorakit.experiments.compare import planned_runs
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


def test_metric_vs_params_draws_one_line_per_method(tmp_path, monkeypatch):
    """The figure's data, read off the saved Figure: one line per method (not per run), its runs sorted
    by trainable parameters on a log x axis, y the best metric; failed runs and runs without the metric
    are left out."""
    saved = []
    real_savefig = Figure.savefig

    def savefig(fig, *args, **kwargs):
        saved.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)

    def run(method, params, acc):
        return {"method": method, "trainable_params": params, "best": {"val_accuracy": acc}}
    results = {"task": "text-cls", "methods": {
        "lora-r8": run("lora", 400, 0.8), "lora-r2": run("lora", 100, 0.7),
        "full": run("full", 10_000, 0.82), "broken": {"error": "exit code 1"},
        "bitfit": {"method": "bitfit", "trainable_params": 50, "best": {"val_loss": 0.5}}}}
    path = metric_vs_params(results, "val_accuracy", tmp_path / "fig.png")
    assert path.is_file() and len(saved) == 1
    (ax,) = saved[0].axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {"full": ([10_000], [0.82]), "lora": ([100, 400], [0.7, 0.8])}
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "trainable parameters" and ax.get_ylabel() == "validation accuracy"
