"""A causal LM ready to generate: the base (built-in name, HF folder or GGUF file), optionally a LoRA
adapter merged into it (W = W0 + s B A: no extra matmuls per token, exact), the adapter's tokenizer
when it carries one (finetune saves it there), and the chosen precision.

An adapter trained on a quantized base (QLoRA: ``finetune --quantize nf4``; its metadata records how)
is merged onto the base quantized the same way, W = dequant(q(W0)) + s B A: the model it was trained
against, not W0 + s B A."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lorakit.errors import LoraError
from lorakit.generate.prompts import set_chat_template
from lorakit.inject import merge_lora
from lorakit.io import load_adapter, read_metadata
from lorakit.models import load
from lorakit.quant import merge_and_unload, quantize_as_recorded


def load_for_generation(model_name: str, adapter: str | None = None, chat_template: str | None = None,
                        precision: str = "fp32", device: str = "cpu"):
    """(model in eval mode, tokenizer)."""
    if adapter is not None:
        folder = Path(adapter)
        if not (folder / "adapter_config.json").is_file():
            raise LoraError(f"--adapter {adapter}: no adapter_config.json there; point at the adapter "
                            "folder (e.g. DIR/adapter written by lorakit finetune)")
        if (folder / "label_map.json").is_file():
            labels = json.loads((folder / "label_map.json").read_text())["label2id"]
            raise LoraError(f"--adapter {adapter} is a classification adapter (labels "
                            f"{sorted(labels)[:5]}); it predicts labels, it does not generate text")
    if precision not in ("fp32", "bf16"):
        raise LoraError(f"--precision {precision!r}; choose fp32 or bf16")
    model, tokenizer = load(model_name, task="causal-lm")
    if adapter is not None:
        model = load_adapter(model, adapter)
        record = read_metadata(adapter).get("quantized_base")
        if record:
            print(f"the adapter was trained on a quantized base ({record['scheme']}): generating with "
                  "the base quantized the same way", file=sys.stderr)
            model = merge_and_unload(quantize_as_recorded(model, record))
        else:
            merge_lora(model)
        if (Path(adapter) / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer  # deferred: heavy optional dependency
            tokenizer = AutoTokenizer.from_pretrained(adapter)
    set_chat_template(tokenizer, chat_template)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device=torch.device(device),
                     dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    return model.eval(), tokenizer
