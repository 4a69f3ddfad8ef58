"""The benchmark suite, one command: ``make bench`` (or ``python benchmarks/run.py``).

    1. GEMM peak (gemm_peak.py), fp32 and bf16, at the start and at the end of the run
    1b. the step-time targets (targets.py): MiniLM-L6, Whisper tiny.en encoder, SmolLM2-135M, fp32
       and bf16, configurations interleaved step by step in one process per group
       (interleaved.py), median ratios with bootstrap 95% intervals (CPU; ``--interleaved-rounds``)
    2. training step (train_step.py): every config x precision in its own fresh process (its own
       peak RSS), configs interleaved in rotated order within each round, median over rounds
    3. inference latency and mixed-adapter throughput (inference.py), fp32 and bf16
Writes benchmarks/results/bench.json and bench.md (the tables and every target with its ratio).

MFU = FLOPs per step (FlopCounterMode) / median step time / GEMM peak of the same precision, with the
higher of the two peak measurements (the conservative choice).
Run it alone: ``flock /tmp/lorakit-cpu.lock make bench`` on a shared machine.

On a GPU: ``python benchmarks/run.py --device cuda`` (every process, the GEMM peak and the memory
figures on that device; ``scripts/gpu_check.sh`` runs a short version). ``--configs`` picks a subset of
the training configs; the targets that need a missing config are left out of bench.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import gemm_peak
import targets
from common import BATCH, SEQ, median, resolve_device
from report import write_markdown

HERE = Path(__file__).resolve().parent
TRAIN = ["full", "frozen", "peft", "eager", "fused", "compiled"]
DROPOUT = ["peft-drop", "fused-drop"]


def subprocess_json(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per training config (their peak memory; the step-time "
                             "targets come from the interleaved groups)")
    parser.add_argument("--interleaved-rounds", type=int, default=20,
                        help="rounds of the interleaved groups (0 skips them)")
    parser.add_argument("--models", default="minilm,whisper,smollm2",
                        help="models of the interleaved groups")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads of the interleaved groups (default: torch's; 1 on a busy "
                             "machine)")
    parser.add_argument("--small", action="store_true",
                        help="2-row batches in the interleaved groups: a smoke test, figures meaningless")
    parser.add_argument("--compiled", action="store_true",
                        help="also time regional torch.compile against PEFT (MiniLM bf16; compile time "
                             "reported)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--inference-rounds", type=int, default=10)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:i")
    parser.add_argument("--configs", default="full,peft,fused,peft-drop,fused-drop",
                        help=f"comma-separated training configs (default all: {','.join(TRAIN + DROPOUT)})")
    args = parser.parse_args()
    device = resolve_device(args.device)
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(TRAIN + DROPOUT))
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; pick from {TRAIN + DROPOUT}")
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    peaks = [gemm_peak.main(str(device))]
    print(f"GEMM peak: fp32 {peaks[0]['fp32']:.0f}, bf16 {peaks[0]['bf16']:.0f} GFLOP/s", flush=True)
    interleaved = []
    if args.interleaved_rounds and device.type == "cpu":
        interleaved = targets.run_groups(args.interleaved_rounds, args.models.split(","), args.compiled,
                                         args.threads, out, args.small)
    jobs = [(c, p) for p in ("fp32", "bf16") for c in TRAIN if c in configs] + \
           [(c, "bf16") for c in DROPOUT if c in configs]
    runs: dict[str, list[dict]] = {f"{c}/{p}": [] for c, p in jobs}
    for r in range(args.rounds):
        shift = (r * 5) % len(jobs)
        for config, precision in jobs[shift:] + jobs[:shift]:
            result = subprocess_json(["train_step.py", config, precision, "--steps", str(args.steps),
                                      "--device", str(device)])
            runs[f"{config}/{precision}"].append(result)
            print(f"round {r + 1}: {config:>10}/{precision}  {result['step_s']:.3f} s/step  "
                  f"peak {result['peak_mem_mb']:.0f} MB  (+{result['train_mem_mb']:.0f})", flush=True)
    inference = {p: subprocess_json(["inference.py", "--rounds", str(args.inference_rounds),
                                     "--precision", p, "--device", str(device)]) for p in ("fp32", "bf16")}
    print("inference:", {p: {k: round(v * 1e3, 1) for k, v in res["latency_s"].items()}
                         for p, res in inference.items()}, flush=True)
    peaks.append(gemm_peak.main(str(device)))
    peak = {p: max(x[p] for x in peaks) for p in ("fp32", "bf16")}

    train = {}
    for key, results in runs.items():
        step = median([x["step_s"] for x in results])
        flops = results[0]["flops_per_step"]
        train[key] = {
            "step_s": step, "tokens_per_s": BATCH * SEQ / step,
            "peak_rss_mb": median([x["peak_rss_mb"] for x in results]),
            "peak_mem_mb": median([x["peak_mem_mb"] for x in results]),
            "train_mem_mb": median([x["train_mem_mb"] for x in results]),
            "flops_per_step": flops, "gflops_per_s": flops / step / 1e9,
            "mfu": flops / step / 1e9 / peak[key.split("/")[1]],
            "first_step_s": [x["first_step_s"] for x in results],
            "trainable_params": results[0]["trainable_params"], "runs": results}
    cuda = device.type == "cuda"
    record = {"machine": {"cpu": platform.processor() or platform.machine(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "device": torch.cuda.get_device_name(device) if cuda else "cpu"},
              "memory": "CUDA allocator" if cuda else "RSS",
              "model": "all-MiniLM-L6-v2 + 2-class head", "batch": [BATCH, SEQ],
              "lora": "r=8, alpha=16, query+value, classifier trained",
              "settings": vars(args), "gemm_peak_gflops": peaks, "peak_used": peak,
              "train": train, "inference": inference,
              **({"interleaved": interleaved} if interleaved else {}),
              "wall_s": time.time() - started}
    (out / "bench.json").write_text(json.dumps(record, indent=1))
    (out / "bench.md").write_text(write_markdown(record) + (
        "\n" + targets.markdown(interleaved, peak) if interleaved else ""))
    print((out / "bench.md").read_text())
    print(f"wrote {out}/bench.json and bench.md in {record['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
