"""The statistics behind every benchmark target: paired ratios, their median and bootstrap interval."""

import math
import random

import pytest

from lorakit.errors import LoraError
from lorakit.train.timing import bootstrap_median_ci, interleave, median, paired_ratio


def test_median_odd_and_even():
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 3, 2]) == 2.5


def test_interval_contains_the_true_median_about_95_percent_of_the_time():
    """Coverage on synthetic data with a known median (lognormal around 0.8: median exactly 0.8)."""
    rng = random.Random(1)
    hits, trials = 0, 200
    for t in range(trials):
        sample = [0.8 * math.exp(rng.gauss(0, 0.1)) for _ in range(25)]
        _, low, high = bootstrap_median_ci(sample, n_boot=400, seed=t)
        hits += low <= 0.8 <= high
    assert 0.85 <= hits / trials <= 0.995


def test_interval_brackets_the_median_and_shrinks_with_more_pairs():
    rng = random.Random(2)
    small = [1 + rng.gauss(0, 0.05) for _ in range(20)]
    large = [1 + rng.gauss(0, 0.05) for _ in range(400)]
    mid, low, high = bootstrap_median_ci(small)
    assert low <= mid <= high
    _, low2, high2 = bootstrap_median_ci(large)
    assert high2 - low2 < 0.6 * (high - low)


def test_constant_ratio_gives_a_point_interval():
    assert bootstrap_median_ci([0.5] * 10) == (0.5, 0.5, 0.5)


def test_verdict_needs_the_whole_interval_on_the_right_side():
    rng = random.Random(3)
    b = [1.0 + rng.gauss(0, 0.01) for _ in range(30)]
    clear = paired_ratio("a", "b", [0.7 * t for t in b], b)      # ratio 0.7 exactly
    assert clear.verdict(0.85) == "met" and clear.verdict(0.6) == "not met"
    noisy_a = [t * (0.85 + rng.gauss(0, 0.1)) for t in b]       # centred on the bound: undecided
    noisy = paired_ratio("a", "b", noisy_a, b)
    assert noisy.low < 0.85 < noisy.high and noisy.verdict(0.85) == "not met"
    assert clear.verdict(0.6, at_least=True) == "met"


def test_interleave_alternates_the_order_and_times_both():
    calls = []
    result = interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                        pairs=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert result.pairs == 4 and result.a == "a" and result.b == "b"


def test_bad_inputs_are_refused():
    with pytest.raises(LoraError, match="at least 2"):
        bootstrap_median_ci([1.0])
    with pytest.raises(LoraError, match="equal length"):
        paired_ratio("a", "b", [1, 2], [1])
    with pytest.raises(LoraError, match="exactly two"):
        interleave({"a": lambda: None}, pairs=3)
