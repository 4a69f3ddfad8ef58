"""The ``lorakit`` command line (also ``python -m lorakit``).

One pair of functions per verb: ``_add_<verb>(subparsers)`` declares its arguments and points
``run`` at ``cmd_<verb>(args)``, which does the work. Adding a verb is two functions and one entry
in ``VERBS``. Heavy imports (transformers, the demo) happen inside the verb that needs them, so
``lorakit --help`` is instant.

    lorakit inspect MODEL [--targets query,value | --regex RE] [--r 8] [--alpha 16] [--rslora]
    lorakit merge --base MODEL --adapter DIR --out DIR
    lorakit train / compare / demo      (cli_experiments.py)
    lorakit analyze                     (cli_analysis.py)
    lorakit lorahub                     (cli_lorahub.py)

A refused command (lorakit.LoraError) prints its message and exits with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from lorakit.cli_analysis import add_analyze
from lorakit.cli_lorahub import add_lorahub
from lorakit.cli_experiments import add_compare, add_demo, add_train
from lorakit.config import ALL_LINEAR
from lorakit.errors import LoraError
from lorakit.io import folder_bytes

MB = 2**20
REGEX_CHARS = set("*+?[](){}|^$\\")
MERGE_TOLERANCE = 1e-4      # max |output difference| between adapter model and merged model (fp32)
SAMPLE_TEXT = ["LoRA adds a low-rank update to frozen weights and merges it back exactly.",
               "A second, shorter sample."]


# --- inspect ----------------------------------------------------------------------------------------
def _add_inspect(sub) -> None:
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
    _add_model_task(p)
    p.add_argument("--modules-to-save", help="comma-separated modules trained in full, e.g. classifier")
    p.set_defaults(run=cmd_inspect)


def cmd_inspect(args) -> int:
    from lorakit import LoraConfig, apply_lora, plan_lora, save_adapter
    from lorakit.models import load

    targets = args.regex or (parse_targets(args.targets) if args.targets else None)  # fail fast
    loaded = load(args.model, task=args.task, num_labels=args.num_labels)
    model = loaded.model
    if targets is None:
        print(module_summary(model))
        print(f"\nno --targets given: the plan below is for {ALL_LINEAR!r}; pick modules with "
              "--targets query,value (suffixes) or --regex\n")
        targets = ALL_LINEAR
    cfg = LoraConfig(r=args.r, alpha=args.alpha, target_modules=targets, rslora=args.rslora,
                     modules_to_save=_split(args.modules_to_save))
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


def module_summary(model) -> str:
    """The modules LoRA can wrap, grouped by name with block indices folded to '*'."""
    from lorakit.targeting import candidate_modules, module_kind

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


# --- merge ------------------------------------------------------------------------------------------
def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="fold an adapter into its base model and save a plain Hugging "
                                     "Face model (no LoRA code needed at inference)")
    p.add_argument("--base", required=True, help="the base model: a known name or a local directory")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + "
                                                    "adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="folder for the merged model and its tokenizer")
    _add_model_task(p, auto=True)
    p.set_defaults(run=cmd_merge)


def cmd_merge(args) -> int:
    import torch

    from lorakit import load_adapter, merge_and_unload, read_adapter
    from lorakit.models import load, resolve

    out = Path(args.out)
    base_dir, _ = resolve(args.base)
    for name, other in (("--base", base_dir), ("--adapter", Path(args.adapter))):
        if out.resolve() == other.resolve():
            raise LoraError(f"--out {out} is the same folder as {name}; writing there would "
                            "overwrite it. Choose a new folder")
    cfg, tensors, _ = read_adapter(args.adapter)
    task, num_labels = args.task, args.num_labels
    if task == "auto":
        task, found = infer_task(cfg.modules_to_save, tensors)
        num_labels = num_labels or found
        print(f"task: {task}" + (f" with {num_labels} labels (from the adapter's head)"
                                 if task == "classification" else ""))
    loaded = load(args.base, task=task, num_labels=num_labels or 2)
    model = load_adapter(loaded.model, args.adapter)
    sample = dict(loaded.tokenizer(SAMPLE_TEXT, padding=True, return_tensors="pt"))
    with torch.no_grad():
        with_adapter = model_output(model, sample)
        merged = merge_and_unload(model)
        in_memory = model_output(merged, sample)
        merged.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
        from_disk = model_output(load(out, task=task, num_labels=num_labels or 2).model, sample)
    diffs = {"merged in memory": (with_adapter - in_memory).abs().max().item(),
             f"merged reloaded from {out}": (with_adapter - from_disk).abs().max().item()}
    for name, value in diffs.items():
        print(f"max |adapter model - {name}| on a sample input: {value:.2e}")
    print(f"wrote merged model + tokenizer to {out} ({folder_bytes(out) / MB:.1f} MB)")
    if not max(diffs.values()) <= MERGE_TOLERANCE:
        raise LoraError(f"merged outputs differ from the adapter model's by {max(diffs.values()):.2e} "
                        f"(> {MERGE_TOLERANCE}); the adapter may hold extreme values. Check it with "
                        "lorakit.read_adapter before using the merged model")
    return 0


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


def model_output(model, batch):
    """The tensor to compare: logits for a head model, the last hidden state for a bare encoder."""
    model.eval()
    out = model(**batch)
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name).float()
    return out[0].float()


# --- shared -----------------------------------------------------------------------------------------
VERBS = (_add_inspect, add_train, add_compare, _add_merge, add_demo, add_analyze, add_lorahub)


def _add_model_task(p, auto: bool = False) -> None:
    choices = ("auto", "base", "classification") if auto else ("base", "classification")
    p.add_argument("--task", choices=choices, default=choices[0],
                   help="base: the bare encoder; classification: + a sequence-classification head"
                        + ("; auto: classification if the adapter carries a head" if auto else ""))
    p.add_argument("--num-labels", type=int, default=None if auto else 2,
                   help="outputs of the classification head" + (" (default: from the adapter)"
                                                               if auto else " (default 2)"))


def _split(text: str | None) -> list[str] | None:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    return items or None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Low-Rank Adaptation for PyTorch "
                                     "models: inspect, train, compare, merge, analyze, lorahub, demo.")
    from lorakit import __version__
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except LoraError as err:
        print(f"lorakit {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
