"""LoraHub as its paper ran it (Huang et al. 2023), over a suite of few-shot tasks and several seeds.

Protocol (``lorakit lorahub --suite all --seeds 3``):
    library   one LoRA per task of the suite (experiments/lorahub.py: MiniLM, r=8 on query, value,
              the pooler; one frozen random head), trained once (seed 0) and reused
    per task  leave-one-out: the new task's own adapter is left out, the other N-1 form the library
    per seed  k shots drawn from the new task's training split with that seed; nevergrad's NGOpt
              from w = 0, 40 evaluations, L1 0.05, box [-1.5, 1.5], combination by summing A's and
              B's (LoraHub's; ``linear``) and the exact ``cat`` form
    rows      before (the base, no adapter); best single upstream adapter picked by few-shot loss
              (what one could do with the k shots) and the oracle best by held-out accuracy;
              uniform weights; LoraHub (linear, cat); LoRA trained by gradient on the k shots
Held-out accuracy on the same fixed validation examples for every seed; the summary averages over
tasks per seed, then gives mean ± std over seeds and whether LoraHub's gap to each baseline exceeds
that spread (report/stats.py). Writes DIR/lorahub_suite.json and DIR/report.md.
"""

from __future__ import annotations

import json
import random
import time
from argparse import Namespace
from pathlib import Path

from lorakit.adapters import add_adapter, delete_adapter, disable_adapter, set_adapter
from lorakit.config import LoraConfig
from lorakit.experiments.lorahub import (ALPHA, RANK, STEPS, TARGETS, VAL_SIZE, _encode, build_base,
                                         ensure_adapter, fewshot_loss, metrics, train_adapter)
from lorakit.report.lorahub_suite import suite_report
from lorakit.tasks import binary_text
from lorakit.tools.combine import combine_adapters
from lorakit.tools.lorahub import lorahub

LORAHUB_EVALS, LORAHUB_L1 = 40, 0.05           # the LoraHub paper's budget and L1 weight
ROWS = ("base (before)", "best single (by few-shot loss)", "best single (oracle, held-out)",
        "uniform (linear)", "LoraHub (linear)", "LoraHub (cat)", "LoRA on the k shots")


def run_suite(args, tasks: list[str], out: Path) -> dict:
    """args: shots, seeds, max_evals, l1, steps, quick. Returns {"tasks": {task: {seed: rows}},
    "summary", "config"} and writes DIR/lorahub_suite.json, DIR/report.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapters").mkdir(exist_ok=True)
    start = time.perf_counter()
    model, tokenizer = build_base(out, 0)
    encode = lambda pairs: _encode(tokenizer, pairs)          # noqa: E731
    library_args = Namespace(steps=args.steps, quick=args.quick, seed=0)
    library = {t: ensure_adapter(model, t, out, encode, library_args) for t in tasks}
    evals, l1 = args.max_evals or LORAHUB_EVALS, LORAHUB_L1 if args.l1 is None else args.l1
    results = {"tasks": {}, "library": library}
    for new in tasks:
        upstream = [t for t in tasks if t != new]
        train, val = binary_text.split(new, seed=0)
        held_out = encode(val[:VAL_SIZE[args.quick]])
        results["tasks"][new] = {}
        for seed in range(args.seeds):
            shots = encode(random.Random(seed).sample(train, min(args.shots, len(train))))
            rows = one_task(model, upstream, shots, held_out, evals, l1, seed, args)
            results["tasks"][new][str(seed)] = rows
            print(f"{new} seed {seed}: " + ", ".join(f"{k} {v['val']:.3f}" for k, v in rows.items()),
                  flush=True)
    chosen = sorted({row["algorithm"] for per_task in results["tasks"].values() for rows in per_task.values()
                     for row in rows.values() if "algorithm" in row})
    results["config"] = {"tasks": tasks, "shots": args.shots, "seeds": args.seeds, "max_evals": evals,
                         "l1": l1, "optimizer": f"nevergrad NGOpt (it chose {', '.join(chosen)}), start 0, "
                                                "box [-1.5, 1.5]",
                         "val_examples": VAL_SIZE[args.quick], "rank": RANK, "targets": TARGETS,
                         "steps": args.steps or STEPS[args.quick]}
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    report = suite_report(results)
    results["summary"] = report["summary"]
    (out / "lorahub_suite.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(report["markdown"])
    return results


def one_task(model, upstream: list[str], shots: dict, held_out: dict, evals: int, l1: float, seed: int,
             args) -> dict:
    """{row: {"val": held-out accuracy, "fewshot_loss", ...}} for one new task and seed; the model is
    left with the library adapters only."""
    rows = {}

    def record(name: str, **extra) -> None:
        rows[name] = {"val": metrics(model, held_out)["accuracy"], "fewshot_loss": fewshot_loss(model, shots),
                      **extra}

    with disable_adapter(model):
        record("base (before)")
    singles = {}
    for task in upstream:
        set_adapter(model, task)
        singles[task] = {"val": metrics(model, held_out)["accuracy"], "fewshot_loss": fewshot_loss(model, shots)}
    chosen = min(singles, key=lambda t: singles[t]["fewshot_loss"])
    oracle = max(singles, key=lambda t: singles[t]["val"])
    rows["best single (by few-shot loss)"] = {**singles[chosen], "adapter": chosen}
    rows["best single (oracle, held-out)"] = {**singles[oracle], "adapter": oracle}
    combine_adapters(model, {t: 1.0 / len(upstream) for t in upstream}, mode="linear", new_name="uniform")
    set_adapter(model, "uniform")
    record("uniform (linear)")
    for mode in ("linear", "cat"):
        weights, search = lorahub(model, upstream, shots, fewshot_loss, mode=mode, l1=l1, max_evals=evals,
                                  new_name=f"lorahub_{mode}", optimizer="nevergrad", seed=seed)
        record(f"LoraHub ({mode})", weights=weights, evaluations=search["evaluations"],
               objective=search["best"]["objective"], algorithm=search["algorithm"])
    add_adapter(model, "fewshot_lora", LoraConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS))
    set_adapter(model, "fewshot_lora")
    train_adapter(model, shots, args.steps or STEPS[args.quick], seed)
    record("LoRA on the k shots")
    set_adapter(model, upstream[0])
    for name in ("uniform", "lorahub_linear", "lorahub_cat", "fewshot_lora"):
        delete_adapter(model, name)
    return rows
