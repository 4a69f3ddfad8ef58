"""Detection efficiency by signal strength, the way gravitational-wave searches are compared.

For each method's validation scores (larger = more signal-like): the threshold that a fraction ``fap``
(1%) of the noise-only samples exceed, then, in each bin of injected network SNR (4-6, 6-8, ..., 14-16),
the fraction of signals above it (efficiency; binomial standard error sqrt(p (1 - p) / n)), and the
ROC AUC of that bin's signals against all noise samples. Summaries per method:

    rho50      SNR at 50% efficiency (linear interpolation between bin centres), the usual
               "sensitive SNR"; its difference to the matched filter's says how far below the
               optimal detector a method sits
    auc99_from the lowest bin from which every bin's AUC is >= 0.99 (the Whisper gravitational-wave
               study's regime: 0.996 AUC on G2Net)
"""

from __future__ import annotations

import numpy as np

from lorakit.plotting import pyplot, save_figure

BINS = tuple(range(4, 17, 2))           # edges 4, 6, ..., 16 (the simulation draws SNR U(4, 16))
FAP = 0.01


def efficiency(scores, labels, snr, bins=BINS, fap: float = FAP) -> dict:
    """{"threshold", "fap" (realised), "bins": [{"lo", "hi", "n", "efficiency", "stderr", "auc"}]}."""
    from sklearn.metrics import roc_auc_score      # deferred: heavy optional dependency
    scores, labels, snr = (np.asarray(a, dtype=np.float64) for a in (scores, labels, snr))
    noise = scores[labels == 0]
    if len(noise) == 0 or not (labels == 1).any():
        raise ValueError("efficiency needs both noise-only and signal samples")
    threshold = float(np.quantile(noise, 1 - fap, method="lower"))     # 5 of 500 noise samples above
    rows = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        inside = (labels == 1) & (snr >= lo) & (snr < hi if hi != bins[-1] else snr <= hi)
        n = int(inside.sum())
        p = float((scores[inside] > threshold).mean()) if n else float("nan")
        auc = float(roc_auc_score(np.r_[np.zeros(len(noise)), np.ones(n)],
                                  np.r_[noise, scores[inside]])) if n else float("nan")
        rows.append({"lo": lo, "hi": hi, "n": n, "efficiency": p,
                     "stderr": float(np.sqrt(p * (1 - p) / n)) if n else float("nan"), "auc": auc})
    return {"threshold": threshold, "fap": float((noise > threshold).mean()), "bins": rows}


def rho50(result: dict) -> float:
    """SNR where efficiency crosses 0.5, interpolated between bin centres (nan if it never does;
    the lowest centre if it starts above)."""
    centres = [(b["lo"] + b["hi"]) / 2 for b in result["bins"]]
    eff = [b["efficiency"] for b in result["bins"]]
    if eff[0] >= 0.5:
        return centres[0]
    for (x0, y0), (x1, y1) in zip(zip(centres, eff), zip(centres[1:], eff[1:])):
        if y0 < 0.5 <= y1:
            return x0 + (0.5 - y0) * (x1 - x0) / (y1 - y0)
    return float("nan")


def auc99_from(result: dict, level: float = 0.99) -> float | None:
    """Lower edge of the first bin from which every bin's AUC reaches ``level``; None if none does."""
    rows = result["bins"]
    for i, row in enumerate(rows):
        if all(r["auc"] >= level for r in rows[i:]):
            return row["lo"]
    return None


def combine(per_seed: list[dict]) -> dict:
    """Several seeds' efficiency results -> mean per bin, with the std over seeds ("spread")."""
    first = per_seed[0]
    bins = []
    for i, row in enumerate(first["bins"]):
        eff = np.array([r["bins"][i]["efficiency"] for r in per_seed])
        auc = np.array([r["bins"][i]["auc"] for r in per_seed])
        bins.append({**row, "efficiency": float(eff.mean()), "auc": float(auc.mean()),
                     "spread": float(eff.std(ddof=1)) if len(eff) > 1 else 0.0,
                     "per_seed": eff.tolist()})
    return {"threshold": [r["threshold"] for r in per_seed], "fap": float(np.mean([r["fap"] for r in per_seed])),
            "bins": bins, "seeds": len(per_seed)}


