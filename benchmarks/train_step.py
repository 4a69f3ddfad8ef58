"""One training configuration, timed in this (fresh) process: step time, peak memory, FLOPs.

    python benchmarks/train_step.py CONFIG PRECISION [--steps 5] [--warmup 2] [--device cpu|cuda]

CONFIG: full (every weight trains), frozen (only the head), peft (PEFT LoRA), eager / fused / compiled
(lorakit LoRA: the reference layer, the fused Function, torch.compile of the model), and peft-drop /
fused-drop (LoRA dropout 0.1). PRECISION: fp32, or bf16 (autocast; weights and LoRA factors stay fp32).

A step is forward, cross-entropy, backward, AdamW (lr 1e-4) and zero_grad. FLOPs are counted once per
process with ``torch.utils.flop_counter.FlopCounterMode`` on an untimed forward + backward (matmuls and
attention only; the optimizer and elementwise work add no FLOPs to the count). Memory (``peak_mem_mb``,
``train_mem_mb``): on the CPU the process's peak RSS, and that peak minus the RSS after loading and
setting up the model (what training adds); on CUDA the same two figures from the CUDA allocator
(``torch.cuda.max_memory_allocated``). ``peak_rss_mb`` is the host process's peak RSS either way.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from common import (add_lorakit, add_peft, batch, current_rss_mb, load_model, median, peak_rss_mb,
                    resolve_device, timed)

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
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:i")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"

    from lorakit.layers import use_fused
    model = build(args.config).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    data = batch(device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    fused = use_fused(args.config != "eager")

    def forward_backward(run):
        with amp:
            logits = run(input_ids=data["input_ids"]).logits
        F.cross_entropy(logits.float(), data["labels"]).backward()

    baseline_mb = current_rss_mb()          # model, optimizer object, imports: before any step
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_baseline_mb = torch.cuda.memory_allocated(device) / 2**20
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
    if cuda:
        peak_mem, base_mem = torch.cuda.max_memory_allocated(device) / 2**20, cuda_baseline_mb
    else:
        peak_mem, base_mem = peak, baseline_mb
    return {"config": args.config, "precision": args.precision, "device": str(device),
            "step_s": median(times), "times_s": times, "first_step_s": first, "flops_per_step": flops,
            "peak_rss_mb": peak, "baseline_rss_mb": baseline_mb, "peak_mem_mb": peak_mem,
            "train_mem_mb": peak_mem - base_mem, "trainable_params": sum(p.numel() for p in params)}


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
