"""The figures and the summary table of ``lorakit analyze`` (tools/analysis.py computes the numbers).

    singular_values.png        sigma_i / sigma_1 of every dW, one line per matrix, grouped by kind
    subspace_similarity.png    phi(A, A_other, i, j) heatmaps (with --other), Figure 3 style
    amplification.png          ||U^T W V||_F in dW's / W's / random directions (with --base), Table 7
"""

from __future__ import annotations

import re
from pathlib import Path

from lorakit.errors import LoraError
from lorakit.plotting import pyplot, save_figure

MAX_HEATMAPS = 4


def summary_table(result: dict) -> str:
    """One row per module kind (query, value...): means over its matrices, for the terminal."""
    lines = [f"{'kind':<12}{'n':>4}{'r':>5}{'num.rank':>10}{'90% rank':>10}{'entropy':>9}"
             f"{'phi(1,1)':>10}{'phi(r,r)':>10}{'||dW||':>9}{'dW dirs':>9}{'W dirs':>9}"
             f"{'random':>9}{'ampl.':>8}{'A learnt':>9}"]
    for kind, row in result["summary"].items():
        cell = lambda key, fmt: format(row[key], fmt) if key in row else "-"       # noqa: E731
        lines.append(f"{kind:<12}{row['count']:>4}{row['r']:>5}{cell('mean_numerical_rank', '.1f'):>10}"
                     f"{cell('mean_energy_90_rank', '.1f'):>10}{cell('mean_entropy_rank', '.2f'):>9}"
                     f"{cell('mean_phi_1_1', '.3f'):>10}{cell('mean_phi_r_r', '.3f'):>10}"
                     f"{cell('mean_dW_norm', '.3f'):>9}{cell('mean_proj_dW_dirs', '.3f'):>9}"
                     f"{cell('mean_proj_W_dirs', '.2f'):>9}{cell('mean_proj_random_dirs', '.3f'):>9}"
                     f"{cell('mean_amplification', '.1f'):>8}"
                     f"{cell('mean_A_learned_directions', '.1f'):>9}")
    return "\n".join(lines) + "\n(means over the matrices of each kind; definitions in analysis.json)"


def plot_spectra(result: dict, path: Path) -> Path:
    plt = pyplot()
    kinds = sorted(result["summary"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for name, entry in result["modules"].items():
            if re.sub(r"\[\d+\]$", "", name).split(".")[-1] != kind:
                continue
            sigma = entry["singular_values"]
            if sigma and sigma[0] > 0:
                ax.semilogy(range(1, len(sigma) + 1), [s / sigma[0] for s in sigma], alpha=0.6)
        ax.set_title(f"{kind}: sigma_i / sigma_1 of dW")
        ax.set_xlabel("i")
    save_figure(fig, path, dpi=110)
    return path


def plot_phi(phi: dict, pattern: str | None, path: Path) -> Path:
    plt = pyplot()
    names = pick_modules(list(phi), pattern)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        grid = phi[name].numpy()
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper",
                          extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
        ax.set_title(name.replace(".attention.self", ""), fontsize=8)
        ax.set_xlabel("j (other adapter)")
        ax.set_ylabel("i (this adapter)")
    fig.colorbar(image, ax=axes[0].tolist(), label="phi(i, j)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def pick_modules(names: list[str], pattern: str | None) -> list[str]:
    """Names matching ``pattern``, or those of the highest block index (the paper shows layer 48)."""
    if pattern:
        picked = [n for n in names if re.search(pattern, n)]
        if not picked:
            raise LoraError(f"--modules {pattern!r} matches none of {names[:6]}...")
        return picked[:MAX_HEATMAPS]
    index = lambda n: max((int(x) for x in re.findall(r"\.(\d+)\.", n)), default=-1)   # noqa: E731
    last = max(index(n) for n in names)
    return [n for n in names if index(n) == last][:MAX_HEATMAPS]


def plot_amplification(result: dict, path: Path) -> Path:
    plt = pyplot()
    names = list(result["modules"])
    rows = [result["modules"][n]["amplification"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names)), 3.6))
    x = range(len(names))
    for key, label in (("proj_dW_dirs", "dW's directions"), ("proj_W_dirs", "W's directions"),
                       ("proj_random_dirs", "random"), ("dW_norm", "||dW||_F")):
        ax.semilogy(x, [r[key] for r in rows], "o-", label=label, markersize=3)
    ax.set_xticks(list(x))
    ax.set_xticklabels([n.split(".")[-1] + re.sub(r"\D*(\d+).*", r"\1", n) for n in names],
                       rotation=90, fontsize=6)
    ax.set_ylabel("||U^T W V||_F")
    ax.set_title("Table 7: W projected on r directions")
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)
    return path
