"""Everything before training, in the order that fails fastest: the output folder, the data files
(read and checked), the model, the examples (tokenized and checked), LoRA. Nothing is written here:
a refused run leaves DIR as it was."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import LoraError
from lorakit.finetune.batches import TokenData
from lorakit.finetune.config import FinetuneConfig, config_differences
from lorakit.finetune.data import read_records, split_validation
from lorakit.finetune.encode import Encoded, encode_classify, encode_sft
from lorakit.finetune.formats import detect_format, infer_task, prompt_and_reference, use_chat_format
from lorakit.finetune.model import add_lora, is_causal_lm, load_model
from lorakit.generate.decode import pad_id
from lorakit.generate.prompts import set_chat_template
from lorakit.train.settings import TrainSettings


@dataclass
class Prepared:
    task: str
    fmt: str
    model: object
    tokenizer: object
    train: TokenData
    val: TokenData
    settings: TrainSettings
    chat: bool = False
    label_map: dict | None = None
    samples: list = field(default_factory=list)     # (prompt, reference) pairs from validation
    stats: dict = field(default_factory=dict)


def check_out_dir(cfg: FinetuneConfig) -> None:
    out = Path(cfg.out)
    saved = out / "config.json"
    if out.exists() and not out.is_dir():
        raise LoraError(f"--out {out} is a file; pick a folder")
    if cfg.resume and saved.is_file():
        diff = config_differences(json.loads(saved.read_text()), cfg)
        if diff:
            shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise LoraError(f"--resume: {out} was made by a different configuration ({shown}); "
                            f"resume with the same settings (`--config {saved}`) or pick a new --out")
    elif not cfg.resume and not cfg.overwrite and (saved.is_file() or (out / "checkpoints").is_dir()):
        raise LoraError(f"--out {out} already holds a finetune run; pass --resume to continue it, "
                        "--overwrite to start it again, or pick a new --out")


def prepare(cfg: FinetuneConfig) -> Prepared:
    if int(os.environ.get("RANK", "0")) == 0:     # torchrun: rank 0 writes DIR, so it alone checks it
        check_out_dir(cfg)
    records = read_records(cfg.data, "--data")
    if cfg.val_data:
        train_records, val_records = records, read_records(cfg.val_data, "--val-data")
    else:
        train_records, val_records = split_validation(records, cfg.val_fraction, cfg.seed)
    if cfg.max_examples:
        train_records = train_records[:cfg.max_examples]
        val_records = val_records[:max(cfg.max_examples // 8, cfg.samples, 8)]
    columns = set(records[0])
    task = cfg.task
    if task == "auto":             # an encoder can only classify; otherwise labels decide
        task = infer_task(columns, cfg.label_column) if is_causal_lm(cfg.model) else "classify"
    fmt = detect_format(columns, task, cfg.data, cfg.text_column, cfg.label_column)
    if cfg.val_data:
        val_columns = set(val_records[0])
        if detect_format(val_columns, task, cfg.val_data, cfg.text_column, cfg.label_column) != fmt:
            raise LoraError(f"--val-data {cfg.val_data} has fields {sorted(val_columns)}, another "
                            f"format than --data ({fmt}); give both files the same fields")
    labels = sorted({str(r.get(cfg.label_column)) for r in train_records}) if task == "classify" else []
    unseen = sorted({str(r.get(cfg.label_column)) for r in val_records} - set(labels)) if labels else []
    if unseen:                     # before the model loads: a wrong file should fail in a second
        raise LoraError(f"{cfg.val_data or cfg.data}: validation labels {unseen[:5]} do not occur in "
                        f"the training data (labels there: {labels[:10]}); fix the labels or add "
                        "examples of them to --data")
    model, tokenizer = load_model(cfg, task, num_labels=max(len(labels), 2))
    set_chat_template(tokenizer, cfg.chat_template)
    chat = task == "sft" and use_chat_format(tokenizer, cfg.prompt_format)
    if task == "sft":
        enc = encode_sft(train_records, fmt, tokenizer, chat, cfg.max_seq_len, cfg.train_on_prompt,
                         cfg.data)
        val_enc = encode_sft(val_records, fmt, tokenizer, chat, cfg.max_seq_len, cfg.train_on_prompt,
                             cfg.val_data or cfg.data) if val_records else None
        label_map = None
    else:
        enc, label_map = encode_classify(train_records, tokenizer, cfg.text_column, cfg.label_column,
                                         None, cfg.max_seq_len, cfg.data)
        val_enc = encode_classify(val_records, tokenizer, cfg.text_column, cfg.label_column, label_map,
                                  cfg.max_seq_len, cfg.val_data or cfg.data)[0] if val_records else None
    model = add_lora(model, cfg, task)
    pad = pad_id(tokenizer)
    seq = task == "sft"
    train = TokenData(enc, pad, pack=cfg.pack and seq, max_len=cfg.max_seq_len, sequence_labels=seq)
    val = TokenData(val_enc or _subset(enc, 64), pad, sequence_labels=seq)
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / (cfg.batch_size * cfg.grad_accum)))
    settings = TrainSettings(lr=cfg.lr, batch_size=min(cfg.batch_size, len(train)), max_steps=steps,
                             grad_accum=cfg.grad_accum, warmup_frac=cfg.warmup_frac,
                             schedule=cfg.schedule, weight_decay=cfg.weight_decay,
                             grad_clip=cfg.grad_clip, precision=cfg.precision, seed=cfg.seed,
                             eval_every=cfg.eval_every or max(1, steps // 5), device=cfg.device,
                             checkpoint_every=cfg.checkpoint_every,
                             keep_checkpoints=cfg.keep_checkpoints)
    samples = []
    if seq:
        pairs = [prompt_and_reference(r, fmt, tokenizer, chat) for r in val_records or train_records]
        samples = [p for p in pairs if p is not None][:cfg.samples]
    stats = {"train_records": len(train_records), "val_records": len(val_records),
             "train_examples": len(enc), "val_examples": len(val_enc) if val_enc else 0,
             "validation": "held-out" if val_enc else "training subset (no validation records)",
             "truncated": enc.truncated + (val_enc.truncated if val_enc else 0),
             "dropped": enc.dropped + (val_enc.dropped if val_enc else 0),
             "train_tokens": enc.tokens, "trained_tokens": _trained(enc) if seq else enc.tokens,
             "train_rows": len(train), "packed": train.packed,
             "padding_fraction": round(train.padding_fraction(settings.batch_size, cfg.seed), 4)}
    return Prepared(task, fmt, model, tokenizer, train, val, settings, chat, label_map, samples, stats)


def _subset(enc: Encoded, n: int) -> Encoded:
    return Encoded(enc.ids[:n], enc.labels[:n], records=enc.records[:n])


def _trained(enc: Encoded) -> int:
    return sum(sum(1 for x in labels[1:] if x != -100) for labels in enc.labels)
