"""End to end on the real model and real data: `lorakit finetune --model smollm2 --data chatterbot
--quick`, then `lorakit generate` with the adapter, then PEFT loads the same adapter with the same
logits as lorakit."""

import copy
import json

import pytest
import torch

from finetune_helpers import run_cli


def quick_chatterbot_finetune(tmp_path, monkeypatch, out, *extra):
    """``lorakit finetune --model smollm2 --data chatterbot --quick`` cut short; returns PEFT."""
    for module in ("gguf", "datasets", "chatterbot_corpus"):
        pytest.importorskip(module)
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("LORAKIT_DATA", str(tmp_path / "data"))
    assert run_cli(["finetune", "--model", "smollm2", "--data", "chatterbot", "--quick", "--out", out,
                    "--samples", "1", "--no-progress", *extra]) == 0
    return peft


@pytest.mark.slow
def test_smollm2_chatterbot_quick_finetune_generate_and_peft_parity(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sft"
    peft = quick_chatterbot_finetune(tmp_path, monkeypatch, out, "--max-examples", "64",
                                     "--max-steps", "4", "--sample-tokens", "12")
    result = json.loads((out / "result.json").read_text())
    assert result["format"] == "messages" and result["chat"] and result["steps"] == 4
    assert result["history"][-1]["val_loss"] < result["val_loss_before"]
    assert len(result["samples"]) == 1 and result["samples"][0]["after"]
    capsys.readouterr()
    assert run_cli(["generate", "--model", "smollm2", "--adapter", out / "adapter", "--prompt",
                    "Are you sentient?", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip()

    from lorakit.io import load_adapter
    from lorakit.models import load
    base, tok = load("smollm2", task="causal-lm")
    batch = tok(["What is AI?", "Tell me a joke about computers."], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = base(**batch).logits
        ours = load_adapter(copy.deepcopy(base), out / "adapter")(**batch).logits
        theirs = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()(**batch).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours - plain).abs().max().item() > 1e-3          # the adapter changes the model


@pytest.mark.slow
def test_smollm2_qlora_finetune_generate_and_peft_loading(tmp_path, monkeypatch, capsys):
    """QLoRA from the command line: finetune on the NF4-quantized SmolLM2, generate with the adapter
    (on the base quantized as in training), and the adapter loads in PEFT on the 16/32-bit base with
    the same logits as lorakit's load there."""
    out = tmp_path / "qlora"
    peft = quick_chatterbot_finetune(tmp_path, monkeypatch, out, "--quantize", "nf4", "--max-examples",
                                     "48", "--max-steps", "3", "--sample-tokens", "8")
    result = json.loads((out / "result.json").read_text())
    assert result["history"][-1]["val_loss"] < result["val_loss_before"]
    from lorakit.io import load_adapter, read_adapter
    record = read_adapter(out / "adapter")[2]["quantized_base"]
    assert record["scheme"] == "nf4" and record["quantized_modules"] == 30 * 7
    capsys.readouterr()
    assert run_cli(["generate", "--model", "smollm2", "--adapter", out / "adapter", "--prompt",
                    "Are you sentient?", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() and "trained on a quantized base (nf4)" in printed.err

    from lorakit.models import load
    base, tok = load("smollm2", task="causal-lm")
    batch = tok(["What is AI?"], return_tensors="pt")
    with torch.no_grad():
        ours = load_adapter(copy.deepcopy(base), out / "adapter")(**batch).logits
        theirs = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()(**batch).logits
    assert (ours - theirs).abs().max().item() < 1e-4
