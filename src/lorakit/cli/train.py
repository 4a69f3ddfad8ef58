"""``lorakit train --task TASK --method METHOD [...] --out DIR [--resume] [--quick]``: one run.

    lorakit train --task TASK --method METHOD [--r --alpha --targets --lr --batch-size --max-steps
                  --seed --checkpoint-every N --precision --device --quantize nf4|int8
                  [--quantize-embeddings]] --out DIR
                  [--resume] [--quick]

Training flags left out keep the task's defaults (``tasks/<task>.py``, ``train/settings.py``). The
run itself (files, checks) is experiments/run.py.
"""

from __future__ import annotations

from lorakit.cli.common import add_train_flags, parse_targets
from lorakit.experiments.run import run_training
from lorakit.quant import check_embeddings_option
from lorakit.tasks.base import ModelOptions

SETTING_FLAGS = ("seed", "device", "precision", "max_steps", "batch_size", "eval_every", "lr",
                 "checkpoint_every", "patience", "skip_nonfinite", "compile")


def register(sub) -> None:
    p = sub.add_parser("train", help="train one method on one task: metrics.jsonl, checkpoints, "
                                     "adapter/, result.json")
    add_train_flags(p, single_run=True)
    p.add_argument("--quantize", choices=("nf4", "int8"),
                   help="QLoRA: store the frozen base's linear weights as NF4 (or int8) under the "
                        "adapters; not with --method full")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="with --quantize: also quantize the input embeddings and the output head (kept "
                        "16/32-bit by default, as QLoRA does)")
    p.set_defaults(run=run)


def run(args) -> int:
    check_embeddings_option(args.quantize, args.quantize_embeddings)
    overrides = {k: getattr(args, k) for k in SETTING_FLAGS if getattr(args, k, None) is not None}
    options = ModelOptions(r=args.r, alpha=args.alpha,
                           targets=parse_targets(args.targets) if args.targets else None,
                           extra={**({"whisper": args.whisper} if args.whisper else {}),
                                  **({"quantize": args.quantize} if args.quantize else {}),
                                  **({"quantize_embeddings": True} if args.quantize_embeddings
                                     else {})})
    result = run_training(args.task, args.method, args.out, quick=args.quick, overrides=overrides,
                          options=options, resume=args.resume, data_dir=args.data_dir,
                          progress=not args.no_progress, fsdp=args.fsdp)
    if result.get("rank", 0):
        return 0                    # ranks other than 0 write and print nothing
    best = ", ".join(f"{k}={v:.4f}" for k, v in result["best"].items() if k.startswith("val_"))
    print(f"{args.task}/{args.method}: {result['steps']} steps in {result['train_time_s']:.1f} s, "
          f"best {best}; wrote {args.out}")
    return 0
