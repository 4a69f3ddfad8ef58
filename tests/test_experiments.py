"""End to end, one per task, through the real command line on real data (quick settings, cut short):
`lorakit compare` trains each method in its own process and writes results.json, report.md, plots;
LoRA runs save an adapter that reloads and merges to the same logits."""

import json

import pytest

import lorakit
from lorakit.cli import main
from lorakit.io.fingerprint import FINGERPRINT_KEY

pytestmark = pytest.mark.slow
METRIC = {"gw": "val_auc", "text-cls": "val_accuracy", "mnist-lowrank": "val_accuracy"}


def compare(tmp_path, task, methods, *extra):
    out = tmp_path / task
    assert main(["compare", "--task", task, "--quick", "--methods", ",".join(methods),
                 "--no-progress", "--out", str(out), *extra]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == task and list(results["methods"]) == methods
    for method, run in results["methods"].items():
        assert "error" not in run, (method, run)
        assert {"trainable_params", "total_params", "peak_memory_mb", "wall_time_s", "best",
                "history"} <= set(run)
        assert run["history"] and METRIC[task] in run["best"]
    report = (out / "report.md").read_text()
    for png in ("metric_vs_time.png", "loss_vs_time.png", "cost.png"):
        assert (out / png).stat().st_size > 10_000 and f"]({png})" in report
    return out, results["methods"]


def check_lora(out, run, metric, floor):
    assert run["best"][metric] > floor, run["best"]
    check = run["adapter_check"]
    assert check["reloaded_max_abs_diff"] <= 1e-5 and check["merged_max_abs_diff"] <= 1e-3
    assert (out / "runs" / "lora" / "adapter" / "adapter_model.safetensors").exists()


def test_gw(tmp_path):
    out, runs = compare(tmp_path, "gw", ["frozen", "lora"])
    lora_factors = 4 * 3 * 8 * (384 + 384)                     # 4 layers x q,k,v x r (in + out)
    assert runs["lora"]["trainable_params"] == runs["frozen"]["trainable_params"] + lora_factors
    check_lora(out, runs["lora"], "val_auc", 0.7)               # chance is 0.5; ~0.85 measured


def test_text_cls(tmp_path):
    out, runs = compare(tmp_path, "text-cls", ["frozen", "lora"], "--max-steps", "20")
    assert runs["lora"]["trainable_params"] == 73_728 + 770     # q, v at r=8 + the 2-way head
    check_lora(out, runs["lora"], "val_auc", 0.6)
    _, _, meta = lorakit.read_adapter(out / "runs" / "lora" / "adapter")
    assert FINGERPRINT_KEY in meta            # lorakit serve / check-adapter can check serve parity


def test_mnist_lowrank(tmp_path):
    out, runs = compare(tmp_path, "mnist-lowrank", ["full", "lora-r4", "ae-r4"])
    assert runs["full"]["best"]["val_accuracy"] > 0.8         # 15 epochs of SGD on 4,000 digits
    low_rank = 4 * (784 + 512) + 512 + 4 * (512 + 512) + 512 + 512 * 10 + 10   # A, B, biases; head
    assert runs["lora-r4"]["trainable_params"] == runs["ae-r4"]["trainable_params"] == low_rank
    assert (out / "accuracy_vs_rank.png").exists()
