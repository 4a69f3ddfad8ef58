"""Spread over seeds: mean, sample standard deviation and a 95% t-interval per metric, one record per
method from its per-seed runs, and whether two methods differ by more than their spread.

For n runs with values x_i: mean m, s = std with ddof=1, and the 95% interval
m +- t_{0.975, n-1} s / sqrt(n) (Student's t: with 3 seeds t = 4.30, so the interval is 2.5 s wide on
each side). Two methods a, b differ beyond their spread when the 95% interval of m_a - m_b, by Welch's
t with the Welch-Satterthwaite degrees of freedom, excludes 0.
"""

from __future__ import annotations

import math

COST_KEYS = ("train_time_s", "peak_memory_mb", "baseline_memory_mb", "wall_time_s")


def t_quantile(df: float, q: float = 0.975) -> float:
    from scipy.stats import t          # deferred: heavy optional dependency
    return float(t.ppf(q, df))


def summarize(values: list[float]) -> dict:
    """{"mean", "std", "ci95": [lo, hi], "n", "values"}; std and the interval are 0 / None for one run."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = t_quantile(n - 1) * std / math.sqrt(n) if n > 1 else None
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half] if half is not None else None,
            "n": n, "values": list(values)}


def difference(a: dict, b: dict) -> dict:
    """Welch's 95% interval of mean(a) - mean(b) from two summaries; "beyond_spread" when it excludes 0.
    With a single run on either side there is no spread to judge by: beyond_spread is None."""
    diff = a["mean"] - b["mean"]
    if a["n"] < 2 or b["n"] < 2:
        return {"diff": diff, "ci95": None, "beyond_spread": None}
    va, vb = a["std"] ** 2 / a["n"], b["std"] ** 2 / b["n"]
    if va + vb == 0:
        return {"diff": diff, "ci95": [diff, diff], "beyond_spread": diff != 0}
    df = (va + vb) ** 2 / ((va ** 2 / (a["n"] - 1) if va else 0) + (vb ** 2 / (b["n"] - 1) if vb else 0))
    half = t_quantile(df) * math.sqrt(va + vb)
    return {"diff": diff, "ci95": [diff - half, diff + half], "beyond_spread": abs(diff) > half}


def aggregate(records: list[dict], seeds: list[int]) -> dict:
    """One method's record from its runs at ``seeds``: the first run's fields (method, params...), costs
    and best metrics replaced by their means, "stats" with the summary of every best metric and cost,
    "runs" keeping each run, and "history" the mean curve (evaluations at steps every run reached) with
    a ``<key>_std`` beside each metric for the shaded band."""
    first = records[0]
    best_keys = [k for k in first.get("best", {}) if k.startswith("val_")
                 and all(k in r.get("best", {}) for r in records)]
    stats = {k: summarize([r["best"][k] for r in records]) for k in best_keys}
    stats.update({k: summarize([r[k] for r in records]) for k in COST_KEYS
                  if all(k in r for r in records)})
    losses = [[h["val_loss"] for h in r.get("history") or [] if "val_loss" in h] for r in records]
    if all(losses):
        stats["min_val_loss"] = summarize([min(x) for x in losses])
    out = {**first, "seeds": list(seeds), "runs": records, "stats": stats,
           "best": {k: stats[k]["mean"] for k in best_keys}}
    out.update({k: stats[k]["mean"] for k in COST_KEYS if k in stats})
    out["history"] = mean_history([r.get("history") or [] for r in records])
    return out


def mean_history(histories: list[list[dict]]) -> list[dict]:
    """Per evaluation step present in every history: mean of each numeric field, and <field>_std."""
    if not histories or not all(histories):
        return []
    by_step = [{h["step"]: h for h in history} for history in histories]
    steps = sorted(set.intersection(*(set(b) for b in by_step)))
    out = []
    for step in steps:
        rows = [b[step] for b in by_step]
        record = {"step": step}
        for key, value in rows[0].items():
            if key == "step" or not isinstance(value, (int, float)) or not all(key in r for r in rows):
                continue
            s = summarize([float(r[key]) for r in rows])
            record[key], record[f"{key}_std"] = s["mean"], s["std"]
        out.append(record)
    return out


def fmt(stats: dict | None, value: float, digits: int = 4) -> str:
    """'0.8940 ± 0.0050' with a spread, plain '0.8940' for one run."""
    if stats and stats.get("n", 1) > 1:
        return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
    return f"{value:.{digits}f}"
