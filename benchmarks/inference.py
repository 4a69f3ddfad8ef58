"""Inference latency (eval, no_grad, batch 16 x 128) and mixed-adapter throughput, in one process.

Latency, against the bare base model (the same pretrained MiniLM without any adapter):
    base            the bare model
    lorakit-merged  lorakit, adapter merged into the weights
    lorakit         lorakit, unmerged (fused path: base GEMM + low-rank addmm into its output)
    peft-merged     PEFT after merge_adapter()
    peft            PEFT, unmerged
Mixed adapters: 8 lorakit adapters on one model;
    single          every row through the same adapter (the plain one-adapter path)
    mixed8          row i through adapter i mod 8 (layers/mixed.py: gathered bmm, no loop)
Every variant is timed in each round, rounds interleave the variants, and the median is reported.
``--device cuda`` builds every model on the CPU and moves it to the GPU. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

from common import BATCH, add_lorakit, add_peft, batch, load_model, median, resolve_device, timed


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:i")
    args = parser.parse_args()
    device = resolve_device(args.device)
    import lorakit

    base = load_model().eval()
    lk = add_lorakit(copy.deepcopy(base)).eval()
    lk_merged = lorakit.merge_lora(add_lorakit(copy.deepcopy(base)).eval())
    pf = add_peft(copy.deepcopy(base)).eval()
    pf_merged = add_peft(copy.deepcopy(base)).eval()
    pf_merged.merge_adapter()
    many = copy.deepcopy(base)
    names = [f"task{i}" for i in range(8)]
    for i, name in enumerate(names):
        add_lorakit(many, name, seed=i, head=False)   # one shared head
    many.eval()
    lorakit.set_adapter(many, names[0])
    for model in (base, lk, lk_merged, pf, pf_merged, many):
        model.to(device)
    rows = [names[i % len(names)] for i in range(BATCH)]
    ids = batch(device=device)["input_ids"]

    def single():
        return many(input_ids=ids)

    def mixed():
        with lorakit.mixed_adapters(many, rows):
            return many(input_ids=ids)

    variants = {"base": lambda: base(input_ids=ids), "lorakit-merged": lambda: lk_merged(input_ids=ids),
                "lorakit": lambda: lk(input_ids=ids), "peft-merged": lambda: pf_merged(input_ids=ids),
                "peft": lambda: pf(input_ids=ids), "single": single, "mixed8": mixed}
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    times = {k: [] for k in variants}
    with torch.no_grad(), amp:
        for fn in variants.values():          # warm-up
            fn()
        for r in range(args.rounds):
            order = list(variants.items())
            order = order[r % len(order):] + order[:r % len(order)]      # rotate: no fixed neighbour
            for name, fn in order:
                times[name].append(timed(fn))
    med = {k: median(v) for k, v in times.items()}
    return {"precision": args.precision, "device": str(device), "rounds": args.rounds, "latency_s": med,
            "tokens": ids.numel(), "times_s": times}


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
