#!/usr/bin/env bash
# `make gpu-check`: on one CUDA GPU, the tests marked `cuda` (tests/test_cuda.py: the LoRA invariants in
# fp32 and bf16 autocast, fused vs eager, save on CUDA / load on CPU, mixed-adapter batches, a short
# `lorakit train --device cuda`) and a short benchmark (benchmarks/run.py --device cuda, one fresh process
# per config, torch.compile left out for time), then a compact summary. Budget: under 8 minutes (tests
# 3 min at most, benchmark 4.5 min at most; each step is killed at its limit and reported as failed).
# Stops at once, saying why, where torch sees no CUDA device. Writes runs/gpu-check/ (tests.log,
# bench.log, bench/bench.{json,md}).
set -u
PY=${1:-.venv/bin/python}
OUT=${GPU_CHECK_OUT:-runs/gpu-check}
START=$(date +%s)

"$PY" - <<'EOF' || exit 1
import sys

import torch

if not torch.cuda.is_available():
    if torch.version.cuda is None:
        why = "this torch build has no CUDA support (install a CUDA build of torch)"
    else:
        why = f"built for CUDA {torch.version.cuda} but sees no device (driver? CUDA_VISIBLE_DEVICES?)"
    sys.exit(f"gpu-check needs a CUDA GPU: torch {torch.__version__}: {why}")
print(f"gpu-check on {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible), "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
EOF
mkdir -p "$OUT"
failed=()

echo "[1/2] pytest -m cuda (limit 180 s) ..."
LORAKIT_NO_SKIPS=1 timeout 180 "$PY" -m pytest tests -m cuda -p no:cacheprovider -q -rfEs \
    >"$OUT/tests.log" 2>&1
status=$?
tail -n 15 "$OUT/tests.log" | grep -E "passed|failed|error|FAILED|ERROR|SKIPPED" || tail -n 5 "$OUT/tests.log"
if [ "$status" -eq 124 ]; then echo "tests: killed at the 180 s limit"; fi
[ "$status" -eq 0 ] || failed+=("tests (exit $status, see $OUT/tests.log)")

echo "[2/2] benchmark on CUDA (limit 270 s) ..."
timeout 270 "$PY" benchmarks/run.py --device cuda --rounds 1 --steps 10 --inference-rounds 10 \
    --configs full,frozen,peft,eager,fused,peft-drop,fused-drop --out "$OUT/bench" >"$OUT/bench.log" 2>&1
status=$?
if [ "$status" -eq 0 ]; then
    "$PY" - "$OUT/bench/bench.json" <<'EOF' || failed+=("benchmark summary")
import json
import sys

rec = json.load(open(sys.argv[1]))
peak = rec["peak_used"]
print(f"GEMM peak {peak['fp32'] / 1e3:.1f} TFLOP/s fp32, {peak['bf16'] / 1e3:.1f} TFLOP/s bf16; "
      f"MiniLM-L6, batch {rec['batch'][0]} x {rec['batch'][1]}, memory = {rec['memory']}")
print(f"{'train config':>18} {'ms/step':>8} {'tokens/s':>9} {'peak MB':>8} {'+train MB':>9} {'MFU':>6}")
for key, row in rec["train"].items():
    print(f"{key:>18} {row['step_s'] * 1e3:8.1f} {row['tokens_per_s']:9.0f} {row['peak_mem_mb']:8.0f} "
          f"{row['train_mem_mb']:9.0f} {row['mfu']:6.1%}")
for precision, res in rec["inference"].items():
    lat = res["latency_s"]
    print(f"inference {precision} ms: " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in lat.items()))
EOF
else
    tail -n 20 "$OUT/bench.log"
    if [ "$status" -eq 124 ]; then echo "benchmark: killed at the 270 s limit"; fi
    failed+=("benchmark (exit $status, see $OUT/bench.log)")
fi

elapsed=$(( $(date +%s) - START ))
if [ "${#failed[@]}" -eq 0 ]; then
    echo "gpu-check passed in ${elapsed} s ($OUT/)"
    exit 0
fi
echo "gpu-check FAILED in ${elapsed} s: ${failed[*]}" >&2
exit 1
