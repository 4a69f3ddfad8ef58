"""compare's closing cost check: lora and full steps interleaved in one process, and the report's
cost section (paired ratio with its interval, warnings when the machine's load moved)."""

import json
from pathlib import Path

import torch
from torch import nn

from lorakit.experiments import compare, paired
from lorakit.methods import AdaptSpec, apply_method
from lorakit.report.cost import cost_section, load_warnings
from lorakit.train.data import TensorData
from lorakit.train.settings import TrainSettings


class TinyTask:
    name, metric = "tiny", "val_accuracy"

    def settings(self, method, quick):
        return TrainSettings(lr=1e-3, batch_size=8, max_steps=10, precision="bf16")

    def load_data(self, quick, seed, data_dir=None):
        g = torch.Generator().manual_seed(0)
        data = TensorData({"x": torch.randn(64, 16, generator=g),
                           "labels": torch.randint(0, 2, (64,), generator=g)})
        return data, data

    def build_model(self, method, options):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
        return apply_method(model, method, AdaptSpec(head=["2"], lora_targets=["0"]))

    def forward(self, model, batch):
        return model(batch["x"])


def test_paired_step_cost_interleaves_both_methods(monkeypatch):
    monkeypatch.setattr(paired, "get_task", lambda name: TinyTask())
    before = torch.get_num_threads()
    result, threads = paired.paired_step_cost("tiny", "lora", "full", pairs=4, warmup=1, threads=1)
    assert threads == 1 and torch.get_num_threads() == before       # restored afterwards
    assert result.pairs == 4 and result.a == "lora" and result.b == "full"
    assert all(t > 0 for t in result.times_a + result.times_b)
    assert result.low <= result.ratio <= result.high


def _run(time_s, load, share):
    return {"train_time_s": time_s, "machine": {"load": load, "cpu_share": share}}


def test_cost_section_reports_the_interval_and_the_verdict():
    results = {"methods": {"full": _run(100.0, [1.0, 1.1], 1.9), "lora": _run(80.0, [1.0, 1.2], 1.9)},
               "paired_timing": {"ratio": 0.66, "low": 0.64, "high": 0.69, "pairs": 16,
                                 "times_a": [0.66] * 16, "times_b": [1.0] * 16}}
    text = "\n".join(cost_section(results))
    assert "0.80x" in text                              # wall-time ratio of the separate runs
    assert "0.66x" in text and "0.64-0.69" in text and "below 0.70" in text
    assert "Warning" not in text
    results["paired_timing"]["high"] = 0.72
    assert "not entirely below 0.70" in "\n".join(cost_section(results))


def test_load_change_and_cpu_share_are_warned_about():
    calm = {"methods": {"full": _run(100.0, [1.0, 1.2], 1.9), "lora": _run(80.0, [1.1, 1.0], 1.8)}}
    assert load_warnings(calm) == []
    busy = {"methods": {"full": _run(100.0, [1.0, 1.2], 1.9), "lora": _run(99.0, [1.1, 3.5], 1.1)}}
    warnings = load_warnings(busy)
    assert len(warnings) == 2 and "load changed" in warnings[0] and "lora 1.1 -> 3.5" in warnings[0]
    assert "CPU time" in warnings[1]
    assert "--time-pairs" in warnings[0]                       # no interleaved ratio yet: how to get one
    busy["paired_timing"] = {"ratio": 0.7}
    assert "interleaved ratio above" in load_warnings(busy)[0]
    assert load_warnings({"methods": {"full": {"train_time_s": 1.0}}}) == []     # reused runs: no data


def test_compare_records_load_and_adds_the_cost_section(tmp_path, monkeypatch):
    """run_compare(time_pairs=N): each run's load is recorded, the interleaved lora/full timing lands in
    results.json and the report's cost section (training itself is faked: no subprocess trains)."""
    def fake_train(command):
        out = Path(command[command.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        method = command[command.index("--method") + 1]
        history = [{"step": 10, "time_s": 1.0, "val_loss": 0.5, "val_accuracy": 0.8}]
        (out / "result.json").write_text(json.dumps({
            "method": method, "quick": True, "trainable_params": 10 if method == "lora" else 100,
            "total_params": 100, "peak_memory_mb": 10.0, "baseline_memory_mb": 5.0,
            "train_time_s": 7.0 if method == "lora" else 10.0, "best": {"val_accuracy": 0.8, "step": 10},
            "history": history, "size_on_disk_bytes": 1000}))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(compare.subprocess, "run", fake_train)
    monkeypatch.setattr(compare, "get_task", lambda name: TinyTask())
    monkeypatch.setattr(paired, "get_task", lambda name: TinyTask())
    results = compare.run_compare("tiny", ["full", "lora"], tmp_path, quick=True, time_pairs=3)
    assert set(results["methods"]["lora"]["machine"]) == {"load", "cpu_share"}
    assert results["paired_timing"]["pairs"] == 3 and results["paired_timing"]["threads"] >= 1
    report = (tmp_path / "report.md").read_text()
    assert "## Cost: LoRA against full fine-tuning" in report and "interleaved" in report
    assert "CPU thread" in report
    assert "(0.70x)" in report                 # the wall-time ratio of the (fake) separate runs
