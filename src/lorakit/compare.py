"""``lorakit compare``: every method on the same task, data and seed, then one report.

Each method trains in its own process (``python -m lorakit train ...``) so that its peak memory is
its own and a crash in one method loses nothing of the others: finished runs are reused when the
comparison is started again.

With ``sizes`` (``--sizes 2,8,32``) every method that has a size knob (LoRA rank, adapter width, prefix
length) runs once per size, as ``METHOD-rSIZE``; the paper's Figure 2 (validation metric against
trainable parameters, one line per method) is drawn from those runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lorakit.errors import LoraError
from lorakit.methods import UNSIZED
from lorakit.report.markdown import write_report
from lorakit.report.plots import cost_bars, curves_vs_time, metric_vs_params
from lorakit.tasks import get_task


def run_compare(task_name: str, methods: list[str] | None, out: str | Path, quick: bool = False,
                train_args: list[str] | None = None, data_dir: str | None = None,
                fresh: bool = False, sizes: list[int] | None = None) -> dict:
    task = get_task(task_name)
    methods = methods or list(getattr(task, "quick_methods", task.methods) if quick else task.methods)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"task": task_name, "metric": task.metric, "methods": {}}
    runs = planned_runs(methods, sizes)
    for i, (name, method, size) in enumerate(runs, 1):
        run_dir = out / "runs" / name
        done = run_dir / "result.json"
        if done.exists() and not fresh and json.loads(done.read_text()).get("quick") == quick:
            print(f"[{i}/{len(runs)}] {name}: reusing {done}", flush=True)
        else:
            print(f"[{i}/{len(runs)}] {name}", flush=True)
            command = [sys.executable, "-m", "lorakit", "train", "--task", task_name,
                       "--method", method, "--out", str(run_dir)]
            command += (["--quick"] if quick else []) + (["--data-dir", data_dir] if data_dir else [])
            command += (train_args or []) + (["--r", str(size)] if size else [])
            finished = subprocess.run(command)
            if finished.returncode != 0 or not done.exists():
                results["methods"][name] = {"error": f"exit code {finished.returncode}; see above"}
                continue
        results["methods"][name] = {**json.loads(done.read_text()), "size": size}
    if not any("error" not in r for r in results["methods"].values()):
        raise LoraError(f"every method failed for task {task_name!r}; see the output above")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plots = [("validation metric vs training time",
              curves_vs_time(results, task.metric, out / "metric_vs_time.png",
                             f"{task_name}: {task.metric[4:]} vs training time").name),
             ("validation loss vs training time",
              curves_vs_time(results, "val_loss", out / "loss_vs_time.png",
                             f"{task_name}: validation loss vs training time").name),
             ("cost per method", cost_bars(results, out / "cost.png").name),
             ("validation metric vs trainable parameters (the paper's Figure 2)",
              metric_vs_params(results, task.metric, out / "metric_vs_params.png").name)]
    extra = getattr(task, "extra_plots", None)
    if extra:
        plots += [(title, path.name) for title, path in extra(results, out)]
    notes = getattr(task, "report_notes", lambda results: [])(results)
    report = write_report(results, task.metric, plots, out, notes)
    print(f"report: {report}", flush=True)
    return results


def planned_runs(methods: list[str], sizes: list[int] | None) -> list[tuple[str, str, int | None]]:
    """(run name, method, size or None): sized methods once per size, the others once."""
    runs = []
    for method in methods:
        if sizes and method not in UNSIZED:
            runs += [(f"{method}-r{size}", method, size) for size in sizes]
        else:
            runs.append((method, method, None))
    return runs
