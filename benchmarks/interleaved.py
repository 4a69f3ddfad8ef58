"""Configurations of one model timed step by step in ONE process, so their ratios can decide targets.

    python benchmarks/interleaved.py MODEL PRECISION CONFIG CONFIG [...] [--rounds 20] [--warmup 2]
        [--ratio A/B ...] [--flops CONFIG] [--profile] [--small]

Each configuration (benchmarks/models.py) gets its own model and optimizer; after ``--warmup`` untimed
steps of each, every round runs one step of each, the order rotated each round (A B C, B C A, ...), so
slow and fast phases of a shared machine fall on all of them alike. Each requested ratio A/B is the
median over rounds of t_A / t_B with a percentile-bootstrap 95% interval (``lorakit.train.timing``).
Peak memory needs a process per configuration (benchmarks/train_step.py); this script reports time.
``--profile`` prints torch.profiler's top operators of one step of each configuration.
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch

from lorakit.train.timing import interleave_many, load_average, median, paired_ratio
from gemm_peak import gemm_gflops
from models import CONFIGS, MODELS, build, flops_per_step


def profile(step, label: str, rows: int = 18) -> str:
    from torch.profiler import ProfilerActivity, profile as run_profile
    with run_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"--- {label}\n{table}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("precision", choices=("fp32", "bf16"))
    parser.add_argument("configs", nargs="+", choices=CONFIGS)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ratio", action="append", default=[],
                        help="A/B ratios to report (default: every pair, in the order given)")
    parser.add_argument("--flops", action="append", default=[], choices=CONFIGS,
                        help="count the matmul FLOPs of this configuration's step (repeatable)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--small", action="store_true", help="2-row batches: try configurations out")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads (default: torch's). On a machine shared with other jobs, 1 "
                             "avoids stalls where every parallel op waits for a descheduled thread")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps, info = {}, {}
    for config in args.configs:
        start = time.perf_counter()
        steps[config], info[config] = build(args.model, config, args.precision, args.small)
        info[config]["build_s"] = time.perf_counter() - start
    for config in args.flops:
        info[config]["flops_per_step"] = flops_per_step(steps[config])
    load_before = load_average()
    times = interleave_many(steps, rounds=args.rounds, warmup=args.warmup,
                            progress=lambda i: print(f"round {i + 1}/{args.rounds}", file=sys.stderr,
                                                     flush=True) if (i + 1) % 5 == 0 else None)
    load_after = load_average()
    pairs = [r.split("/") for r in args.ratio] or list(itertools.combinations(args.configs, 2))
    ratios = {f"{a}/{b}": paired_ratio(a, b, times[a], times[b], load_before=load_before,
                                       load_after=load_after).to_dict() for a, b in pairs}
    for key, r in ratios.items():
        print(f"{args.model}/{args.precision} {key}: {r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}]",
              file=sys.stderr, flush=True)
    # the GEMM peak in this process, at this thread count, right after the steps: MFU's denominator
    peak = gemm_gflops(torch.bfloat16 if args.precision == "bf16" else torch.float32) if args.flops else None
    if args.profile:
        for config, step in steps.items():
            print(profile(step, f"{args.model}/{args.precision}/{config}"), file=sys.stderr, flush=True)
    return {"model": args.model, "precision": args.precision, "rounds": args.rounds,
            "threads": torch.get_num_threads(), "load": [load_before, load_after], "gemm_peak_gflops": peak,
            "step_s": {c: median(t) for c, t in times.items()}, "times_s": times, "info": info,
            "ratios": ratios}


if __name__ == "__main__":
    print(json.dumps(main()))
