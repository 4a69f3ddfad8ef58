"""report.md: the table, the plots, and what the numbers say, in plain words computed from them."""

from __future__ import annotations

from pathlib import Path

from lorakit.plan import format_bytes
from lorakit.report.stats import difference, fmt


def results_table(results: dict, metric: str) -> str:
    rows = ["| method | trainable params | % of total | total params | peak memory (MB) | "
            f"of it, training (MB) | train time (s) | best {metric[4:]} | best val loss | on disk |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, run in results["methods"].items():
        if "error" in run:
            rows.append(f"| {method} | failed: {run['error'][:80]} | | | | | | | | |")
            continue
        best, stats = run["best"], run.get("stats", {})
        if run.get("reference"):            # trains nothing (gw's matched filter): its cost is compute
            rows.append(f"| {method} | 0 ({run['reference']}) | | | {run['peak_memory_mb']:.0f} | | "
                        f"{run['train_time_s']:.1f} (scoring) | {best.get(metric, float('nan')):.4f} | | |")
            continue
        losses = [h["val_loss"] for h in run["history"]]
        loss = stats.get("min_val_loss")
        rows.append(
            f"| {method} | {run['trainable_params']:,} | "
            f"{100 * run['trainable_params'] / run['total_params']:.3g}% | {run['total_params']:,} | "
            f"{run['peak_memory_mb']:.0f} | {training_memory_mb(run):.0f} | "
            f"{fmt(stats.get('train_time_s'), run['train_time_s'], 1)} | "
            f"{fmt(stats.get(metric), best.get(metric, float('nan')))} | "
            f"{fmt(loss, min(losses) if losses else float('nan'))} | "
            f"{format_bytes(run['size_on_disk_bytes'])} |")
    return "\n".join(rows)


def training_memory_mb(run: dict) -> float:
    """Peak memory above what the process held when training started (model + data loaded): the
    activations, gradients and optimizer state that differ between methods. CUDA peaks start at 0."""
    return run["peak_memory_mb"] - run.get("baseline_memory_mb", 0.0)


def findings(results: dict, metric: str) -> list[str]:
    """Sentences comparing each method with full fine-tuning, from the measured numbers only."""
    runs = {m: r for m, r in results["methods"].items() if "error" not in r}
    if not runs:
        return ["Every method failed; see the errors in the table."]
    ranked = sorted(runs, key=lambda m: runs[m]["best"].get(metric, float("-inf")), reverse=True)
    name = metric[4:]
    lines = ["Ranking by best " + name + ": " + ", ".join(
        f"{m} ({runs[m]['best'].get(metric, float('nan')):.4f})" for m in ranked) + "."]
    lines += spread_findings(runs, metric)
    full = runs.get("full")
    for method, run in runs.items():
        if full is None or method == "full" or run.get("reference"):
            continue
        gap = run["best"].get(metric, float("nan")) - full["best"].get(metric, float("nan"))
        share = 100 * run["trainable_params"] / full["trainable_params"]
        memory = training_memory_mb(run) / max(training_memory_mb(full), 1e-9)
        speed = run["train_time_s"] / max(full["train_time_s"], 1e-9)
        lines.append(f"{method}: best {name} {gap:+.4f} vs full fine-tuning, training {share:.3g}% of "
                     f"its parameters, with {memory:.2f}x its training memory and {speed:.2f}x its "
                     f"training time.")
    return lines


def spread_findings(runs: dict, metric: str) -> list[str]:
    """With several seeds: which gaps exceed the spread (Welch 95% interval of the difference excludes
    0) and which do not, for each method against the best-ranked and against full fine-tuning."""
    seeded = {m: r["stats"][metric] for m, r in runs.items() if r.get("stats", {}).get(metric, {}).get("n", 1) > 1}
    if len(seeded) < 2:
        return []
    name, n = metric[4:], max(s["n"] for s in seeded.values())
    ranked = sorted(seeded, key=lambda m: seeded[m]["mean"], reverse=True)
    lines = [f"Spread over {n} seeds (mean ± std of best {name}; 95% t-interval in results.json): " + ", ".join(
        f"{m} {fmt(seeded[m], seeded[m]['mean'])}" for m in ranked) + "."]
    pairs = [(ranked[0], m) for m in ranked[1:]]
    if "full" in seeded and ranked[0] != "full":
        pairs += [(m, "full") for m in ranked if m not in ("full", ranked[0])]
    beyond, within = [], []
    for a, b in pairs:
        d = difference(seeded[a], seeded[b])
        text = f"{a} - {b} = {d['diff']:+.4f} (95% interval [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}])"
        (beyond if d["beyond_spread"] else within).append(text)
    if beyond:
        lines.append("Differences beyond the spread over seeds: " + "; ".join(beyond) + ".")
    if within:
        lines.append("Differences within the spread (not distinguishable with these seeds): "
                     + "; ".join(within) + ".")
    return lines


def write_report(results: dict, metric: str, plots: list[tuple[str, str]], out: Path,
                 notes: list[str] | None = None, sections: list[str] | None = None) -> Path:
    """``sections``: markdown lines a task adds after the findings (gw: sensitivity by SNR)."""
    quick = any(r.get("quick") for r in results["methods"].values())
    lines = [f"# lorakit compare: {results['task']}" + (" (--quick)" if quick else ""), ""]
    lines += notes or []
    lines += ["", "## Results", "", results_table(results, metric), "", "## What the numbers show", ""]
    lines += [f"- {line}" for line in findings(results, metric)]
    lines += [""] + (sections or [])
    lines += ["", "Peak memory is the process's peak RSS on CPU (it includes Python, torch, the model "
              "and the data; each method ran in its own process) or max allocated on CUDA; 'of it, "
              "training' is the part above what the process held when training began: activations, "
              "gradients and optimizer state. Times exclude evaluation.", "", "## Plots", ""]
    lines += [f"![{title}]({file})" for title, file in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
