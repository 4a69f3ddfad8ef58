"""report.md of the LoraHub suite (experiments/lorahub_suite.py): held-out accuracy per task and
configuration (mean ± std over seeds), the average over tasks, and LoraHub against each baseline
with the spread over seeds (report/stats.py)."""

from __future__ import annotations

from lorakit.report.stats import difference, fmt, summarize


def suite_report(results: dict) -> dict:
    """{"summary": {row: stats of the per-seed task-average}, "comparisons", "markdown"}."""
    tasks = list(results["tasks"])
    seeds = sorted({s for per in results["tasks"].values() for s in per}, key=int)
    rows = list(next(iter(results["tasks"][tasks[0]].values())))
    cfg = results["config"]
    lines = [f"# LoraHub over {len(tasks)} few-shot tasks ({cfg['shots']} shots, {len(seeds)} seeds)", "",
             f"Leave-one-out: each task is the new task once, the other {len(tasks) - 1} adapters its "
             f"library. Search: {cfg['optimizer']}, {cfg['max_evals']} evaluations, L1 {cfg['l1']} "
             f"(the LoraHub paper's). Held-out accuracy on {cfg['val_examples']} examples per task, "
             "mean ± std over seeds (the seed draws the shots and seeds the search).", "",
             "| configuration | " + " | ".join(tasks) + " | average |", "|---|" + "---:|" * (len(tasks) + 1)]
    summary = {}
    for row in rows:
        cells = [fmt(summarize([results["tasks"][t][s][row]["val"] for s in seeds]), 0.0, 3) for t in tasks]
        per_seed = [sum(results["tasks"][t][s][row]["val"] for t in tasks) / len(tasks) for s in seeds]
        summary[row] = summarize(per_seed)
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {fmt(summary[row], summary[row]['mean'], 3)} |")
    comparisons = {}
    lines += ["", "LoraHub (linear, the paper's combination) against each configuration, task-average "
              "accuracy, Welch 95% interval over seeds:", ""]
    for row in rows:
        if row == "LoraHub (linear)":
            continue
        d = difference(summary["LoraHub (linear)"], summary[row])
        comparisons[row] = d
        verdict = ("beyond the spread" if d["beyond_spread"] else
                   "within the spread" if d["beyond_spread"] is not None else "one seed: no spread")
        interval = f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d["ci95"] else ""
        lines.append(f"- vs {row}: {d['diff']:+.3f}{interval}, {verdict}")
    lines += ["", "Own-task validation accuracy of each library adapter: " + ", ".join(
        f"{t} {info['own_val_accuracy']:.3f}" for t, info in results["library"].items()),
        f"", f"Wall time {results['wall_time_s']:.0f} s."]
    return {"summary": summary, "comparisons": comparisons, "markdown": "\n".join(lines) + "\n"}
