"""``lorakit lorahub [--quick] --out DIR``: LoraHub (seed 002) on real text tasks, end to end.

    base     pretrained MiniLM-L6 + a seeded random 2-way head, frozen (saved as DIR/head.safetensors),
             so every adapter is a complete binary classifier and adapters can be combined
    library  one LoRA per upstream task (r=8 on query, value and the pooler), trained with the head
             frozen, saved in DIR/adapters/<task>/ and reused by later runs
    new task k labelled examples (default 32) of a task no adapter was trained on (default:
             General Inquirer word polarity); LoraHub searches the weights (lorakit/lorahub.py)
    report   few-shot loss/accuracy and held-out accuracy for: the bare base, each upstream adapter
             alone, uniform weights, LoraHub's weights (modes cat and linear), and LoRA trained by
             gradient on the same k examples (the reference LoraHub tries to approach without
             gradients). Writes DIR/lorahub.json, DIR/report.md, DIR/lorahub.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

UPSTREAM = {True: ("sentiment", "speech-party", "word-strength"),
            False: ("sentiment", "speech-party", "debate-party", "word-strength", "word-activity")}
STEPS = {True: 100, False: 250}                   # upstream training steps (quick, full)
VAL_SIZE = {True: 300, False: 600}
MAX_EVALS = {True: 30, False: 60}
TARGETS = ["query", "value", "pooler.dense"]
RANK, ALPHA, LR, BATCH, MAX_LENGTH = 8, 16.0, 5e-3, 16, 64


def add_lorahub(sub) -> None:
    p = sub.add_parser("lorahub", help="LoraHub: train a library of task adapters, then find "
                                       "combination weights for a new task from a few examples")
    p.add_argument("--out", required=True, help="folder for adapters, lorahub.json, report, plot")
    p.add_argument("--quick", action="store_true", help="3 upstream adapters, fewer steps (~3 min)")
    p.add_argument("--new-task", default="word-polarity", help="the few-shot task (default "
                                                               "word-polarity)")
    p.add_argument("--upstream", help="comma-separated upstream tasks (default: by --quick)")
    p.add_argument("--shots", type=int, default=32, help="few-shot examples of the new task")
    p.add_argument("--l1", type=float, default=0.05, help="L1 penalty on the weights (LoraHub: 0.05)")
    p.add_argument("--max-evals", type=int, help="few-shot evaluations per search (default 30 quick, "
                                                 "60 full)")
    p.add_argument("--steps", type=int, help="training steps per adapter (default 100 quick, "
                                             "250 full)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_lorahub)


def cmd_lorahub(args) -> int:
    from lorakit.errors import LoraError
    from lorakit.tasks import binary_text

    upstream = [t.strip() for t in args.upstream.split(",")] if args.upstream else \
        list(UPSTREAM[args.quick])
    for task in upstream + [args.new_task]:
        binary_text.load(task)                                 # unknown names fail here
    if args.new_task in upstream:
        raise LoraError(f"--new-task {args.new_task!r} is also an upstream task; LoraHub is for a "
                        "task no adapter was trained on")
    if args.steps is not None and args.steps < 1:
        raise LoraError(f"--steps {args.steps} must be at least 1")
    if args.shots < 2:
        raise LoraError(f"--shots {args.shots} is too few; use e.g. 32")
    out = Path(args.out)
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
    print(report_md(results))
    print(f"wrote {out / 'lorahub.json'}, report.md, lorahub.png ({results['wall_time_s']} s)")
    return 0


# --- model and training -------------------------------------------------------------------------
def build_base(out: Path, seed: int):
    """MiniLM + 2-way head, everything frozen; the head is saved once so reruns reuse adapters."""
    import torch
    from safetensors.torch import load_file, save_file

    from lorakit.models import load

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
    from lorakit import LoraConfig, add_adapter, apply_lora, load_adapter, save_adapter, set_adapter
    from lorakit.state import has_lora
    from lorakit.tasks import binary_text

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
    import torch

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
    import torch
    enc = tokenizer([t for t, _ in pairs], padding=True, truncation=True, max_length=MAX_LENGTH,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([label for _, label in pairs])}


def metrics(model, data: dict, batch: int = 128) -> dict:
    """Cross-entropy and accuracy of the model as it is (no gradients)."""
    import torch
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


# --- the comparison -------------------------------------------------------------------------------
def evaluate_all(model, upstream: list[str], shots: dict, held_out: dict, encode, args) -> dict:
    from lorakit import (add_adapter, combine_adapters, delete_adapter, disable_adapter,
                         set_adapter)
    from lorakit.config import LoraConfig
    from lorakit.lorahub import lorahub

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
    return metrics(model, shots)["loss"]


# --- outputs --------------------------------------------------------------------------------------
def report_md(results: dict) -> str:
    cfg = results["config"]
    lines = [f"# LoraHub on {cfg['new_task']} ({cfg['shots']} shots, {cfg['val_examples']} held-out)",
             "", f"upstream adapters: {', '.join(cfg['upstream'])}; optimizer: {cfg['optimizer']}, "
             f"{cfg['max_evals']} evaluations, L1 {cfg['l1']}", "",
             "| configuration | few-shot loss | few-shot acc | held-out acc | weights |",
             "|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        weights = ", ".join(f"{k} {v:+.2f}" for k, v in row.get("weights", {}).items())
        lines.append(f"| {name} | {row['fewshot']['loss']:.3f} | {row['fewshot']['accuracy']:.3f} | "
                     f"{row['val']['accuracy']:.3f} | {weights} |")
    lines += ["", "own-task validation accuracy of each upstream adapter: " + ", ".join(
        f"{t} {info['own_val_accuracy']:.3f}" for t, info in results["library"].items())]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    names = list(rows)
    left.barh(names, [rows[n]["val"]["accuracy"] for n in names], color="tab:blue")
    left.invert_yaxis()
    left.set_xlabel(f"held-out accuracy on {results['config']['new_task']}")
    left.set_xlim(0.3, 1.0)
    upstream = results["config"]["upstream"]
    width = 0.38
    for k, mode in enumerate(("cat", "linear")):
        weights = rows[f"LoraHub ({mode})"]["weights"]
        right.bar([i + (k - 0.5) * width for i in range(len(upstream))],
                  [weights[t] for t in upstream], width, label=mode)
    right.set_xticks(range(len(upstream)))
    right.set_xticklabels(upstream, rotation=30, fontsize=7)
    right.axhline(0, color="black", linewidth=0.5)
    right.set_ylabel("LoraHub weight")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
