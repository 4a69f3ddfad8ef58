"""``lorakit inspect MODEL [--targets query,value | --regex RE] [--r 8] [--alpha 16] [--rslora]
[--quantize nf4|int8 [--quantize-embeddings]]``.

What LoRA would adapt in a model: the adaptable modules, the plan (shapes, parameters), and the
adapter's size on disk, measured by saving it to a temporary folder. Changes nothing on disk.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from lorakit.cli.common import MB, add_model_task, parse_targets, split
from lorakit.config import ALL_LINEAR, LoraConfig
from lorakit.inject import apply_lora
from lorakit.io import folder_bytes, save_adapter
from lorakit.models import load
from lorakit.plan import plan_lora
from lorakit.quant import check_embeddings_option, quantize_with_report
from lorakit.targeting import candidate_modules, module_kind


def register(sub) -> None:
    p = sub.add_parser("inspect", help="what LoRA would adapt in a model: modules, shapes, params, "
                                       "sizes (changes nothing on disk)")
    p.add_argument("model", help="a known name (minilm) or a local Hugging Face model directory")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--targets", help="comma-separated module-name suffixes (query,value) or "
                                         "all-linear; without it the adaptable modules are listed and "
                                         "the plan is shown for all-linear")
    which.add_argument("--regex", help="one regex matched against full module names, e.g. "
                                       r"'.*layer\.[0-2]\..*(query|value)'")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scale = alpha/r (default 16)")
    p.add_argument("--rslora", action="store_true", help="scale = alpha/sqrt(r) (rsLoRA)")
    add_model_task(p)
    p.add_argument("--modules-to-save", help="comma-separated modules trained in full, e.g. classifier")
    p.add_argument("--quantize", choices=("nf4", "int8"),
                   help="store the frozen linear weights as NF4 (QLoRA) or int8 first, and show the "
                        "weight memory before and after per module type")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="with --quantize: also quantize the input embeddings and the output head (kept "
                        "16/32-bit by default, as QLoRA does)")
    p.set_defaults(run=run)


def run(args) -> int:
    targets = args.regex or (parse_targets(args.targets) if args.targets else None)  # fail fast
    check_embeddings_option(args.quantize, args.quantize_embeddings)
    loaded = load(args.model, task=args.task, num_labels=args.num_labels)
    model = loaded.model
    if args.quantize:
        print(quantize_with_report(model, args.quantize, embeddings=args.quantize_embeddings) + "\n")
    if targets is None:
        print(module_summary(model))
        print(f"\nno --targets given: the plan below is for {ALL_LINEAR!r}; pick modules with "
              "--targets query,value (suffixes) or --regex\n")
        targets = ALL_LINEAR
    cfg = LoraConfig(r=args.r, alpha=args.alpha, target_modules=targets, rslora=args.rslora,
                     modules_to_save=split(args.modules_to_save))
    plan = plan_lora(model, cfg)
    print(f"{loaded.name} ({type(model).__name__}), r={cfg.r}, alpha={cfg.alpha:g}, "
          f"{'rsLoRA ' if cfg.rslora else ''}scale={cfg.scale_for(plan.rows[0].name):.3g}\n")
    print(plan)
    with tempfile.TemporaryDirectory() as tmp:         # measure the real file, header and all
        adapter_bytes = folder_bytes(save_adapter(apply_lora(model, cfg), tmp))
    model_bytes, source = model_size(loaded.path, plan.base_params)
    print(f"\ntotal params:      {plan.total_params:,} (base {plan.base_params:,} + LoRA "
          f"{plan.lora_params:,}" + (f" + modules_to_save copies {sum(plan.saved_modules.values()):,}"
                                    if plan.saved_modules else "") + ")")
    print(f"LoRA params:       {plan.lora_params:,}")
    print(f"trainable:         {plan.trainable_params:,} ({plan.trainable_pct:.3f}% of total)")
    print(f"adapter on disk:   {adapter_bytes / MB:.2f} MB (measured: saved to a temp dir)")
    print(f"full model:        {model_bytes / MB:.2f} MB ({source}), "
          f"{model_bytes / adapter_bytes:.0f}x the adapter")
    return 0


def module_summary(model) -> str:
    """The modules LoRA can wrap, grouped by name with block indices folded to '*'."""
    groups: dict[tuple[str, str], int] = {}
    for name, module in candidate_modules(model):
        if module_kind(module) is None:
            continue
        key = (re.sub(r"\.\d+(?=\.|$)", ".*", name), _describe(module))
        groups[key] = groups.get(key, 0) + 1
    width = max((len(n) for n, _ in groups), default=0)
    lines = [f"adaptable modules ({sum(groups.values())}; --targets takes the last name part):"]
    lines += [f"  {n:<{width}}  {d}  x{c}" for (n, d), c in groups.items()]
    return "\n".join(lines)


def _describe(module) -> str:
    if hasattr(module, "in_features"):
        return f"{type(module).__name__}({module.in_features} -> {module.out_features})"
    if hasattr(module, "num_embeddings"):
        return f"{type(module).__name__}({module.num_embeddings}, {module.embedding_dim})"
    return type(module).__name__


def model_size(path: Path, base_params: int) -> tuple[int, str]:
    """Bytes of the model's safetensors files, or 4 bytes a parameter when there are none."""
    files = sorted(Path(path).glob("*.safetensors"))
    if files:
        return sum(f.stat().st_size for f in files), ", ".join(f.name for f in files)
    return 4 * base_params, "fp32 estimate"
