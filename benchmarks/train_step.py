"""One training configuration, timed in this (fresh) process: step time, peak memory, FLOPs.

    python benchmarks/train_step.py CONFIG PRECISION [--steps 5] [--warmup 2]

CONFIG: full (every weight trains), frozen (only the head), peft (PEFT LoRA), eager / fused / compiled
(lorakit LoRA: the reference layer, the fused Function, torch.compile of the model), and peft-drop /
fused-drop (LoRA dropout 0.1). PRECISION: fp32, or bf16 (autocast; weights and LoRA factors stay fp32).

A step is forward, cross-entropy, backward, AdamW (lr 1e-4) and zero_grad. FLOPs are counted once per
process with ``torch.utils.flop_counter.FlopCounterMode`` on an untimed forward + backward (matmuls and
attention only; the optimizer and elementwise work add no FLOPs to the count). Memory: the process's
peak RSS, and that peak minus the RSS after loading and setting up the model (what training adds).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from common import add_lorakit, add_peft, batch, current_rss_mb, load_model, median, peak_rss_mb, timed

CONFIGS = ("full", "frozen", "peft", "eager", "fused", "compiled", "peft-drop", "fused-drop")


def build(config: str):
    model = load_model()
    if config == "full":
        return model
    if config == "frozen":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier."))
        return model
    dropout = 0.1 if config.endswith("-drop") else 0.0
    return add_peft(model, dropout) if config.startswith("peft") else add_lorakit(model, dropout=dropout)


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", choices=CONFIGS)
    parser.add_argument("precision", choices=("fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    from lorakit.layers import use_fused
    model = build(args.config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    data = batch()
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    fused = use_fused(args.config != "eager")

    def forward_backward(run):
        with amp:
            logits = run(input_ids=data["input_ids"]).logits
        F.cross_entropy(logits.float(), data["labels"]).backward()

    baseline_mb = current_rss_mb()          # model, optimizer object, imports: before any step
    with fused:
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            forward_backward(model)
        flops = counter.get_total_flops()
        optimizer.zero_grad(set_to_none=True)
        run = model
        if args.config == "compiled":
            run = torch.compile(model)

        def step():
            forward_backward(run)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        first = timed(step)                   # includes compilation for "compiled"
        for _ in range(args.warmup - 1):
            step()
        times = [timed(step) for _ in range(args.steps)]
    peak = peak_rss_mb()
    return {"config": args.config, "precision": args.precision, "step_s": median(times),
            "times_s": times, "first_step_s": first, "flops_per_step": flops,
            "peak_rss_mb": peak, "baseline_rss_mb": baseline_mb, "train_mem_mb": peak - baseline_mb,
            "trainable_params": sum(p.numel() for p in params)}


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
