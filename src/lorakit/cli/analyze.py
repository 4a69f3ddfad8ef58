"""``lorakit analyze ADAPTER_DIR [--other ADAPTER_DIR] [--base MODEL] --out DIR`` (paper section 7).

Writes DIR/analysis.json (tools/analysis.py defines every number) and the PNGs of report/analysis.py:
spectra of every dW, phi heatmaps against --other, amplification of the --base weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.cli.common import infer_task
from lorakit.io import read_adapter
from lorakit.models import load
from lorakit.report.analysis import (MAX_HEATMAPS, plot_amplification, plot_phi, plot_spectra,
                                     summary_table)
from lorakit.tools.analysis import analyze


def register(sub) -> None:
    p = sub.add_parser("analyze", help="what an adapter learnt (LoRA paper section 7): spectra and "
                                       "effective rank of dW, subspace similarity to another "
                                       "adapter, amplification of the base weight")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--other", help="a second adapter on the same modules (other rank or seed): phi "
                                   "heatmaps")
    p.add_argument("--base", help="the base model (a known name such as minilm, or a local HF "
                                  "directory): amplification factors against its weights")
    p.add_argument("--modules", help="regex picking the matrices for the phi heatmaps (default: the "
                                     f"last block's, at most {MAX_HEATMAPS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions (default 0)")
    p.add_argument("--out", required=True, help="folder for analysis.json and the PNGs")
    p.set_defaults(run=run)


def run(args) -> int:
    base = load_base(args.base, args.adapter) if args.base else None
    result = analyze(args.adapter, args.other, base, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phi = result.pop("phi")
    plots = [plot_spectra(result, out / "singular_values.png")]
    if phi:
        plots.append(plot_phi(phi, args.modules, out / "subspace_similarity.png"))
    if base is not None:
        plots.append(plot_amplification(result, out / "amplification.png"))
    result["plots"] = [p.name for p in plots]
    (out / "analysis.json").write_text(json.dumps(result, indent=1))
    print(summary_table(result))
    print(f"wrote {out / 'analysis.json'} and {', '.join(p.name for p in plots)}")
    return 0


def load_base(name: str, adapter_dir: str):
    """The base model with the head the adapter was trained with (so module paths line up)."""
    cfg, tensors, _ = read_adapter(adapter_dir)
    task, num_labels = infer_task(cfg.modules_to_save, tensors)
    return load(name, task=task, num_labels=num_labels or 2).model
