"""The figures of the Whisper gravitational-wave LoRA study: validation metric and loss against
training time, one line per method, the cost of each method (trainable parameters, peak memory,
training time) as bars, and the LoRA paper's Figure 2: validation metric against the number of
trainable parameters."""

from __future__ import annotations

from pathlib import Path

from lorakit.plotting import pyplot, save_figure


LABELS = {"val_auc": "validation AUC", "val_accuracy": "validation accuracy",
          "val_loss": "validation loss"}


def curves_vs_time(results: dict, key: str, path: Path, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, run in results["methods"].items():
        history = run.get("history") or []
        if history and key in history[0]:
            x, y = [h["time_s"] for h in history], [h[key] for h in history]
            n = len(run.get("seeds", [])) if f"{key}_std" in history[0] else 0
            line, = ax.plot(x, y, marker="o", markersize=3,
                            label=f"{method} (mean of {n} seeds)" if n > 1 else method)
            if n > 1:                   # mean +- one std over seeds
                std = [h[f"{key}_std"] for h in history]
                ax.fill_between(x, [a - b for a, b in zip(y, std)], [a + b for a, b in zip(y, std)],
                                color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel(LABELS.get(key, key))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(results["methods"]) > 6 else 1)
    save_figure(fig, path)
    return path


def cost_bars(results: dict, path: Path) -> Path:
    """Trainable parameters (log scale), peak memory split into before-training and training, time."""
    plt = pyplot()
    runs = {m: r for m, r in results["methods"].items() if "trainable_params" in r and not r.get("reference")}
    names = list(runs)
    before = [runs[m].get("baseline_memory_mb", 0.0) for m in names]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    axes[0].bar(names, [runs[m]["trainable_params"] for m in names], color="tab:blue")
    axes[0].set_yscale("log")
    axes[0].set_title("trainable parameters")
    axes[1].bar(names, before, color="tab:gray", label="model + data, before training")
    axes[1].bar(names, [runs[m]["peak_memory_mb"] - b for m, b in zip(names, before)], bottom=before,
                color="tab:orange", label="added by training")
    axes[1].set_title("peak memory (MB)")
    axes[1].legend(fontsize=7, loc="lower right")
    axes[2].bar(names, [runs[m]["train_time_s"] for m in names], color="tab:blue")
    axes[2].set_title("training time (s)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    save_figure(fig, path)
    return path


def metric_vs_params(results: dict, metric: str, path: Path) -> Path:
    """One line per method through its runs (sizes), x = trainable parameters (log), y = best metric."""
    plt = pyplot()
    lines: dict[str, list[tuple[int, float]]] = {}
    for run in results["methods"].values():
        if "trainable_params" in run and metric in run["best"] and not run.get("reference"):
            lines.setdefault(run.get("method", "?"), []).append(
                (run["trainable_params"], run["best"][metric]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_title(f"{results['task']}: {LABELS.get(metric, metric)} vs trainable parameters")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2 if len(lines) > 6 else 1)
    save_figure(fig, path)
    return path
