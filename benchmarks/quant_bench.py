"""QLoRA against bf16 LoRA on one real model, side by side: memory, loss, speed, merge errors.

Each mode runs in its own process (so peak memory is its own) on the same data, seed and steps:

    bf16   the base in bf16, LoRA (fp32 factors) on every linear layer of the blocks
    nf4    the same base quantized with lorakit.quantize_base(model, "nf4") (QLoRA: NF4, block 64,
           double-quantized scales), the same LoRA on top
    nf4-emb  the same with embeddings=True: the input embeddings and output head quantized too

Both train under bf16 autocast with activation checkpointing (the finetune issue's
``--grad-checkpoint``), AdamW on the LoRA factors, on an SFT set: the synthetic E2E data-to-text pairs
(tasks/e2e_synth.py) as prompt "Describe: <MR>" -> completion "<reference>", loss on the completion.

Measured per mode: weight memory (bytes the model's parameters hold; quantized ones count their 4-bit
storage), peak resident memory while training (sampled every 5 ms, minus the interpreter's own
resident memory before the model was loaded), validation loss before and after, median step time,
and for nf4 where the extra time goes (dequantization per step, timed alone) and the merge errors:
default merge (16/32-bit, exact) and the re-quantized merge (reported, forced through).

Run: ``flock /tmp/lorakit-cpu.lock .venv/bin/python benchmarks/quant_bench.py --model qwen2.5-1.5b``
(about 30 minutes on 2 cores; ``--model smollm2`` about 5). Writes
benchmarks/results/quant_bench_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import quant_models  # noqa: E402  (the benchmark's own helper, next to this file)

OUT = Path(__file__).parent / "results"
MODES = ("bf16", "nf4", "nf4-emb")    # nf4-emb: quantize_base(..., embeddings=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def trim() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)      # hand freed heap back, so RSS is what is live


class PeakSampler:
    def __init__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def sft_batches(tokenizer, n_train: int, n_val: int, batch: int, seed: int = 0):
    from lorakit.tasks.e2e_synth import build_mrs, split
    train, val = split(build_mrs(n_train + n_val, seed=seed), n_val)

    def encode(examples):
        rows = []
        for ex in examples:
            prompt = tokenizer(f"Describe: {ex.mr}\n", add_special_tokens=False)["input_ids"]
            target = tokenizer(ex.references[0] + (tokenizer.eos_token or ""),
                               add_special_tokens=False)["input_ids"]
            rows.append((prompt + target, [-100] * len(prompt) + target))
        out = []
        for i in range(0, len(rows) - batch + 1, batch):
            chunk = rows[i:i + batch]
            width = max(len(ids) for ids, _ in chunk)
            pad = tokenizer.pad_token_id or 0
            ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in chunk])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in chunk])
            out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
        return out
    return encode(train), encode(val)


def loss_of(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=-100)


@torch.no_grad()
def val_loss(model, val) -> float:
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return statistics.fmean(loss_of(model, b).item() for b in val)


def child(args) -> dict:
    import lorakit  # deferred: import after the baseline RSS reading
    from lorakit.quant import plan_quantize, weight_memory
    torch.manual_seed(0)
    trim()
    rss_base = rss_bytes()
    model, tokenizer = quant_models.load(args.model, torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    bf16_weights = sum(r["bytes"] for r in weight_memory(model).values())
    plan = plan_quantize(model, "nf4")
    t0 = time.perf_counter()
    if args.mode != "bf16":                 # nf4, or nf4-emb: the embeddings and head too
        lorakit.quantize_base(model, "nf4", embeddings=args.mode == "nf4-emb")
    quantize_s = time.perf_counter() - t0
    linear_before = sum(r.bytes_before for r in plan.quantized)
    linear_after = sum(r.bytes_after if args.mode != "bf16" else r.bytes_before for r in plan.quantized)
    weights = sum(r["bytes"] for r in weight_memory(model).values())
    torch.manual_seed(0)
    lorakit.apply_lora(model, lorakit.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train, val = sft_batches(tokenizer, args.steps * args.batch, args.val_batches * args.batch,
                             args.batch)
    val = val[:args.val_batches]
    loss0 = val_loss(model, val)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    trim()
    rss_ready = rss_bytes()
    times, losses = [], []
    with PeakSampler() as peak:
        model.train()
        for batch in train[:args.steps]:
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_of(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            losses.append(loss.item())
            print(f"[{args.mode}] step {len(times)} loss {losses[-1]:.4f} {times[-1]:.2f} s",
                  flush=True)
    result = {"mode": args.mode, "model": args.model, "params": params, "weight_bytes": weights,
              "weight_bytes_bf16": bf16_weights, "quantize_s": quantize_s,
              "quantizable_linear_bytes": linear_after, "quantizable_linear_bytes_bf16": linear_before,
              "kept": {r.name: r.reason for r in plan.kept},
              "rss_ready_above_base": rss_ready - rss_base, "rss_peak_above_base": peak.peak - rss_base,
              "rss_peak": peak.peak, "rss_interpreter": rss_base,
              "val_loss_before": loss0, "val_loss_after": val_loss(model, val),
              "train_losses": losses, "step_s_median": statistics.median(times[1:] or times),
              "tokens_per_step": int(train[0]["attention_mask"].numel()),
              "load_average_after": os.getloadavg()[0]}
    if args.mode != "bf16":
        result.update(dequant_cost(model))
        if args.merges and args.mode == "nf4":
            result.update(merge_errors(model, val[0]))
    return result


def dequant_cost(model) -> dict:
    """Seconds to dequantize every quantized weight once, to bf16: a step pays this 3 times with
    activation checkpointing (forward, recomputed forward, backward for dx)."""
    from lorakit.quant import quantized_weights
    weights = [m.weight for _, m in quantized_weights(model)]
    t = time.perf_counter()
    for w in weights:
        w.dequantize(torch.bfloat16)
    once = time.perf_counter() - t
    return {"dequant_all_once_s": once, "dequant_per_step_s": 3 * once}


@torch.no_grad()
def merge_errors(model, batch) -> dict:
    """max |logit diff| against the unmerged QLoRA model, all in fp32 (bf16 rounding through the
    layers would swamp what is measured): exact merge, and re-quantized merge."""
    import copy

    import lorakit
    model.float().eval()           # quantized weights keep their codes, they dequantize to fp32 now
    probe = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    ref = model(**probe).logits.float()
    twin = copy.deepcopy(model)
    exact = lorakit.merge_and_unload(twin)
    diff_exact = (exact(**probe).logits.float() - ref).abs().max().item()
    del twin, exact
    trim()
    requant = lorakit.merge_and_unload(model, requantize=True, force=True, probe=probe)
    report = requant.__dict__["_lorakit_merge"]
    return {"merge_exact_max_logit_diff": diff_exact,
            "merge_requant_max_logit_diff": report["max_logit_diff"],
            "merge_requant_adapter_effect": report["adapter_effect"],
            "merge_requant_rel_weight_error": report["rel_weight_error"],
            "merge_requant_lost_update": report["lost_update"],
            "logit_scale": ref.abs().max().item()}


def table(bf16: dict, nf4: dict, emb: dict) -> str:
    gib = 2**30

    def row(name, key, fmt, target, rel=None):
        ratio = rel or (lambda r: f"{r[key] / bf16[key]:.3f}x")
        return (f"| {name} | {fmt(bf16[key])} | {fmt(nf4[key])} | {ratio(nf4)} | {fmt(emb[key])} | "
                f"{ratio(emb)} | {target} |")
    size = lambda v: f"{v / gib:.3f} GiB"                           # noqa: E731
    loss_change = lambda r: f"{(r['val_loss_after'] / bf16['val_loss_after'] - 1) * 100:+.2f}%"  # noqa: E731
    lines = ["| | bf16 LoRA | QLoRA (nf4) | ratio | nf4 + embeddings and head | ratio | target |",
             "|---|---|---|---|---|---|---|",
             row("weight memory: the quantized linear layers", "quantizable_linear_bytes", size,
                 "<= 0.30x"),
             row("weight memory: whole model", "weight_bytes", size, "<= 0.30x"),
             row("training peak memory (above interpreter)", "rss_peak_above_base", size, "<= 0.6x"),
             row("validation loss after training", "val_loss_after", lambda v: f"{v:.4f}", "within 3%",
                 loss_change),
             row("step time (median)", "step_s_median", lambda v: f"{v:.2f} s", "reported")]
    extra = nf4["step_s_median"] - bf16["step_s_median"]
    lines += ["", f"Where the extra {extra:.2f} s a step goes: dequantizing every NF4 weight to bf16 takes "
              f"{nf4['dequant_all_once_s']:.2f} s; a step does it 3 times (forward, recomputed forward "
              f"under checkpointing, backward for dx) = {nf4['dequant_per_step_s']:.2f} s.",
              f"Validation loss before training: bf16 {bf16['val_loss_before']:.4f}, nf4 "
              f"{nf4['val_loss_before']:.4f}, nf4 + embeddings {emb['val_loss_before']:.4f}. Kept "
              f"unquantized by default: {', '.join(nf4['kept']) or 'none'}.",
              f"Load average (1 min) at the end of each run: bf16 {bf16['load_average_after']:.1f}, nf4 "
              f"{nf4['load_average_after']:.1f}, nf4 + embeddings {emb['load_average_after']:.1f} on "
              f"{os.cpu_count()} cores (above that, step times are inflated by other processes)."]
    if "merge_exact_max_logit_diff" in nf4:
        lines += [f"Merges, fp32 (max |logit diff| vs the unmerged QLoRA model; logits reach "
              f"{nf4['logit_scale']:.1f}): default 16/32-bit merge {nf4['merge_exact_max_logit_diff']:.3g}; "
              f"re-quantized merge {nf4['merge_requant_max_logit_diff']:.3g} (the adapter's own effect "
              f"{nf4['merge_requant_adapter_effect']:.3g}), relative weight error "
              f"{nf4['merge_requant_rel_weight_error']:.3g}, up to "
              f"{nf4['merge_requant_lost_update']:.0%} of a layer's update lost."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-1.5b", choices=("qwen2.5-1.5b", "smollm2"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--val-batches", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--merges", type=int, default=None,
                    help="measure merge errors in fp32 (1/0; default: on for smollm2 only, the 1.5B "
                         "model's fp32 merged copy would need ~9 GB more)")
    ap.add_argument("--child", dest="mode", choices=MODES)
    args = ap.parse_args()
    if args.merges is None:
        args.merges = int(args.model == "smollm2")
    if args.mode:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    if args.model == "qwen2.5-1.5b":
        quant_models.qwen_dir()            # build the cache once, outside the measured runs
    results = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", mode] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "mode"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stderr.write(proc.stderr[-2000:] if proc.returncode else "")
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"{mode} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(lines[-1][len("RESULT "):])
    OUT.mkdir(exist_ok=True)
    name = f"quant_bench_{args.model}"
    (OUT / f"{name}.json").write_text(json.dumps({"args": vars(args), **results}, indent=2))
    text = f"{args.model}: {results['bf16']['params']:,} parameters, {args.steps} steps of " \
           f"{args.batch} sequences\n\n" + table(results["bf16"], results["nf4"], results["nf4-emb"])
    (OUT / f"{name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
