"""Timing two training configurations so that their ratio can decide a target on a shared machine.

Runs of A and B at different times see different machine load; runs interleaved step by step see the
same load within each pair. So the configurations alternate in one process (A B, B A, A B, ... - the
order flips each pair so neither always runs second), each with its own model and optimizer, after
warm-up steps, and every pair i gives one ratio

    r_i = t_A,i / t_B,i          i = 1..n

The estimate is the median of the r_i; its 95% interval is the percentile bootstrap: resample the n
pairs with replacement ``n_boot`` times, take each resample's median, and keep the 2.5% and 97.5%
quantiles of those medians. A bound counts as met only when the whole interval is on its side:
"A <= c x B" is met when the upper end is <= c; "A >= c x B" when the lower end is >= c.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from lorakit.errors import LoraError


def median(values) -> float:
    v = sorted(float(x) for x in values)
    if not v:
        raise LoraError("median of no values; time at least one step")
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def bootstrap_median_ci(values, level: float = 0.95, n_boot: int = 2000,
                        seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high): the sample median and its percentile-bootstrap interval at ``level``."""
    x = torch.as_tensor([float(v) for v in values], dtype=torch.float64)
    if x.numel() < 2:
        raise LoraError(f"a bootstrap interval needs at least 2 values, got {x.numel()}")
    if not 0 < level < 1:
        raise LoraError(f"level={level!r} must be between 0 and 1, e.g. 0.95")
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, x.numel(), (n_boot, x.numel()), generator=g)
    medians = x[index].quantile(0.5, dim=1)     # the mean of the two middle values for even n
    tail = (1 - level) / 2
    low, high = torch.quantile(medians, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return median(x.tolist()), float(low), float(high)


@dataclass
class PairedRatio:
    """The ratio t_A / t_B of two interleaved configurations: median, 95% interval, raw times."""
    a: str
    b: str
    ratio: float
    low: float
    high: float
    times_a: list
    times_b: list
    load_before: float = float("nan")       # 1-minute load average before and after the pairs
    load_after: float = float("nan")

    @property
    def pairs(self) -> int:
        return len(self.times_a)

    def verdict(self, bound: float, at_least: bool = False) -> str:
        """'met' when the whole interval is on the right side of ``bound``, else 'not met'."""
        ok = self.low >= bound if at_least else self.high <= bound
        return "met" if ok else "not met"

    def describe(self) -> str:
        return f"{self.ratio:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def to_dict(self) -> dict:
        return {**asdict(self), "pairs": self.pairs}


def paired_ratio(a: str, b: str, times_a, times_b, n_boot: int = 2000, seed: int = 0,
                 **extra) -> PairedRatio:
    if len(times_a) != len(times_b):
        raise LoraError(f"paired times must have equal length, got {len(times_a)} and {len(times_b)}")
    ratios = [ta / tb for ta, tb in zip(times_a, times_b)]
    mid, low, high = bootstrap_median_ci(ratios, n_boot=n_boot, seed=seed)
    return PairedRatio(a, b, mid, low, high, list(times_a), list(times_b), **extra)


def load_average() -> float:
    """The machine's 1-minute load average (nan where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def _timed(step: Callable[[], None], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def interleave_many(steps: dict[str, Callable[[], None]], rounds: int = 20, warmup: int = 2,
                    sync: Callable[[], None] | None = None,
                    progress: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Time ``rounds`` rounds of every configuration ({name: step function}): ``warmup`` untimed steps
    of each, then each round runs every step once, the order rotated by one each round (A B C, B C A,
    C A B, ...; for two configurations A B, B A, A B, ...). Returns {name: [seconds per round]}; any
    two lists are paired round by round (``paired_ratio``). ``sync`` waits for the device
    (``torch.cuda.synchronize`` on CUDA) around each timed step."""
    if len(steps) < 2:
        raise LoraError(f"interleaving needs at least two configurations, got {sorted(steps)}")
    if rounds < 2:
        raise LoraError(f"rounds={rounds!r}: at least 2 rounds are needed for an interval (20 or more "
                        "for a decision)")
    sync = sync or (lambda: None)
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_timed(steps[name], sync))
        if progress:
            progress(i)
    return times


def interleave(steps: dict[str, Callable[[], None]], pairs: int = 20, warmup: int = 2,
               sync: Callable[[], None] | None = None, progress: Callable[[int], None] | None = None,
               ) -> PairedRatio:
    """t_A / t_B of two configurations ({name: step function}, A first) over ``pairs`` interleaved
    pairs (``interleave_many``), with the machine's load average before and after."""
    if len(steps) != 2:
        raise LoraError(f"interleave compares exactly two configurations, got {sorted(steps)}")
    load_before = load_average()
    times = interleave_many(steps, pairs, warmup, sync, progress)
    (name_a, times_a), (name_b, times_b) = times.items()
    return paired_ratio(name_a, name_b, times_a, times_b, load_before=load_before,
                        load_after=load_average())
