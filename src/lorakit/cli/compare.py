"""``lorakit compare --task TASK [--methods full,frozen,lora] [--sizes 2,8,32] [--seeds 3] [--quick] --out DIR``.

Every method on the same task, data and seed, each in its own ``lorakit train`` process, then one
report (experiments/compare.py). Training flags given here are passed on to every run.
"""

from __future__ import annotations

from lorakit.cli.common import add_train_flags, split
from lorakit.errors import LoraError
from lorakit.experiments.compare import run_compare

PASSED_ON = ("seed", "device", "precision", "max_steps", "batch_size", "eval_every", "whisper")


def register(sub) -> None:
    p = sub.add_parser("compare", help="every method on the same task, data and seed: results.json, "
                                       "report.md, plots")
    add_train_flags(p, single_run=False)
    p.add_argument("--methods", help="comma-separated (default: the task's set)")
    p.add_argument("--fresh", action="store_true", help="retrain methods that already finished in --out")
    p.add_argument("--sizes", help="comma-separated sizes (LoRA rank, adapter width, prefix length): each "
                                   "sized method runs once per size, as METHOD-rSIZE (the paper's Figure 2)")
    p.add_argument("--seeds", type=int, help="run every method at seeds 0..N-1: tables show mean ± std, "
                                             "curves a band, results.json a 95%% interval")
    p.add_argument("--whisper", choices=("tiny.en", "base"), help="gw: the Whisper encoder (default tiny.en)")
    p.add_argument("--report-only", action="store_true", help="rebuild results.json and report.md from the "
                                                              "runs already finished in --out; train nothing")
    p.add_argument("--time-pairs", type=int, default=0,
                   help="after training, time N interleaved pairs of lora and full steps in one process: "
                        "their cost ratio with a 95%% interval in the report (demo: 16)")
    p.set_defaults(run=run)


def run(args) -> int:
    sizes = [parse_size(s) for s in split(args.sizes) or []]
    run_compare(args.task, split(args.methods), args.out, quick=args.quick,
                train_args=passthrough(args), data_dir=args.data_dir, fresh=args.fresh,
                sizes=sizes or None, seeds=args.seeds, time_pairs=args.time_pairs,
                report_only=args.report_only)
    return 0


def passthrough(args) -> list[str]:
    """compare's training flags, as `lorakit train` arguments for each method's process."""
    argv = []
    for name in PASSED_ON:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv + (["--no-progress"] if args.no_progress else [])


def parse_size(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise LoraError(f"--sizes item {text!r} is not a positive whole number; e.g. --sizes 2,8,32")
    return int(text)
