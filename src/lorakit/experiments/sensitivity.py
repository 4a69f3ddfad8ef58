"""The sensitivity section of a ``compare`` report, for tasks that know each validation example's
signal strength (``task.validation_snr(quick, data_dir) -> (snr, labels)``; gw: the injected network
SNR kept in the data cache). Each run's best-evaluation scores are read back from its
val_logits.safetensors (train/loop.py); seeds are combined per method (report/sensitivity.py)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from lorakit.report import sensitivity
from lorakit.train.loop import VAL_LOGITS


def add_sensitivity(task, results: dict, out: Path, quick: bool, data_dir: str | None):
    """(plots [(title, file)], report lines); stores results["sensitivity"]. Nothing for other tasks."""
    hook = getattr(task, "validation_snr", None)
    found = hook(quick, data_dir) if hook else None
    if found is None:
        return [], []
    snr, labels = found
    summary = {}
    for name, run in results["methods"].items():
        if "error" in run:
            continue
        per_seed = []
        for record in run.get("runs") or [run]:
            path = out / record.get("run_dir", "") / VAL_LOGITS
            if record.get("run_dir") and path.exists():
                scores = load_file(str(path))["logits"].float().reshape(-1).numpy()
                if len(scores) == len(labels):
                    per_seed.append(sensitivity.efficiency(scores, labels, snr))
        if per_seed:
            summary[name] = sensitivity.combine(per_seed) if len(per_seed) > 1 else {**per_seed[0], "seeds": 1}
    if not summary:
        return [], []
    results["sensitivity"] = summary
    path = sensitivity.plot(summary, out / "efficiency_vs_snr.png")
    return ([("detection efficiency at 1% false-alarm probability by injected SNR", path.name)],
            sensitivity.section(summary))
