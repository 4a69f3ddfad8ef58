"""``--quantize nf4|int8`` on the command line: inspect shows the memory, train runs QLoRA end to end."""

from __future__ import annotations

import json

import torch
import transformers
from safetensors import safe_open

from lorakit.cli import main
from lorakit.finetune.config import FinetuneConfig
from lorakit.finetune.model import add_lora
from lorakit.layers import is_quantized


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


def test_inspect_quantize_embeddings_shrinks_the_word_embeddings(capsys):
    # int8: the 30522 x 384 word table's 183,132 NF4 blocks split into no double-quantization scale
    # blocks (16..256), so under nf4 it is kept, with that reason (tests/test_quant.py covers it)
    assert main(["inspect", "minilm", "--targets", "query,value", "--quantize", "int8",
                 "--quantize-embeddings"]) == 0
    out = capsys.readouterr().out
    assert "quantize  embeddings.word_embeddings" in out
    line = next(l for l in out.splitlines() if l.startswith("Embedding "))
    ratio = float(line.split()[-1].rstrip("x"))
    assert 0.2 < ratio < 0.3             # word table at 8 bits + row scales; positions stay fp32


def test_quantize_embeddings_without_quantize_is_refused(tmp_path, capsys):
    assert main(["inspect", "minilm", "--quantize-embeddings"]) == 2
    assert "add --quantize nf4" in capsys.readouterr().err
    assert main(["train", "--task", "text-cls", "--method", "lora", "--quantize-embeddings", "--quick",
                 "--out", str(tmp_path / "run")]) == 2
    assert "add --quantize nf4" in capsys.readouterr().err
    assert main(["finetune", "--model", "minilm", "--data", str(tmp_path / "d.jsonl"), "--out",
                 str(tmp_path / "ft"), "--quantize-embeddings"]) == 2
    assert "add --quantize nf4" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "ft").exists()


def test_train_quantize_embeddings_records_and_reloads(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "text-cls", "--method", "lora", "--quantize", "nf4",
                 "--quantize-embeddings", "--quick", "--max-steps", "1", "--eval-every", "1",
                 "--batch-size", "4", "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["adapter_check"]["reloaded_max_abs_diff"] < 1e-3     # reloaded base quantized alike
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lorakit"])
    assert meta["quantized_base"]["embeddings"] is True


def test_finetune_quantize_embeddings_quantizes_the_tied_table_under_lora():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    cfg = FinetuneConfig(model="m", data="d.jsonl", out="o", quantize="nf4", quantize_embeddings=True)
    add_lora(model, cfg, "sft")
    embed = model.model.embed_tokens.weight
    assert is_quantized(embed) and model.lm_head.weight is embed
    assert model.__dict__["_lorakit_quant"]["embeddings"] is True
