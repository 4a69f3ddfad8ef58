"""The outputs of ``lorakit lorahub`` (experiments/lorahub.py): report.md and lorahub.png."""

from __future__ import annotations

from pathlib import Path

from lorakit.plotting import pyplot, save_figure


def report_md(results: dict) -> str:
    """The comparison as a markdown table, one row per configuration."""
    cfg = results["config"]
    lines = [f"# LoraHub on {cfg['new_task']} ({cfg['shots']} shots, {cfg['val_examples']} held-out)",
             "", f"upstream adapters: {', '.join(cfg['upstream'])}; optimizer: {cfg['optimizer']}, "
             f"{cfg['max_evals']} evaluations, L1 {cfg['l1']}", "",
             "| configuration | few-shot loss | few-shot acc | held-out acc | weights |",
             "|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        weights = ", ".join(f"{k} {v:+.2f}" for k, v in row.get("weights", {}).items())
        lines.append(f"| {name} | {row['fewshot']['loss']:.3f} | {row['fewshot']['accuracy']:.3f} | "
                     f"{row['val']['accuracy']:.3f} | {weights} |")
    lines += ["", "own-task validation accuracy of each upstream adapter: " + ", ".join(
        f"{t} {info['own_val_accuracy']:.3f}" for t, info in results["library"].items())]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Held-out accuracy per configuration (left) and LoraHub's weights per mode (right)."""
    plt = pyplot()
    rows = results["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    names = list(rows)
    left.barh(names, [rows[n]["val"]["accuracy"] for n in names], color="tab:blue")
    left.invert_yaxis()
    left.set_xlabel(f"held-out accuracy on {results['config']['new_task']}")
    left.set_xlim(0.3, 1.0)
    upstream = results["config"]["upstream"]
    width = 0.38
    for k, mode in enumerate(("cat", "linear")):
        weights = rows[f"LoraHub ({mode})"]["weights"]
        right.bar([i + (k - 0.5) * width for i in range(len(upstream))],
                  [weights[t] for t in upstream], width, label=mode)
    right.set_xticks(range(len(upstream)))
    right.set_xticklabels(upstream, rotation=30, fontsize=7)
    right.axhline(0, color="black", linewidth=0.5)
    right.set_ylabel("LoraHub weight")
    right.legend(fontsize=7)
    save_figure(fig, path, dpi=110)
