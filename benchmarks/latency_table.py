"""The LoRA paper's Table 1 on MiniLM: inference latency of adapter layers vs LoRA vs the base model.

Model: pretrained all-MiniLM-L6-v2 encoder (BERT, 6 layers, d = 384, 22.7M params), loaded offline by
``lorakit.models.load("minilm")``; one forward pass of random token ids (no padding), eval mode,
``torch.inference_mode``. Shapes as in the paper: batch 1 x 128 tokens, 16 x 256, 32 x 512.

    base              the pretrained model
    lora-merged       LoRA r=8 (alpha 16) on query, value, merged (lorakit.merge_and_unload)
    lora-unmerged     the same adapter kept apart: W0 x + s B A x in every adapted layer
    adapter-H r=8/64  Houlsby: a bottleneck adapter after the attention output and after the FFN
    adapter-L r=8/64  Lin: one bottleneck adapter (with its LayerNorm) after the FFN

Bottleneck sizes: the paper's Table 1 uses |Theta| = 0.5M and 11M on GPT-2 medium (0.14% and 3.1% of
354M); on MiniLM r = 8 gives Houlsby 0.08M (0.35%), r = 64 gives 0.60M (2.6%), the same two regimes.
Every variant is timed once per round, the order rotating across rounds (interleaved, so drift and
other load hit all variants alike); the median over rounds is reported with the change vs base.
Writes benchmarks/results/latency_table.json and prints a markdown table.

    flock /tmp/lorakit-cpu.lock .venv/bin/python benchmarks/latency_table.py [--dtypes fp32,bf16]
    (fp32 alone: about 3.5 min on 2 cores; with bf16: about 6 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import lorakit
from lorakit.methods import AdaptSpec, apply_method

SHAPES = [(1, 128), (16, 256), (32, 512)]               # (batch, sequence length), as in the paper
ROUNDS = {(1, 128): 40, (16, 256): 9, (32, 512): 5}
# The paper's Table 1 (GPT-2 medium, ms per forward pass, mean of 100 trials, NVIDIA Quadro RTX8000)
PAPER = {"shapes": ["32x512", "16x256", "1x128"], "params": ["0.5M", "11M", "11M"],
         "Fine-Tune/LoRA": [1449.4, 338.0, 19.8], "Adapter^L": [1482.0, 354.8, 23.9],
         "Adapter^H": [1492.2, 366.3, 25.8]}


def variants(base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    out = {"base": base}
    torch.manual_seed(0)
    cfg = lorakit.LoraConfig(r=8, alpha=16, target_modules=["query", "value"])
    lora = lorakit.apply_lora(copy.deepcopy(base), cfg)
    with torch.no_grad():                      # B = 0 at init; give the adapter real values
        for name, p in lora.named_parameters():
            if ".lora." in name:
                p.normal_(0, 0.02)
    out["lora-unmerged"] = lora
    out["lora-merged"] = lorakit.merge_and_unload(copy.deepcopy(lora))
    for method, label in (("adapter-houlsby", "adapter-H"), ("adapter-lin", "adapter-L")):
        for r in (8, 64):
            model = apply_method(copy.deepcopy(base), method, AdaptSpec(head=[], r=r))
            with torch.no_grad():              # up = 0 at init; non-zero so nothing is trivially skipped
                for name, p in model.named_parameters():
                    if ".adapter.up." in name:
                        p.normal_(0, 0.02)
            out[f"{label} r={r}"] = model
    return {k: v.eval() for k, v in out.items()}


def added_params(model: torch.nn.Module, base: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in base.parameters())


def time_shape(models: dict, batch: int, seq: int, rounds: int) -> dict[str, list[float]]:
    ids = torch.randint(1000, 30000, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    names = list(models)
    times = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:                                   # warm-up (allocator, kernels)
            models[name](input_ids=ids, attention_mask=mask)
        for i in range(rounds):
            for name in names[i % len(names):] + names[:i % len(names)]:
                start = time.perf_counter()
                models[name](input_ids=ids, attention_mask=mask)
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def check_equivalence(models: dict) -> float:
    """lora-merged must compute what lora-unmerged computes (else the comparison is meaningless)."""
    ids = torch.randint(1000, 30000, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a = models["lora-merged"](input_ids=ids).last_hidden_state.float()
        b = models["lora-unmerged"](input_ids=ids).last_hidden_state.float()
    return (a - b).abs().max().item()


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="fp32",
                        help="fp32 and/or bf16 (weights cast to bf16), e.g. fp32,bf16")
    parser.add_argument("--rounds-scale", type=float, default=1.0, help="multiply the rounds per shape")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "latency_table.json"))
    args = parser.parse_args()

    from lorakit.models import load
    base = load("minilm").model
    fp32 = variants(base)
    result = {"model": "all-MiniLM-L6-v2 (BERT, 6 layers, d=384)", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "added_params": {k: added_params(m, base) for k, m in fp32.items()},
              "lora_merged_vs_unmerged_max_abs_diff": check_equivalence(fp32),
              "paper_table1": PAPER, "results": {}}
    for dtype_name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        models = fp32 if dtype is torch.float32 else {k: copy.deepcopy(m).to(dtype) for k, m in fp32.items()}
        for batch, seq in SHAPES:
            rounds = max(3, round(ROUNDS[(batch, seq)] * args.rounds_scale))
            times = time_shape(models, batch, seq, rounds)
            base_ms = statistics.median(times["base"])
            result["results"][f"{dtype_name} {batch}x{seq}"] = {
                name: {"median_ms": round(statistics.median(t), 2), "min_ms": round(min(t), 2),
                       "max_ms": round(max(t), 2), "rounds": len(t),
                       "vs_base_pct": round(100 * (statistics.median(t) / base_ms - 1), 1)}
                for name, t in times.items()}
            print(f"done {dtype_name} {batch}x{seq} ({rounds} rounds)", flush=True)
        if models is not fp32:
            del models
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"wrote {out}")
    return result


def markdown(result: dict) -> str:
    cols = list(result["results"])
    names = list(next(iter(result["results"].values())))
    lines = ["| variant | added params | " + " | ".join(f"{c} (ms, vs base)" for c in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for name in names:
        cells = []
        for c in cols:
            r = result["results"][c][name]
            cells.append(f"{r['median_ms']:.1f}" + ("" if name == "base" else f" ({r['vs_base_pct']:+.1f}%)"))
        lines.append(f"| {name} | {result['added_params'][name]:,} | " + " | ".join(cells) + " |")
    paper = result["paper_table1"]
    lines += ["", "Paper, Table 1 (GPT-2 medium, ms):", "| variant | " + " | ".join(
        f"{s} ({p})" for s, p in zip(paper["shapes"], paper["params"])) + " |", "|---|" + "---:|" * 3]
    ref = paper["Fine-Tune/LoRA"]
    for name in ("Fine-Tune/LoRA", "Adapter^L", "Adapter^H"):
        lines.append(f"| {name} | " + " | ".join(
            f"{v:.1f}" + ("" if name == "Fine-Tune/LoRA" else f" ({100 * (v / b - 1):+.1f}%)")
            for v, b in zip(paper[name], ref)) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