def section(summary: dict, reference: str | None = "matched-filter") -> list[str]:
    """Markdown: the efficiency table (methods x SNR bins), AUC by bin, and findings in words."""
    methods = list(summary)
    if not methods:
        return []
    first = summary[methods[0]]
    heads = [f"{b['lo']}-{b['hi']}" for b in first["bins"]]
    seeds = max(s.get("seeds", 1) for s in summary.values())
    lines = ["## Sensitivity by injected SNR", "",
             f"Detection efficiency at {100 * FAP:g}% false-alarm probability (threshold: the top "
             f"{100 * FAP:g}% of noise-only validation samples of each run), by injected network SNR; "
             + (f"mean ± std over {seeds} seeds (± binomial standard error for a method run once)"
                if seeds > 1 else "± binomial standard error")
             + ". n = signals per bin: " + ", ".join(f"{h}: {b['n']}" for h, b in zip(heads, first["bins"]))
             + ".", "", "| method | " + " | ".join(f"SNR {h}" for h in heads) + " | rho50 |",
             "|---|" + "---:|" * (len(heads) + 1)]
    for m in methods:
        cells = [f"{b['efficiency']:.2f} ± {b.get('spread', b['stderr']):.2f}" for b in summary[m]["bins"]]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {rho50(summary[m]):.1f} |")
    lines += ["", "ROC AUC of each bin's signals against all noise samples:", "",
              "| method | " + " | ".join(f"SNR {h}" for h in heads) + " |", "|---|" + "---:|" * len(heads)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{b['auc']:.3f}" for b in summary[m]["bins"]) + " |")
    lines += [""] + [f"- {line}" for line in findings(summary, reference)] + [""]
    return lines


def findings(summary: dict, reference: str | None) -> list[str]:
    out = []
    ref = summary.get(reference) if reference else None
    for m, s in summary.items():
        start = auc99_from(s)
        text = (f"{m}: AUC >= 0.99 from SNR {start:g} up" if start is not None
                else f"{m}: no SNR bin reaches AUC 0.99 (best {max(b['auc'] for b in s['bins']):.3f})")
        r50, top = rho50(s), s["bins"][-1]["hi"]
        text += f"; 50% efficiency at SNR {r50:.1f}" if r50 == r50 else f"; below 50% efficiency up to SNR {top}"
        if ref is not None and m != reference:
            worst = max(ref_b["efficiency"] - b["efficiency"] for b, ref_b in zip(s["bins"], ref["bins"]))
            if r50 == r50 and rho50(ref) == rho50(ref):
                text += (f", {r50 - rho50(ref):+.1f} in SNR from the matched filter's {rho50(ref):.1f} (the "
                         f"same efficiency needs {r50 / rho50(ref):.2f}x the signal amplitude)")
            text += f"; largest efficiency gap to the matched filter {worst:.2f}"
        out.append(text + ".")
    return out


def plot(summary: dict, path):
    """Efficiency against SNR bin centre, one line per method (the matched filter dashed black)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, s in summary.items():
        x = [(b["lo"] + b["hi"]) / 2 for b in s["bins"]]
        y = [b["efficiency"] for b in s["bins"]]
        err = [b.get("spread", b["stderr"]) for b in s["bins"]]
        style = {"color": "black", "linestyle": "--"} if m == "matched-filter" else {}
        ax.errorbar(x, y, yerr=err, marker="o", markersize=4, capsize=3, label=m, **style)
    ax.set_xlabel("injected network SNR (bin centre)")
    ax.set_ylabel(f"detection efficiency at {100 * FAP:g}% FAP")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path
