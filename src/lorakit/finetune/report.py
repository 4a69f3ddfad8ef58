"""DIR/report.md for a finetune run: what was trained on what, the loss curve (PNG), where the time
went, and for SFT the answers to validation prompts before and after training."""

from __future__ import annotations

from pathlib import Path

from lorakit.plotting import pyplot, save_figure


def loss_plot(history: list[dict], before: float | None, path: Path, train_losses: list[float],
              accum: int = 1) -> Path | None:
    """Training loss of every step (mean of its micro-batches) and validation loss, against step."""
    if not history:
        return None
    plt = pyplot()
    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    per_step = [sum(train_losses[i:i + accum]) / accum for i in range(0, len(train_losses) - accum + 1,
                                                                       accum)]
    first = steps[-1] - len(per_step) + 1           # after --resume only the new steps are known
    ax.plot(range(first, first + len(per_step)), per_step, "-", alpha=0.7, label="training batch")
    if "val_loss" in history[0]:
        ax.plot(([0] if before is not None else []) + steps,
                ([before] if before is not None else []) + [r["val_loss"] for r in history],
                "s-", label="validation")
    if "val_accuracy" in history[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [r["val_accuracy"] for r in history], "^-", color="tab:green",
                 label="validation accuracy")
        ax2.set_ylabel("accuracy")
        ax2.legend(loc="upper right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (cross-entropy)")
    ax.legend(loc="upper center")
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=110)
    return path


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.replace("|", "\\|") or "(empty)"


def _prompt_cell(prompt) -> str:
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return _cell(users[-1] if users else prompt[-1]["content"], 100)
    return _cell(prompt, 100)


def write_report(out: Path, cfg: dict, result: dict) -> Path:
    stats, timing = result["data"], result["timing_s"]
    lines = [f"# lorakit finetune: {Path(cfg['data']).name} on {cfg['model']}", "",
             f"Task **{result['task']}** ({result['format']} records"
             + (", chat template" if result.get("chat") else "") + f"), LoRA r={cfg['r']}, "
             f"alpha={cfg['alpha']:g}, targets {cfg['targets']}"
             + (", DoRA" if cfg["dora"] else "") + (", rsLoRA" if cfg["rslora"] else "")
             + f"; {result['trainable_params']:,} trainable of {result['total_params']:,} parameters.",
             "", "| | |", "|---|---|",
             f"| examples (train / validation) | {stats['train_examples']} / {stats['val_examples']} "
             f"({stats['validation']}) |",
             f"| truncated at --max-seq-len {cfg['max_seq_len']} | {stats['truncated']} "
             f"(dropped, nothing left to learn: {stats['dropped']}) |",
             f"| rows | {stats['train_rows']} ({'packed' if stats['packed'] else 'length-grouped'}), "
             f"padding {100 * stats['padding_fraction']:.1f}% of token slots |",
             f"| steps x batch | {result['steps']} x {cfg['batch_size']}"
             + (f" x {cfg['grad_accum']} accumulated" if cfg["grad_accum"] > 1 else "") + " |",
             f"| training tokens/s | {result['tokens_per_s']:.0f} ({result['tokens_trained']:,} real "
             "tokens) |", f"| peak memory | {result['peak_memory_mb']:.0f} MB |"]
    if result.get("val_loss_before") is not None:
        after = result["history"][-1] if result["history"] else {}
        metric = "val_accuracy" if "val_accuracy" in after else "val_loss"
        lines.append(f"| validation loss before -> after | {result['val_loss_before']:.4f} -> "
                     f"{after.get('val_loss', float('nan')):.4f} |")
        if metric == "val_accuracy":
            lines.append(f"| validation accuracy before -> after | {result['val_accuracy_before']:.4f}"
                         f" -> {after['val_accuracy']:.4f} |")
    lines += ["", "Where the time went (seconds): " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items()),
              ""]
    if result.get("plot"):
        lines += [f"![loss]({result['plot']})", ""]
    if result.get("samples"):
        lines += ["## Answers to validation prompts, before and after training", "",
                  "| prompt | reference | before | after |", "|---|---|---|---|"]
        for s in result["samples"]:
            lines.append(f"| {_prompt_cell(s['prompt'])} | {_cell(s['reference'])} | "
                         f"{_cell(s['before'])} | {_cell(s['after'])} |")
        lines.append("")
    lines += [f"Adapter (PEFT format, tokenizer{', label map' if result['task'] == 'classify' else ''})"
              f": `{out / 'adapter'}`. Re-run: `lorakit finetune --config {out / 'config.json'}`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
