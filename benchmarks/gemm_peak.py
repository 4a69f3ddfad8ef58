"""The CPU's matrix-product peak as this run sees it: 2048^3 GEMM, fp32 and bf16, median GFLOP/s.

    FLOPs of one (n x n) @ (n x n) product = 2 n^3
"""

from __future__ import annotations

import json
import sys

import torch

from common import median, timed


def gemm_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 15) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * n**3 / median([timed(lambda: a @ b) for _ in range(repeats)]) / 1e9


def main() -> dict:
    return {"fp32": gemm_gflops(torch.float32), "bf16": gemm_gflops(torch.bfloat16),
            "threads": torch.get_num_threads()}


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
