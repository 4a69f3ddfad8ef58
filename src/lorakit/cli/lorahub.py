"""``lorakit lorahub [--quick] --out DIR``: LoraHub (Huang et al. 2023) on real text tasks, end to end.

A library of task adapters on MiniLM, then LoraHub's combination weights for a new task from a few
examples, against the base, each adapter alone, uniform weights and LoRA trained on the same examples
(experiments/lorahub.py runs it). Writes DIR/lorahub.json, DIR/report.md, DIR/lorahub.png.

``--suite all --seeds 3``: LoraHub as its paper ran it, over every task in turn (leave-one-out
library), nevergrad's search, with the spread over seeds (experiments/lorahub_suite.py); writes
DIR/lorahub_suite.json and DIR/report.md.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LoraError
from lorakit.experiments.lorahub import UPSTREAM, run_lorahub
from lorakit.experiments.lorahub_suite import run_suite
from lorakit.report.lorahub import report_md
from lorakit.tasks import binary_text


def register(sub) -> None:
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
    p.add_argument("--suite", help="comma-separated tasks, or 'all': each is the new task once, the "
                                   "others its library (LoraHub's protocol: nevergrad, 40 evaluations)")
    p.add_argument("--seeds", type=int, default=3, help="with --suite: seeds 0..N-1 draw the shots and "
                                                        "seed the search (default 3)")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.suite:
        return run_suite_verb(args)
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
    results = run_lorahub(args, upstream, out)
    print(report_md(results))
    print(f"wrote {out / 'lorahub.json'}, report.md, lorahub.png ({results['wall_time_s']} s)")
    return 0


def run_suite_verb(args) -> int:
    tasks = list(binary_text.TASKS) if args.suite == "all" else [t.strip() for t in args.suite.split(",")]
    for task in tasks:
        binary_text.load(task)                                 # unknown names fail here
    if len(set(tasks)) < 3:
        raise LoraError(f"--suite {args.suite!r}: give at least 3 distinct tasks (each new task needs a "
                        f"library of 2 or more), or 'all'")
    if args.seeds < 1 or args.shots < 2 or (args.steps is not None and args.steps < 1):
        raise LoraError(f"--seeds {args.seeds}, --shots {args.shots}, --steps {args.steps}: need seeds >= 1, "
                        f"shots >= 2, steps >= 1")
    results = run_suite(args, list(dict.fromkeys(tasks)), Path(args.out))
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {args.out}/lorahub_suite.json and report.md ({results['wall_time_s']} s)")
    return 0
