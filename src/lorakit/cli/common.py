"""Argument helpers shared by the verbs of the command line (cli/<verb>.py).

    parse_targets   --targets text -> module-name suffixes (or the all-linear keyword)
    split           comma-separated text -> list (None when empty)
    infer_task      which head an adapter was trained with (classification or the bare model)
    add_model_task  --task / --num-labels for verbs that load a base model
    add_train_flags the flags ``train`` and ``compare`` share (each overrides the task's default)
"""

from __future__ import annotations

from lorakit.config import ALL_LINEAR
from lorakit.errors import LoraError

MB = 2**20
REGEX_CHARS = set("*+?[](){}|^$\\")


def parse_targets(text: str) -> list[str] | str:
    """'query,value' -> ['query', 'value']; 'all-linear' passes through as the string."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if items == [ALL_LINEAR]:
        return ALL_LINEAR
    if not items:
        raise LoraError(f"--targets {text!r} names no modules; e.g. --targets query,value")
    for item in items:
        if REGEX_CHARS & set(item):
            raise LoraError(f"--targets item {item!r} looks like a regex, but --targets matches "
                            f"name suffixes literally; pass it as --regex {item!r}")
    return items


def split(text: str | None) -> list[str] | None:
    """'a, b,' -> ['a', 'b']; None or blank -> None."""
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    return items or None


def infer_task(modules_to_save: list[str] | None, tensors: dict) -> tuple[str, int | None]:
    """('classification', n) when the adapter carries an HF classification head (classifier/score),
    n its output rows; ('base', None) otherwise."""
    for head in modules_to_save or []:
        if head.split(".")[-1] not in ("classifier", "score"):
            continue
        for key in (f"{head}.weight", f"{head}.out_proj.weight"):
            if key in tensors and tensors[key].dim() == 2:
                return "classification", int(tensors[key].shape[0])
    return "base", None


def add_model_task(p, auto: bool = False) -> None:
    """--task and --num-labels; with ``auto`` the task may be read off the adapter (infer_task)."""
    choices = ("auto", "base", "classification") if auto else ("base", "classification")
    p.add_argument("--task", choices=choices, default=choices[0],
                   help="base: the bare encoder; classification: + a sequence-classification head"
                        + ("; auto: classification if the adapter carries a head" if auto else ""))
    p.add_argument("--num-labels", type=int, default=None if auto else 2,
                   help="outputs of the classification head" + (" (default: from the adapter)"
                                                               if auto else " (default 2)"))


def add_train_flags(p, single_run: bool) -> None:
    """Flags shared by train and compare; each overrides the task's default when given."""
    p.add_argument("--task", required=True, help="gw, mnist-lowrank or text-cls")
    p.add_argument("--quick", action="store_true", help="small data and few steps (minutes on 2 cores)")
    p.add_argument("--data-dir", help="real data instead of the built-in set (G2Net .npy files, "
                                      "MNIST idx files, the Rotten Tomatoes csv)")
    p.add_argument("--seed", type=int, help="seed for init, batches and dropout (default 0)")
    p.add_argument("--device", help="auto (CUDA when present; the default), cpu, cuda, cuda:1")
    p.add_argument("--precision", choices=("bf16", "fp32"), help="bf16 autocast or fp32 "
                                                                 "(default: the task's)")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-every", type=int, help="optimizer steps between evaluations")
    if single_run:
        p.add_argument("--method", required=True, help="full, frozen, lora (task-specific: "
                                                       "mnist-lowrank takes lora-rR, ae-rR)")
        p.add_argument("--lr", type=float, help="peak learning rate")
        p.add_argument("--r", type=int, help="LoRA rank (default 8)")
        p.add_argument("--alpha", type=float, help="LoRA alpha (default 16)")
        p.add_argument("--targets", help="comma-separated module-name suffixes for LoRA")
        p.add_argument("--checkpoint-every", type=int, help="steps between atomic checkpoints")
        p.add_argument("--patience", type=int, help="evals without improvement before stopping")
        p.add_argument("--skip-nonfinite", action="store_true", default=None,
                       help="skip a batch whose loss is NaN/inf instead of stopping")
        p.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile the model for training (the first steps compile: "
                            "minutes on 2 CPU cores)")
        p.add_argument("--resume", action="store_true", help="continue from the newest complete "
                                                             "checkpoint in --out")
        p.add_argument("--whisper", choices=("tiny.en", "base"), help="gw: the Whisper encoder")
        p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model over the "
                                                           "processes (FSDP2) instead of DDP copies")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    p.add_argument("--out", required=True, help="output folder")
