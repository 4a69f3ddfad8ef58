"""``lorakit finetune --model M --data FILE --out DIR``: LoRA on your model and your data.

Every option is also a key of ``--config FILE`` (TOML/YAML/JSON); flags given on the command line win.
Options left out here keep the config file's value or the default (finetune/config.py).
"""

from __future__ import annotations

import argparse

from lorakit.finetune.config import PROMPT_FORMATS, TASKS, resolve
from lorakit.finetune.run import run_finetune

BOOL = argparse.BooleanOptionalAction


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="LoRA-finetune a model on your data file (SFT or classification) -> "
                         "DIR/adapter (PEFT format), report.md",
        description="Supervised finetuning with LoRA (Hu et al. 2021) of a built-in model (smollm2, "
                    "minilm), a local Hugging Face folder or a GGUF file, on local JSONL/JSON/CSV/"
                    "Parquet data. SFT records: messages | prompt+completion | instruction+input+"
                    "output | text; classification: text and label columns.")
    add = p.add_argument
    add("--model", help="built-in name (smollm2, minilm), local HF folder, or .gguf file")
    add("--data", help="training data: .jsonl, .json, .csv or .parquet")
    add("--out", help="output folder (adapter/, report.md, metrics.jsonl, checkpoints/)")
    add("--config", help="a .toml/.yaml/.json file of the same keys as these flags")
    add("--val-data", help="validation data (default: --val-fraction of --data)")
    add("--val-fraction", type=float, help="share of --data held out for validation (default 0.05)")
    add("--task", choices=TASKS, help="sft or classify (default auto: classify when the data has "
                                      "a label column)")
    add("--text-column", help="classification text column (default text)")
    add("--label-column", help="classification label column (default label)")
    add("--prompt-format", choices=PROMPT_FORMATS, help="chat: render with the tokenizer's chat "
        "template; plain: text as it is; auto (default): chat when the tokenizer has a template")
    add("--chat-template", help="a Jinja chat template file to use instead of the tokenizer's")
    add("--train-on-prompt", action=BOOL, help="SFT loss on prompt tokens too (default: "
                                                "completion tokens only)")
    add("--max-seq-len", type=int, help="tokens per example; longer ones are cut and counted "
                                        "(default 1024)")
    add("--pack", action=BOOL, help="pack short examples into --max-seq-len rows (attention stays "
                                    "within each example)")
    add("--max-examples", type=int, help="use the first N training records")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--r", type=int, help="rank (default 8)")
    lora.add_argument("--alpha", type=float, help="scale = alpha / r (default 16)")
    lora.add_argument("--targets", help="module-name suffixes, e.g. q_proj,v_proj, or all-linear "
                                        "(default)")
    lora.add_argument("--dropout", type=float, help="LoRA dropout (default 0)")
    lora.add_argument("--rslora", action=BOOL, help="scale = alpha / sqrt(r) (rsLoRA)")
    lora.add_argument("--dora", action=BOOL, help="DoRA: learn a magnitude per output feature")
    lora.add_argument("--init", choices=("gaussian", "kaiming"), help="A's init (B = 0 either way)")
    lora.add_argument("--quantize", choices=("nf4", "int8"), help="store the frozen base weights "
                      "4-bit NF4 (QLoRA) or int8; LoRA trains on top")
    lora.add_argument("--quantize-embeddings", action="store_true", default=None,
                      help="with --quantize: also quantize the input embeddings and the output head "
                           "(kept 16/32-bit by default, as QLoRA does)")
    tr = p.add_argument_group("training")
    tr.add_argument("--lr", type=float, help="learning rate (default 2e-4)")
    tr.add_argument("--schedule", choices=("cosine", "linear", "constant"))
    tr.add_argument("--warmup-frac", type=float)
    tr.add_argument("--weight-decay", type=float)
    tr.add_argument("--grad-clip", type=float)
    tr.add_argument("--batch-size", type=int, help="examples (or packed rows) per micro-batch")
    tr.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    tr.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs)")
    tr.add_argument("--epochs", type=float, help="passes over the training set (default 1)")
    tr.add_argument("--eval-every", type=int, help="steps between evaluations (default: 5 per run)")
    tr.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0: at the end)")
    tr.add_argument("--keep-checkpoints", type=int)
    tr.add_argument("--precision", choices=("bf16", "fp32"), help="bf16 autocast (default) or fp32")
    tr.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--grad-checkpoint", action=BOOL, help="recompute each transformer block's "
                    "activations in the backward (less memory, about 1/3 more compute)")
    tr.add_argument("--fsdp", action=BOOL, help="shard the model over torchrun processes")
    tr.add_argument("--resume", action="store_true", default=None,
                    help="continue the run in --out from its last checkpoint")
    tr.add_argument("--overwrite", action="store_true", default=None,
                    help="start again in an --out that already holds a run")
    rep = p.add_argument_group("report")
    rep.add_argument("--samples", type=int, help="validation prompts answered before/after (4)")
    rep.add_argument("--sample-tokens", type=int, help="max new tokens per sample answer (64)")
    rep.add_argument("--quick", action=BOOL, help="a small run: 30 steps on 240 examples, short "
                                                  "sequences (a first look in about 2 minutes)")
    rep.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                     help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    flags = {k: v for k, v in vars(args).items() if k not in ("run", "verb", "config") and v is not None}
    cfg = resolve(flags, args.config)
    result = run_finetune(cfg)
    if not result.get("is_main", True):
        return 0
    history = result.get("history") or [{}]
    last = history[-1]
    shown = {k: round(v, 4) for k, v in last.items() if k.startswith("val_")}
    print(f"done: {result['steps']} steps in {result['train_time_s']:.1f}s of training "
          f"({result.get('tokens_per_s', 0):.0f} tokens/s); validation "
          f"{result.get('val_loss_before') or float('nan'):.4f} loss before, now {shown}")
    print(f"adapter: {cfg.out}/adapter   report: {cfg.out}/report.md")
    return 0
