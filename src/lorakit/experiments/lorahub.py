"""The LoraHub experiment behind ``lorakit lorahub``: a library of task adapters, then LoraHub's
weights (Huang et al. 2023, tools/lorahub.py) for a new task from a few examples, against baselines.

    base     pretrained MiniLM-L6 + a seeded random 2-way head, frozen (saved as DIR/head.safetensors),
             so every adapter is a complete binary classifier and adapters can be combined
    library  one LoRA per upstream task (r=8 on query, value and the pooler), trained with the head
             frozen, saved in DIR/adapters/<task>/ and reused by later runs
    new task k labelled examples (default 32) of a task no adapter was trained on (default:
             General Inquirer word polarity); LoraHub searches the weights
    report   few-shot loss/accuracy and held-out accuracy for: the bare base, each upstream adapter
             alone, uniform weights, LoraHub's weights (modes cat and linear), and LoRA trained by
             gradient on the same k examples (the reference LoraHub tries to approach without
             gradients). Writes DIR/lorahub.json, DIR/report.md, DIR/lorahub.png (report/lorahub.py).

``args`` is the verb's options: new_task, shots, l1, max_evals, steps, seed, quick.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorakit.adapters import add_adapter, delete_adapter, disable_adapter, set_adapter
from lorakit.config import LoraConfig
from lorakit.inject import apply_lora
from lorakit.io import load_adapter, save_adapter
from lorakit.models import load
from lorakit.report.lorahub import plot, report_md
from lorakit.state import has_lora
from lorakit.tasks import binary_text
from lorakit.tools.combine import combine_adapters
from lorakit.tools.lorahub import lorahub

UPSTREAM = {True: ("sentiment", "speech-party", "word-strength"),
            False: ("sentiment", "speech-party", "debate-party", "word-strength", "word-activity")}
STEPS = {True: 100, False: 250}                   # upstream training steps (quick, full)
VAL_SIZE = {True: 300, False: 600}
MAX_EVALS = {True: 30, False: 60}
TARGETS = ["query", "value", "pooler.dense"]
RANK, ALPHA, LR, BATCH, MAX_LENGTH = 8, 16.0, 5e-3, 16, 64


def run_lorahub(args, upstream: list[str], out: Path) -> dict:
    """Build the base, train or reuse the library, compare; write DIR/lorahub.json, report.md and
    lorahub.png; return the results (rows, searches, config, library, wall_time_s)."""
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, tokenizer = build_base(out, args.seed)
    encode = lambda pairs: _encode(tokenizer, pairs)          # noqa: E731
    train, val = binary_text.split(args.new_task, seed=args.seed)
    shots, held_out = encode(train[:args.shots]), encode(val[:VAL_SIZE[args.quick]])
    library = {}
    for task in upstream:
        library[task] = ensure_adapter(model, task, out, encode, args)
    results = evaluate_all(model, upstream, shots, held_out, encode, args)
    results.update(config={"new_task": args.new_task, "upstream": upstream, "shots": args.shots,
                           "val_examples": len(held_out["labels"]), "l1": args.l1,
                           "max_evals": args.max_evals or MAX_EVALS[args.quick], "seed": args.seed,
                           "steps": args.steps or STEPS[args.quick],
                           "rank": RANK, "alpha": ALPHA, "targets": TARGETS,
                           "optimizer": "scipy Nelder-Mead, bounds [-1.5, 1.5], start 1/N"},
                   library=library, wall_time_s=round(time.perf_counter() - start, 1))
    (out / "lorahub.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(report_md(results))
    plot(results, out / "lorahub.png")
    return results


def build_base(out: Path, seed: int):
    """MiniLM + 2-way head, everything frozen; the head is saved once so reruns reuse adapters."""
    torch.manual_seed(seed)
    loaded = load("minilm", task="classification", num_labels=2)
    model, head = loaded.model, out / "head.safetensors"
    if head.is_file():
        model.classifier.load_state_dict(load_file(str(head)))
    else:
        save_file({k: v.contiguous() for k, v in model.classifier.state_dict().items()}, str(head))
    model.requires_grad_(False)
    return model.eval(), loaded.tokenizer


def ensure_adapter(model, task: str, out: Path, encode, args) -> dict:
    """Load DIR/adapters/<task> or train it (head frozen); returns its own-task validation accuracy."""
    path = out / "adapters" / task
    train, val = binary_text.split(task, seed=args.seed)
    info = {"trained_now": not (path / "adapter_config.json").is_file()}
    if info["trained_now"]:
        cfg = LoraConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS)
        (add_adapter(model, task, cfg) if has_lora(model) else apply_lora(model, cfg, task))
        set_adapter(model, task)
        info.update(train_adapter(model, encode(train), args.steps or STEPS[args.quick], args.seed))
        save_adapter(model, path, adapter_name=task)
    else:
        load_adapter(model, path, adapter_name=task)
    set_adapter(model, task)
    info["own_val_accuracy"] = metrics(model, encode(val[:VAL_SIZE[args.quick]]))["accuracy"]
    print(f"adapter {task}: own-task val accuracy {info['own_val_accuracy']:.3f}")
    return info


def train_adapter(model, data: dict, steps: int, seed: int) -> dict:
    """AdamW on the active adapter, linear decay, bf16 autocast (AMX on this CPU)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    gen = torch.Generator().manual_seed(seed)
    n, start = len(data["labels"]), time.perf_counter()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (min(BATCH, n),), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=data["input_ids"][idx],
                           attention_mask=data["attention_mask"][idx]).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), data["labels"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return {"steps": steps, "train_time_s": round(time.perf_counter() - start, 1),
            "final_train_loss": loss.item()}


def _encode(tokenizer, pairs) -> dict:
    """(text, label) pairs -> input_ids, attention_mask (N, <= MAX_LENGTH) and labels (N,)."""
    enc = tokenizer([t for t, _ in pairs], padding=True, truncation=True, max_length=MAX_LENGTH,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([label for _, label in pairs])}


def metrics(model, data: dict, batch: int = 128) -> dict:
    """Cross-entropy and accuracy of the model as it is (no gradients)."""
    losses, correct = [], 0
    with torch.no_grad():
        for s in range(0, len(data["labels"]), batch):
            logits = model(input_ids=data["input_ids"][s:s + batch],
                           attention_mask=data["attention_mask"][s:s + batch]).logits
            labels = data["labels"][s:s + batch]
            losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
    n = len(data["labels"])
    return {"loss": float(sum(losses) / n), "accuracy": correct / n}


def evaluate_all(model, upstream: list[str], shots: dict, held_out: dict, encode, args) -> dict:
    """Few-shot and held-out metrics of every configuration, and LoraHub's searches; the model is
    left with the library adapters only."""
    rows = {}

    def record(name: str, **extra) -> None:
        rows[name] = {"fewshot": metrics(model, shots), "val": metrics(model, held_out), **extra}
        print(f"{name:<28} few-shot acc {rows[name]['fewshot']['accuracy']:.3f}  "
              f"val acc {rows[name]['val']['accuracy']:.3f}")

    with disable_adapter(model):
        record("base (no adapter)")
    for task in upstream:
        set_adapter(model, task)
        record(f"only {task}")
    uniform = {t: 1.0 / len(upstream) for t in upstream}
    searches = {}
    for mode in ("cat", "linear"):
        report = combine_adapters(model, uniform, mode=mode, new_name=f"uniform_{mode}")
        set_adapter(model, f"uniform_{mode}")
        record(f"uniform ({mode})", combine_rel_error=report["rel_error"])
        weights, search = lorahub(model, upstream, shots, fewshot_loss, mode=mode, l1=args.l1,
                                  max_evals=args.max_evals or MAX_EVALS[args.quick],
                                  new_name=f"lorahub_{mode}")
        record(f"LoraHub ({mode})", weights=weights, combine_rel_error=search["combine_rel_error"])
        searches[mode] = {k: v for k, v in search.items() if k != "history"} | {
            "objective_history": [h["objective"] for h in search["history"]]}
        for name in (f"uniform_{mode}", f"lorahub_{mode}"):
            set_adapter(model, upstream[0])
            delete_adapter(model, name)
    add_adapter(model, "fewshot_lora", LoraConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS))
    set_adapter(model, "fewshot_lora")
    trained = train_adapter(model, shots, args.steps or STEPS[args.quick], args.seed)
    record("LoRA trained on the k shots", **trained)
    set_adapter(model, upstream[0])
    delete_adapter(model, "fewshot_lora")
    return {"rows": rows, "searches": searches}


def fewshot_loss(model, shots: dict) -> float:
    """LoraHub's objective before its L1 term: cross-entropy on the k shots."""
    return metrics(model, shots)["loss"]
