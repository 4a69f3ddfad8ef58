"""The decision targets of the benchmark (issue 17), each from interleaved steps in one process.

Every group below is one ``interleaved.py`` process: its configurations alternate step by step for
``rounds`` rounds, so each ratio is a median of per-round ratios with a bootstrap 95% interval, and a
target is met only when the whole interval is on the right side of its bound
(``python benchmarks/targets.py results/interleaved.json`` prints the table again):

    default path vs eager     lorakit / eager <= 1.00   every model, fp32 and bf16
    ahead of PEFT             lorakit / peft  <= 0.85   MiniLM-L6, SmolLM2-135M, fp32 and bf16
    close to the floor        lorakit / floor <= 1.10   (PEFT / floor reported beside it)
    bf16 MFU                  >= 40% of the measured bf16 GEMM peak (interval from the step times)
    LoRA vs full (gw model)   lorakit / full  <= 0.70   Whisper tiny.en encoder, bf16 (the demo's)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lorakit.train.timing import bootstrap_median_ci

HERE = Path(__file__).resolve().parent
LORA = ["lorakit", "eager", "peft", "floor"]
GROUPS = [("minilm", "fp32", LORA), ("minilm", "bf16", LORA + ["fused"]),
          ("whisper", "fp32", ["lorakit", "eager", "floor"]),
          ("whisper", "bf16", ["lorakit", "eager", "floor", "full"]),
          ("smollm2", "fp32", LORA), ("smollm2", "bf16", LORA + ["fused"])]
RATIOS = ["lorakit/eager", "lorakit/peft", "lorakit/floor", "peft/floor", "lorakit/full", "fused/peft",
          "compiled/peft", "compiled/lorakit"]
PEFT_MODELS = ("minilm", "smollm2")


def run_group(model: str, precision: str, configs: list[str], rounds: int, threads: int = 0,
              small: bool = False) -> dict:
    ratios = [r for r in RATIOS if all(c in configs for c in r.split("/"))]
    flops = ["--flops", "lorakit"] if precision == "bf16" and "lorakit" in configs else []
    args = [sys.executable, "interleaved.py", model, precision, *configs, "--rounds", str(rounds),
            *[x for r in ratios for x in ("--ratio", r)], *flops, "--threads", str(threads)] + (
        ["--small"] if small else [])
    done = subprocess.run(args, cwd=HERE, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args[1:])} failed:\n{done.stderr[-3000:]}")
    for line in done.stderr.splitlines():
        if line.startswith(f"{model}/{precision} "):
            print(line, flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_groups(rounds: int, models=None, compiled: bool = False, threads: int = 0,
               out: Path | None = None, small: bool = False) -> list[dict]:
    """Every group in turn; with ``out``, the results so far are kept in out/interleaved.json.
    ``small``: 2-row batches, a smoke test of the whole pipeline (figures meaningless)."""
    groups = [g for g in GROUPS if models is None or g[0] in models]
    if compiled:          # regional torch.compile: an option, its compile time reported
        groups.append(("minilm", "bf16", ["compiled", "lorakit", "peft"]))
    done = []
    for m, p, c in groups:
        done.append(run_group(m, p, c, rounds, threads, small))
        if out is not None:
            (Path(out) / "interleaved.json").write_text(json.dumps(done, indent=1))
    return done


def _ratio(group: dict, key: str):
    r = group["ratios"].get(key)
    return None if r is None else (r["ratio"], r["low"], r["high"])


def targets(groups: list[dict], peak: dict) -> list[dict]:
    """One row per target: name, (estimate, low, high), bound, at_least, met, and how it is formed."""
    rows = []

    def add(name, value, bound, how, at_least=False):
        if value is None:
            return
        mid, low, high = value
        met = low >= bound if at_least else high <= bound
        rows.append({"target": name, "value": mid, "low": low, "high": high, "bound": bound,
                     "at_least": at_least, "met": met, "how": how})

    for g in groups:
        m, p = g["model"], g["precision"]
        if "compiled" in g["step_s"]:
            add(f"regional compile vs PEFT, {m} {p}", _ratio(g, "compiled/peft"), 0.85,
                f"compiled / PEFT (compile {g['info']['compiled']['compile_s']:.0f} s, not in the steps)")
            continue
        share = g["info"].get("lorakit", {}).get("fused_share")
        if share == 0.0:          # the default took the eager path in every layer: the reference itself
            add(f"default path vs eager, {m} {p}", (1.0, 1.0, 1.0), 1.00,
                "the default is the eager path at this shape (same code; measured "
                f"{_describe(_ratio(g, 'lorakit/eager'))})")
        else:
            add(f"default path vs eager, {m} {p}", _ratio(g, "lorakit/eager"), 1.00,
                "lorakit default / eager" + ("" if share is None else f" ({share:.0%} of layer calls fused)"))
        if m in PEFT_MODELS:
            alone = _ratio(g, "fused/peft")
            add(f"LoRA step vs PEFT, {m} {p}", _ratio(g, "lorakit/peft"), 0.85, "lorakit / PEFT" + (
                f" (fused layers without the resident bf16 base: {alone[0]:.3f} [{alone[1]:.3f}, "
                f"{alone[2]:.3f}])" if alone else ""))
        peft_floor = _ratio(g, "peft/floor")
        add(f"LoRA step / floor, {m} {p}", _ratio(g, "lorakit/floor"), 1.10,
            "lorakit / floor" + (f" (PEFT / floor {peft_floor[0]:.3f} [{peft_floor[1]:.3f}, "
                                 f"{peft_floor[2]:.3f}])" if peft_floor else ""))
        add(f"LoRA step vs full fine-tuning, {m} {p}", _ratio(g, "lorakit/full"), 0.70, "lorakit / full")
        flops = g["info"].get("lorakit", {}).get("flops_per_step")
        if flops and p == "bf16":
            same_threads = g["threads"] == peak.get("threads")
            top = max(g.get("gemm_peak_gflops") or 0, peak["bf16"] if same_threads else 0)
            t, lo, hi = bootstrap_median_ci(g["times_s"]["lorakit"])
            add(f"bf16 LoRA MFU, {m}", (flops / t / 1e9 / top, flops / hi / 1e9 / top,
                                        flops / lo / 1e9 / top), 0.40,
                f"{flops / 1e9:.0f} GFLOP/step / step time / {top:.0f} GFLOP/s (bf16 GEMM peak, "
                f"{g['threads']} threads)", at_least=True)
    return rows


def _describe(value) -> str:
    return "n/a" if value is None else f"{value[0]:.3f} [{value[1]:.3f}, {value[2]:.3f}]"


def _fmt(row: dict) -> str:
    pct = row["target"].startswith("bf16 LoRA MFU")
    f = (lambda x: f"{x:.1%}") if pct else (lambda x: f"{x:.3f}")
    bound = (">= " if row["at_least"] else "<= ") + (f"{row['bound']:.0%}" if pct else f"{row['bound']:.2f}")
    return (f"| {row['target']} | {f(row['value'])} [{f(row['low'])}, {f(row['high'])}] | {bound} | "
            f"{'met' if row['met'] else 'not met'} | {row['how']} |")


def markdown(groups: list[dict], peak: dict) -> str:
    lines = ["## Targets (issue 17): interleaved in one process, median ratio [95% bootstrap interval]",
             "", "A target is met only when the whole interval is on the right side of the bound.", "",
             "| target | measured [95% interval] | bound | verdict | ratio |", "|---|---|---|---|---|"]
    lines += [_fmt(row) for row in targets(groups, peak)]
    lines += ["", "| model | precision | rounds | threads | median step (s) per configuration | "
              "load before/after |", "|---|---|---|---|---|---|"]
    for g in groups:
        steps = ", ".join(f"{c} {t:.3f}" for c, t in g["step_s"].items())
        lines.append(f"| {g['model']} | {g['precision']} | {g['rounds']} | {g['threads']} | {steps} | "
                     f"{g['load'][0]:.1f} / {g['load'][1]:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":        # the table again from a saved interleaved.json (e.g. a cut-short run)
    print(markdown(json.loads(Path(sys.argv[1]).read_text()), {"fp32": 0.0, "bf16": 0.0}))
