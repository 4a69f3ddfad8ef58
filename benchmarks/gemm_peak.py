"""The matrix-product peak as this run sees it: n^3 GEMM, fp32 and bf16, median GFLOP/s. n = 2048 on
the CPU; 8192 on CUDA, where a 2048^3 product takes microseconds and the launch would dominate.

    FLOPs of one (n x n) @ (n x n) product = 2 n^3
"""

from __future__ import annotations

import json
import sys

import torch

from common import median, timed


def gemm_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 15, device: str = "cpu") -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    return 2 * n**3 / median([timed(lambda: a @ b) for _ in range(repeats)]) / 1e9


def main(device: str = "cpu") -> dict:
    n = 8192 if torch.device(device).type == "cuda" else 2048
    return {"fp32": gemm_gflops(torch.float32, n, device=device),
            "bf16": gemm_gflops(torch.bfloat16, n, device=device), "threads": torch.get_num_threads(),
            "n": n}


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
