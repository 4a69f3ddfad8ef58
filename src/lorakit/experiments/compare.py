"""``lorakit compare``: every method on the same task, data and seed, then one report.

Each method trains in its own process (``python -m lorakit train ...``) so that its peak memory is
its own and a crash in one method loses nothing of the others: finished runs are reused when the
comparison is started again.

With ``sizes`` (``--sizes 2,8,32``) every method that has a size knob (LoRA rank, adapter width, prefix
length) runs once per size, as ``METHOD-rSIZE``; the paper's Figure 2 (validation metric against
trainable parameters, one line per method) is drawn from those runs.

With ``seeds`` (``--seeds 3``) every run repeats at seeds 0..N-1 (``runs/NAME-seedS``); results.json
keeps each run under the method's "runs" and the mean, std and 95% t-interval of every best metric
under "stats" (report/stats.py); tables show mean ± std and curves the mean with a shaded band.
A task's deterministic methods (``task.deterministic_methods``, e.g. gw's matched filter, which trains
nothing) run once whatever the seeds.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from lorakit.errors import LoraError
from lorakit.experiments.paired import paired_step_cost
from lorakit.experiments.sensitivity import add_sensitivity
from lorakit.methods import UNSIZED
from lorakit.report.cost import cost_section
from lorakit.report.markdown import write_report
from lorakit.report.plots import cost_bars, curves_vs_time, metric_vs_params
from lorakit.report.stats import aggregate
from lorakit.tasks import get_task
from lorakit.train.timing import load_average


def run_compare(task_name: str, methods: list[str] | None, out: str | Path, quick: bool = False,
                train_args: list[str] | None = None, data_dir: str | None = None,
                fresh: bool = False, sizes: list[int] | None = None, seeds: int | None = None,
                time_pairs: int = 0, report_only: bool = False) -> dict:
    """``time_pairs``: when > 1 and both lora and full trained, time that many interleaved pairs of
    their optimizer steps in this process at the end (experiments/paired.py; the report's cost section)."""
    task = get_task(task_name)
    methods = methods or list(getattr(task, "quick_methods", task.methods) if quick else task.methods)
    if seeds is not None and (seeds < 1 or "--seed" in (train_args or [])):
        raise LoraError(f"seeds={seeds!r}: give a positive count, and not together with --seed "
                        f"(--seeds N runs seeds 0..N-1)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"task": task_name, "metric": task.metric, "methods": {},
               **({"seeds": list(range(seeds))} if seeds else {})}
    runs = planned_runs(methods, sizes)
    fixed = set(getattr(task, "deterministic_methods", ()))
    # seed-major: every method at seed 0 first, so a comparison stopped early has whole seeds
    jobs = sorted([(name, method, size, seed) for name, method, size in runs
                   for seed in ([None] if not seeds or method in fixed else range(seeds))],
                  key=lambda job: job[3] or 0)
    records: dict[str, list[tuple[int, dict]]] = {}
    machine: dict[str, dict] = {}           # load seen by each run started here (report/cost.py)
    failed: dict[str, list[str]] = {}
    for i, (name, method, size, seed) in enumerate(jobs, 1):
        label = name if seed is None else f"{name}-seed{seed}"
        run_dir = out / "runs" / label
        done = run_dir / "result.json"
        if report_only and not (done.exists() and json.loads(done.read_text()).get("quick") == quick):
            continue                     # --report-only: what finished, nothing trained
        if done.exists() and not fresh and json.loads(done.read_text()).get("quick") == quick:
            print(f"[{i}/{len(jobs)}] {label}: reusing {done}", flush=True)
        else:
            print(f"[{i}/{len(jobs)}] {label}", flush=True)
            command = [sys.executable, "-m", "lorakit", "train", "--task", task_name,
                       "--method", method, "--out", str(run_dir)]
            command += (["--quick"] if quick else []) + (["--data-dir", data_dir] if data_dir else [])
            command += (train_args or []) + (["--r", str(size)] if size else [])
            command += ["--seed", str(seed)] if seed is not None else []
            load, cpu, wall = load_average(), _children_cpu_s(), time.perf_counter()
            finished = subprocess.run(command)
            machine[label] = {"load": [load, load_average()],
                              "cpu_share": (_children_cpu_s() - cpu) / (time.perf_counter() - wall)}
            if finished.returncode != 0 or not done.exists():
                failed.setdefault(name, []).append(f"{label}: exit code {finished.returncode}")
                continue
        record = {**json.loads(done.read_text()), "size": size, "run_dir": str(run_dir.relative_to(out))}
        if label in machine:
            record["machine"] = machine[label]
        records.setdefault(name, []).append((seed or 0, record))
    for name, _, _ in runs:
        if name in records and (seeds and len(records[name]) > 1):
            results["methods"][name] = aggregate([r for _, r in records[name]],
                                                 [s for s, _ in records[name]])
        elif name in records:
            results["methods"][name] = records[name][0][1]
        elif not report_only:
            results["methods"][name] = {"error": "; ".join(failed.get(name, [])) + "; see above"}
        if name in records and name in failed:          # the mean is over the seeds that finished
            results["methods"][name]["failed_runs"] = failed[name]
    if not any("error" not in r for r in results["methods"].values()):
        raise LoraError(f"every method failed for task {task_name!r}; see the output above")
    sensitivity_plots, sections = add_sensitivity(task, results, out, quick, data_dir)
    trained = [m for m in ("lora", "full") if "error" not in results["methods"].get(m, {"error": 1})]
    if time_pairs > 1 and len(trained) == 2:
        print(f"timing {time_pairs} interleaved pairs of lora and full steps in one process", flush=True)
        device = (train_args or [])[(train_args or []).index("--device") + 1] \
            if "--device" in (train_args or []) else "auto"
        paired, threads = paired_step_cost(task_name, "lora", "full", pairs=time_pairs, quick=quick,
                                           data_dir=data_dir, device=device)
        results["paired_timing"] = {**paired.to_dict(), "threads": threads}
    sections = (sections or []) + cost_section(results)
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
    plots += sensitivity_plots
    extra = getattr(task, "extra_plots", None)
    if extra:
        plots += [(title, path.name) for title, path in extra(results, out)]
    notes = getattr(task, "report_notes", lambda results: [])(results)
    report = write_report(results, task.metric, plots, out, notes, sections)
    print(f"report: {report}", flush=True)
    return results


def _children_cpu_s() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def planned_runs(methods: list[str], sizes: list[int] | None) -> list[tuple[str, str, int | None]]:
    """(run name, method, size or None): sized methods once per size, the others once."""
    runs = []
    for method in methods:
        if sizes and method not in UNSIZED:
            runs += [(f"{method}-r{size}", method, size) for size in sizes]
        else:
            runs.append((method, method, None))
    return runs
