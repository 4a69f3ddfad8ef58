"""report.md: the table, the plots, and what the numbers say, in plain words computed from them."""

from __future__ import annotations

from pathlib import Path

from lorakit.plan import format_bytes


def results_table(results: dict, metric: str) -> str:
    rows = ["| method | trainable params | % of total | total params | peak memory (MB) | "
            f"of it, training (MB) | train time (s) | best {metric[4:]} | best val loss | on disk |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, run in results["methods"].items():
        if "error" in run:
            rows.append(f"| {method} | failed: {run['error'][:80]} | | | | | | | | |")
            continue
        best = run["best"]
        losses = [h["val_loss"] for h in run["history"]]
        rows.append(
            f"| {method} | {run['trainable_params']:,} | "
            f"{100 * run['trainable_params'] / run['total_params']:.3g}% | {run['total_params']:,} | "
            f"{run['peak_memory_mb']:.0f} | {training_memory_mb(run):.0f} | {run['train_time_s']:.1f} | "
            f"{best.get(metric, float('nan')):.4f} | {min(losses) if losses else float('nan'):.4f} | "
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
    full = runs.get("full")
    for method, run in runs.items():
        if full is None or method == "full":
            continue
        gap = run["best"].get(metric, float("nan")) - full["best"].get(metric, float("nan"))
        share = 100 * run["trainable_params"] / full["trainable_params"]
        memory = training_memory_mb(run) / max(training_memory_mb(full), 1e-9)
        speed = run["train_time_s"] / max(full["train_time_s"], 1e-9)
        lines.append(f"{method}: best {name} {gap:+.4f} vs full fine-tuning, training {share:.3g}% of "
                     f"its parameters, with {memory:.2f}x its training memory and {speed:.2f}x its "
                     f"training time.")
    return lines


def write_report(results: dict, metric: str, plots: list[tuple[str, str]], out: Path,
                 notes: list[str] | None = None) -> Path:
    quick = any(r.get("quick") for r in results["methods"].values())
    lines = [f"# lorakit compare: {results['task']}" + (" (--quick)" if quick else ""), ""]
    lines += notes or []
    lines += ["", "## Results", "", results_table(results, metric), "", "## What the numbers show", ""]
    lines += [f"- {line}" for line in findings(results, metric)]
    lines += ["", "Peak memory is the process's peak RSS on CPU (it includes Python, torch, the model "
              "and the data; each method ran in its own process) or max allocated on CUDA; 'of it, "
              "training' is the part above what the process held when training began: activations, "
              "gradients and optimizer state. Times exclude evaluation.", "", "## Plots", ""]
    lines += [f"![{title}]({file})" for title, file in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
