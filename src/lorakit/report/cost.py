"""The report's cost section: LoRA's step cost next to full fine-tuning's, robust to a shared machine.

Wall times of methods that trained one after the other compare different machine states when other
jobs come and go. Two things make that visible:
  - the paired ratio: both methods' optimizer steps interleaved in one process at the end of compare
    (experiments/paired.py), median of per-pair ratios with a bootstrap 95% interval;
  - the load each run saw: the 1-minute load average before and after it, and the CPU time its process
    got per second of wall time; a warning when these moved between or during the runs.
"""

from __future__ import annotations

LOAD_CHANGE = 1.0       # load-average points (about one busy core) that make wall times suspect


def load_warnings(results: dict) -> list[str]:
    """Sentences about machine load that make the wall-time comparison unreliable (may be empty)."""
    seen = {m: r["machine"] for m, r in results["methods"].items() if "machine" in r}
    if not seen:
        return []
    loads = [x for m in seen.values() for x in m["load"]]
    lines = []
    if max(loads) - min(loads) > LOAD_CHANGE:
        detail = ", ".join(f"{m} {s['load'][0]:.1f} -> {s['load'][1]:.1f}" for m, s in seen.items())
        fair = ("The interleaved ratio above is the fair comparison." if results.get("paired_timing") else
                "`--time-pairs N` times the methods' steps interleaved in one process, the fair comparison.")
        lines.append(f"Warning: the machine's load changed while methods trained (1-min load average "
                     f"before -> after each run: {detail}); wall times of different methods may compare "
                     f"different machine states. {fair}")
    shares = [s["cpu_share"] for s in seen.values() if s.get("cpu_share")]
    if shares and max(shares) > 1.25 * min(shares):
        detail = ", ".join(f"{m} {s['cpu_share']:.2f}" for m, s in seen.items() if s.get("cpu_share"))
        lines.append(f"Warning: runs got different CPU time per second of wall time ({detail} cores): "
                     f"another job competed with some of them.")
    return lines


def cost_section(results: dict, a: str = "lora", b: str = "full", bound: float = 0.70) -> list[str]:
    """Markdown lines: wall-time ratio, interleaved step ratio with interval (and whether it is below
    ``bound``), and load warnings."""
    runs = results["methods"]
    lines = []
    if "error" not in runs.get(a, {"error": 1}) and "error" not in runs.get(b, {"error": 1}):
        wall = runs[a]["train_time_s"] / max(runs[b]["train_time_s"], 1e-9)
        lines.append(f"- Wall time: {a} trained in {runs[a]['train_time_s']:.1f} s, {b} in "
                     f"{runs[b]['train_time_s']:.1f} s ({wall:.2f}x), in separate runs.")
    paired = results.get("paired_timing")
    if paired:
        met = "below" if paired["high"] <= bound else "not entirely below"
        lines.append(f"- Same machine state, interleaved: a {a} step costs {paired['ratio']:.2f}x a {b} "
                     f"step (95% interval {paired['low']:.2f}-{paired['high']:.2f}, median of "
                     f"{paired['pairs']} alternating pairs: {a} {_ms(paired['times_a'])}, {b} "
                     f"{_ms(paired['times_b'])} per step{_threads(paired)}); the interval is {met} "
                     f"{bound:.2f}x. The "
                     f"arithmetic floor is about 0.67x: LoRA skips the frozen weights' gradients "
                     f"(one of a full step's three matrix products per layer).")
    lines += [f"- {w}" for w in load_warnings(results)]
    return (["## Cost: LoRA against full fine-tuning", ""] + lines + [""]) if lines else []


def _threads(paired: dict) -> str:
    n = paired.get("threads")
    return "" if n is None else f", {n} CPU thread{'s' if n != 1 else ''}"


def _ms(times: list[float]) -> str:
    ordered = sorted(times)
    return f"{ordered[len(ordered) // 2] * 1e3:.0f} ms"
