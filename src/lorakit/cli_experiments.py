"""The experiment verbs of the command line: ``train``, ``compare`` and ``demo`` (see cli.py).

    lorakit train   --task TASK --method METHOD [--r --alpha --targets --lr --batch-size --max-steps
                    --seed --checkpoint-every N --precision --device] --out DIR [--resume] [--quick]
    lorakit compare --task TASK [--methods full,frozen,lora] [--quick] --out DIR
    lorakit demo    = compare --task gw on its full defaults, into runs/demo/

Training flags left out keep the task's defaults (``tasks/<task>.py``, ``settings``).
"""

from __future__ import annotations

import time

DEMO_TASK = "gw"
DEMO_MINUTES = 12           # measured on 2 CPU cores with the data cache cold (see README)


def _add_train_flags(p, single_run: bool) -> None:
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


SETTING_FLAGS = ("seed", "device", "precision", "max_steps", "batch_size", "eval_every", "lr",
                 "checkpoint_every", "patience", "skip_nonfinite", "compile")


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train one method on one task: metrics.jsonl, checkpoints, "
                                     "adapter/, result.json")
    _add_train_flags(p, single_run=True)
    p.set_defaults(run=cmd_train)


def cmd_train(args) -> int:
    from lorakit.cli import parse_targets
    from lorakit.tasks.base import ModelOptions
    from lorakit.train.run import run_training

    overrides = {k: getattr(args, k) for k in SETTING_FLAGS if getattr(args, k, None) is not None}
    options = ModelOptions(r=args.r, alpha=args.alpha,
                           targets=parse_targets(args.targets) if args.targets else None,
                           extra={"whisper": args.whisper} if args.whisper else {})
    result = run_training(args.task, args.method, args.out, quick=args.quick, overrides=overrides,
                          options=options, resume=args.resume, data_dir=args.data_dir,
                          progress=not args.no_progress, fsdp=args.fsdp)
    if result.get("rank", 0):
        return 0                    # ranks other than 0 write and print nothing
    best = ", ".join(f"{k}={v:.4f}" for k, v in result["best"].items() if k.startswith("val_"))
    print(f"{args.task}/{args.method}: {result['steps']} steps in {result['train_time_s']:.1f} s, "
          f"best {best}; wrote {args.out}")
    return 0


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="every method on the same task, data and seed: results.json, "
                                       "report.md, plots")
    _add_train_flags(p, single_run=False)
    p.add_argument("--methods", help="comma-separated (default: the task's set)")
    p.add_argument("--fresh", action="store_true", help="retrain methods that already finished in --out")
    p.add_argument("--sizes", help="comma-separated sizes (LoRA rank, adapter width, prefix length): each "
                                   "sized method runs once per size, as METHOD-rSIZE (the paper's Figure 2)")
    p.set_defaults(run=cmd_compare)


def cmd_compare(args) -> int:
    from lorakit.cli import _split
    from lorakit.compare import run_compare

    sizes = [parse_size(s) for s in _split(args.sizes) or []]
    run_compare(args.task, _split(args.methods), args.out, quick=args.quick,
                train_args=_passthrough(args), data_dir=args.data_dir, fresh=args.fresh,
                sizes=sizes or None)
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help=f"the main job: compare full fine-tuning, frozen encoder and LoRA "
                                    f"on gravitational-wave detection (~{DEMO_MINUTES} min on 2 cores)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="small data, few steps (~3 min)")
    p.add_argument("--device", help="auto (default), cpu, cuda")
    p.set_defaults(run=cmd_demo)


def cmd_demo(args) -> int:
    from lorakit.compare import run_compare

    minutes = 3 if args.quick else DEMO_MINUTES
    print(f"lorakit demo: a pretrained Whisper tiny.en encoder learns to spot black-hole mergers in "
          f"3-detector strain, trained three ways (full fine-tuning, frozen encoder, LoRA r=8 on "
          f"q,k,v). About {minutes} minutes on 2 CPU cores (the first run also simulates the data); "
          f"finished methods are reused if you stop and rerun. Output: {args.out}/", flush=True)
    started = time.perf_counter()
    train_args = ["--device", args.device] if args.device else []
    run_compare(DEMO_TASK, None, args.out, quick=args.quick, train_args=train_args)
    print(f"demo finished in {(time.perf_counter() - started) / 60:.1f} min; open "
          f"{args.out}/report.md", flush=True)
    return 0


def _passthrough(args) -> list[str]:
    """compare's training flags, as `lorakit train` arguments for each method's process."""
    argv = []
    for name in ("seed", "device", "precision", "max_steps", "batch_size", "eval_every"):
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv + (["--no-progress"] if args.no_progress else [])


def parse_size(text: str) -> int:
    from lorakit.errors import LoraError
    if not text.isdigit() or int(text) < 1:
        raise LoraError(f"--sizes item {text!r} is not a positive whole number; e.g. --sizes 2,8,32")
    return int(text)
