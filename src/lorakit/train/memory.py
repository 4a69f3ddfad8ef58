"""Peak memory of the training process: CUDA max allocated, or the process's peak RSS on CPU.

Peak RSS (``ru_maxrss``) covers the whole process lifetime, so ``compare`` runs each method in its own
process to get a per-method figure; the baseline before training is reported beside it.
"""

from __future__ import annotations

import resource
import sys

import torch

from lorakit.errors import LoraError


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def peak_rss_mb() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (2**20 if sys.platform == "darwin" else 2**10)


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return peak_rss_mb()


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else as torch names it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoraError("--device cuda was asked for but no CUDA device is available; use --device auto")
    return device
