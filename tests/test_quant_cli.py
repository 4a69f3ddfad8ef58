"""``--quantize nf4|int8`` on the command line: inspect shows the memory, train runs QLoRA end to end."""

from __future__ import annotations

import json

from safetensors import safe_open

from lorakit.cli import main


def test_inspect_quantize_shows_weight_memory_per_module_type(capsys):
    assert main(["inspect", "minilm", "--targets", "query,value", "--quantize", "nf4"]) == 0
    out = capsys.readouterr().out
    assert "weight memory per module type" in out
    line = next(l for l in out.splitlines() if l.startswith("Linear "))
    ratio = float(line.split()[-1].rstrip("x"))
    assert 0.1 < ratio < 0.2                      # 36 BERT linears at 4.13 bits vs fp32
    assert next(l for l in out.splitlines() if l.startswith("Embedding ")).endswith("1.00x")


def test_train_quantize_runs_qlora_and_records_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "text-cls", "--method", "lora", "--quantize", "nf4", "--quick",
                 "--max-steps", "2", "--eval-every", "2", "--batch-size", "4", "--no-progress",
                 "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["adapter_check"]["reloaded_max_abs_diff"] < 1e-3
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lorakit"])
    assert meta["quantized_base"]["scheme"] == "nf4"


def test_train_quantize_refuses_full_finetuning(tmp_path, capsys):
    assert main(["train", "--task", "text-cls", "--method", "full", "--quantize", "int8", "--quick",
                 "--max-steps", "1", "--out", str(tmp_path / "run")]) == 2
    assert "quantized base is frozen" in capsys.readouterr().err
