"""``lorakit merge --base MODEL --adapter DIR --out DIR``: fold an adapter into its base model.

Saves a plain Hugging Face model (no LoRA code needed at inference) with its tokenizer, and checks
on a sample input that the merged model, in memory and reloaded from --out, matches the adapter model.

An adapter trained on a quantized base (QLoRA; its metadata records ``quantized_base``) was trained
against W = dequant(q(W0)), not W0: by default the base is quantized the same way first and the merge
is W = dequant(q(W0)) + s B A, the model the adapter was trained with, saved in 16/32-bit.
``--full-precision-base`` merges onto W0 instead (W0 + s B A, a slightly different model).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.cli.common import MB, add_model_task, infer_task
from lorakit.errors import LoraError
from lorakit.io import folder_bytes, load_adapter, read_adapter
from lorakit.models import load, resolve
from lorakit.quant import merge_and_unload, quantize_as_recorded

MERGE_TOLERANCE = 1e-4      # max |output difference| between adapter model and merged model (fp32)
SAMPLE_TEXT = ["LoRA adds a low-rank update to frozen weights and merges it back exactly.",
               "A second, shorter sample."]


def register(sub) -> None:
    p = sub.add_parser("merge", help="fold an adapter into its base model and save a plain Hugging "
                                     "Face model (no LoRA code needed at inference)")
    p.add_argument("--base", required=True, help="the base model: a known name or a local directory")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + "
                                                    "adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="folder for the merged model and its tokenizer")
    p.add_argument("--full-precision-base", action="store_true",
                   help="for an adapter trained on a quantized base (QLoRA): merge onto the 16/32-bit "
                        "base as loaded, not onto the base quantized as in training (the default)")
    add_model_task(p, auto=True)
    p.set_defaults(run=run)


def run(args) -> int:
    out = Path(args.out)
    base_dir, _ = resolve(args.base)
    for name, other in (("--base", base_dir), ("--adapter", Path(args.adapter))):
        if out.resolve() == other.resolve():
            raise LoraError(f"--out {out} is the same folder as {name}; writing there would "
                            "overwrite it. Choose a new folder")
    cfg, tensors, meta = read_adapter(args.adapter)
    task, num_labels = args.task, args.num_labels
    if task == "auto":
        task, found = infer_task(cfg.modules_to_save, tensors)
        num_labels = num_labels or found
        print(f"task: {task}" + (f" with {num_labels} labels (from the adapter's head)"
                                 if task == "classification" else ""))
    loaded = load(args.base, task=task, num_labels=num_labels or 2)
    model = load_adapter(loaded.model, args.adapter)
    record = meta.get("quantized_base")
    if record and not args.full_precision_base:
        print(f"the adapter was trained on a quantized base ({record['scheme']}): quantizing the base "
              "the same way, so the merge is the model it trained against (--full-precision-base "
              "to skip)")
        quantize_as_recorded(model, record)
    sample = dict(loaded.tokenizer(SAMPLE_TEXT, padding=True, return_tensors="pt"))
    with torch.no_grad():
        with_adapter = model_output(model, sample)
        merged = merge_and_unload(model)
        in_memory = model_output(merged, sample)
        merged.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
        from_disk = model_output(load(out, task=task, num_labels=num_labels or 2).model, sample)
    diffs = {"merged in memory": (with_adapter - in_memory).abs().max().item(),
             f"merged reloaded from {out}": (with_adapter - from_disk).abs().max().item()}
    for name, value in diffs.items():
        print(f"max |adapter model - {name}| on a sample input: {value:.2e}")
    print(f"wrote merged model + tokenizer to {out} ({folder_bytes(out) / MB:.1f} MB)")
    if not max(diffs.values()) <= MERGE_TOLERANCE:
        raise LoraError(f"merged outputs differ from the adapter model's by {max(diffs.values()):.2e} "
                        f"(> {MERGE_TOLERANCE}); the adapter may hold extreme values. Check it with "
                        "lorakit.read_adapter before using the merged model")
    return 0


def model_output(model, batch):
    """The tensor to compare: logits for a head model, the last hidden state for a bare encoder."""
    model.eval()
    out = model(**batch)
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name).float()
    return out[0].float()
