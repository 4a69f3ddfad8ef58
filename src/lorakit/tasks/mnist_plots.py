"""The LoRALinear MNIST notebook's three figures (accuracy per epoch: AE vs baseline, LoRA-init vs
baseline, all together) and one more: final accuracy against rank for both inits, with the full-rank
line."""

from __future__ import annotations

from pathlib import Path

from lorakit.plotting import pyplot, save_figure


def _epochs(run: dict) -> tuple[list[int], list[float]]:
    per_epoch = run["settings"]["eval_every"]
    history = run["history"]
    return [h["step"] // per_epoch for h in history], [h["val_accuracy"] for h in history]


def _rank(method: str) -> int:
    return int(method.split("-r")[1])


def accuracy_per_epoch(results: dict, kinds: tuple[str, ...], path: Path, title: str) -> Path:
    plt = pyplot()
    runs = {m: r for m, r in results["methods"].items() if "error" not in r}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"lora": "-", "ae": "--"}
    cmap = plt.get_cmap("viridis")
    ranks = sorted({_rank(m) for m in runs if m != "full"}) or [1]
    for method, run in sorted(runs.items(), key=lambda kv: (kv[0] != "full", kv[0].split("-")[0],
                                                           _rank(kv[0]) if kv[0] != "full" else 0)):
        kind = method.split("-r")[0]
        if method == "full":
            ax.plot(*_epochs(run), color="black", linewidth=2.5, label="full rank (baseline)")
        elif kind in kinds:
            shade = cmap(ranks.index(_rank(method)) / max(len(ranks) - 1, 1))
            ax.plot(*_epochs(run), styles[kind], color=shade, label=method)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)
    return path


def accuracy_vs_rank(results: dict, path: Path) -> Path:
    plt = pyplot()
    runs = {m: r for m, r in results["methods"].items() if "error" not in r}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("lora", "o"), ("ae", "s")):
        points = sorted((_rank(m), r["history"][-1]["val_accuracy"]) for m, r in runs.items()
                        if m.startswith(kind + "-r"))
        if points:
            ax.plot(*zip(*points), marker=marker, label=f"{kind} init")
    if "full" in runs:
        ax.axhline(runs["full"]["history"][-1]["val_accuracy"], color="black", label="full rank")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r of each hidden layer")
    ax.set_ylabel("final validation accuracy")
    ax.set_title("mnist-lowrank: accuracy after training vs rank")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    return path


def mnist_plots(results: dict, out: Path) -> list[tuple[str, Path]]:
    return [
        ("AE vs baseline", accuracy_per_epoch(results, ("ae",), out / "accuracy_ae.png",
                                              "default-initialised low-rank (AE) vs full rank")),
        ("LoRA init vs baseline", accuracy_per_epoch(results, ("lora",), out / "accuracy_lora.png",
                                                     "rank-dependent (LoRA) init vs full rank")),
        ("all together", accuracy_per_epoch(results, ("lora", "ae"), out / "accuracy_all.png",
                                            "AE vs LoRA init vs full rank")),
        ("accuracy vs rank", accuracy_vs_rank(results, out / "accuracy_vs_rank.png")),
    ]
