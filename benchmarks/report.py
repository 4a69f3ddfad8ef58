"""bench.json -> markdown: the tables and each target of issue 5 with its measured ratio."""

from __future__ import annotations


def _targets(rec: dict) -> list[tuple[str, float, float, str]]:
    """(target, measured ratio, bound, how the ratio is formed); met when ratio <= bound, except
    for MFU and mixed-batch throughput (names starting "bf16 LoRA training MFU", "8 adapters"), which
    must reach at least their bound. A target whose configs were not run (``--configs``) is left out."""
    t, inf = rec["train"], rec["inference"]
    mem = rec.get("memory", "RSS")
    fields = (("peak_mem_mb", f"peak {mem}"), ("train_mem_mb", f"{mem} added by training"))
    rows = []

    def ratio(name, a, b, field, bound, how):
        if a in t and b in t:
            rows.append((name, t[a][field] / t[b][field], bound, how))

    decided = "interleaved" in rec      # step-time targets: decided by interleaved runs (targets.py)
    for p in ("fp32", "bf16") if not decided else ():
        ratio(f"LoRA step vs PEFT ({p})", f"fused/{p}", f"peft/{p}", "step_s", 0.85,
              "lorakit fused step / PEFT step")
    for p in ("fp32", "bf16"):
        for field, label in fields:
            ratio(f"memory vs PEFT, {label} ({p})", f"fused/{p}", f"peft/{p}", field, 1.0, "lorakit / PEFT")
    for field, label in fields:
        ratio(f"memory vs PEFT, dropout 0.1, {label} (bf16)", "fused-drop/bf16", "peft-drop/bf16", field,
              0.9, "lorakit / PEFT")
    for p in ("fp32", "bf16") if not decided else ():
        ratio(f"LoRA step vs full fine-tuning ({p})", f"fused/{p}", f"full/{p}", "step_s", 0.60,
              "lorakit / full")
    for p in ("fp32", "bf16"):
        lat = inf[p]["latency_s"]
        rows.append((f"merged inference vs base ({p})", lat["lorakit-merged"] / lat["base"], 1.02,
                     "lorakit merged / bare base"))
        ours, theirs = lat["lorakit"] / lat["base"] - 1, lat["peft"] / lat["base"] - 1
        rows.append((f"unmerged overhead vs PEFT's ({p})", ours / theirs if theirs > 0 else float("nan"),
                     0.5, f"lorakit {ours:+.1%} / PEFT {theirs:+.1%} over base"))
    if "fused/bf16" in t and not decided:
        rows.append(("bf16 LoRA training MFU", t["fused/bf16"]["mfu"], 0.40, "achieved / bf16 GEMM peak"))
    for p in ("fp32", "bf16"):
        lat = inf[p]["latency_s"]
        rows.append((f"8 adapters mixed, throughput vs one adapter ({p})",
                     lat["single"] / lat["mixed8"], 0.8, "single-adapter time / mixed time"))
    return rows


def write_markdown(rec: dict) -> str:
    peak = rec["peak_used"]
    mem = rec.get("memory", "RSS")
    lines = [f"# lorakit benchmarks: {rec['model']}, batch {rec['batch'][0]} x {rec['batch'][1]}, "
             f"LoRA {rec['lora']}", "",
             f"{rec['machine'].get('device', 'cpu')}, {rec['machine']['threads']} threads, "
             f"torch {rec['machine']['torch']}. GEMM peak "
             f"({rec['gemm_peak_gflops'][0].get('n', 2048)}^3, max of start/end): "
             f"fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f} GFLOP/s. "
             f"Medians over {rec['settings']['rounds']} fresh processes per config x "
             f"{rec['settings']['steps']} steps; total {rec['wall_s'] / 60:.1f} min.", "",
             "## Training step (forward + backward + AdamW)", "",
             f"| config | precision | step (s) | tokens/s | vs PEFT | vs full | peak {mem} (MB) | "
             "+training (MB) | GFLOP/s | MFU |", "|---|---|---|---|---|---|---|---|---|---|"]
    t = rec["train"]

    def vs(key: str, row: dict) -> str:
        return f"{row['step_s'] / t[key]['step_s']:.2f}" if key in t else "-"

    for key, row in t.items():
        config, p = key.split("/")
        peft_key = "peft-drop/bf16" if config.endswith("-drop") else f"peft/{p}"
        lines.append(f"| {config} | {p} | {row['step_s']:.3f} | {row['tokens_per_s']:.0f} | "
                     f"{vs(peft_key, row)} | {vs(f'full/{p}', row)} | {row['peak_mem_mb']:.0f} | "
                     f"{row['train_mem_mb']:.0f} | {row['gflops_per_s']:.0f} | {row['mfu']:.1%} |")
    comp = [f"{s:.0f}" for key in ("compiled/fp32", "compiled/bf16") if key in t
            for s in t[key]["first_step_s"]]
    if comp:
        lines += ["", f"Compiled: first step (compilation included) {', '.join(comp)} s per process."]
    lines += ["", "## Inference latency (eval, no_grad) and mixed-adapter batches", "",
              "| variant | fp32 (ms) | vs base | bf16 (ms) | vs base |", "|---|---|---|---|---|"]
    inf = rec["inference"]
    for name in inf["fp32"]["latency_s"]:
        cells = []
        for p in ("fp32", "bf16"):
            lat = inf[p]["latency_s"]
            cells += [f"{lat[name] * 1e3:.1f}", f"{lat[name] / lat['base']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets (issue 5)", "", "| target | measured | bound | met | ratio |",
              "|---|---|---|---|---|"]
    for name, ratio, bound, how in _targets(rec):
        met = "yes" if ratio <= bound else "no"
        if name.startswith("bf16 LoRA training MFU") or name.startswith("8 adapters"):
            met = "yes" if ratio >= bound else "no"
            lines.append(f"| {name} | {ratio:.1%} | >= {bound:.0%} | {met} | {how} |")
        else:
            lines.append(f"| {name} | {ratio:.3f} | <= {bound:.2f} | {met} | {how} |")
    return "\n".join(lines) + "\n"
