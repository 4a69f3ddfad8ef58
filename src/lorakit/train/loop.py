"""The training loop: plain PyTorch, readable top to bottom.

    for step in 0..max_steps-1:
        for each of grad_accum micro-batches: loss = task loss / grad_accum; loss.backward()
        clip the global grad norm; AdamW step; schedule step (linear warmup, then cosine/linear decay)
        every eval_every steps: validation metrics -> metrics.jsonl; early stop after `patience` evals
        every checkpoint_every steps: an atomic checkpoint (train/checkpoint.py)

Time on the x-axis of the Whisper gravitational-wave LoRA study's plots is *training* time: evaluation
and checkpoint time are measured but not counted in ``time_s``. Runs are seeded and, on CPU,
deterministic: the batch order is a function of (seed, step), and resuming restores every RNG.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from safetensors.torch import save_file

from lorakit.errors import LoraError
from lorakit.io import atomic_write
from lorakit.train.checkpoint import (check_output_dir, complete_checkpoints, load_checkpoint,
                                      save_checkpoint)
from lorakit.train.data import TensorData, batch_indices, eval_batches
from lorakit.train.distributed import Dist
from lorakit.methods.hooks import hooks_of
from lorakit.train.memory import current_rss_mb, peak_memory_mb, reset_peak, resolve_device
from lorakit.train.precision import resident_base
from lorakit.train.metrics import HIGHER_IS_BETTER, classification_loss, classification_metrics
from lorakit.train.settings import TrainSettings


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(settings: TrainSettings, hooks=None):
    warmup = int(settings.warmup_frac * settings.max_steps)

    def factor(step: int) -> float:
        return hooks.lr_factor(step, schedule(step)) if hooks else schedule(step)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if settings.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(settings.max_steps - warmup, 1)
        if settings.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def param_groups(model: nn.Module, settings: TrainSettings) -> list[dict]:
    """Trainable parameters, with those of ``model.head_modules`` (set by methods.apply_method) in a
    group of their own at ``settings.head_lr``: a randomly initialised head needs larger steps than
    pretrained weights being fine-tuned."""
    heads = tuple(f"{name}." for name in getattr(model, "head_modules", []))
    head, body = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if heads and settings.head_lr and name.startswith(heads) else body).append(param)
    if not head and not body:
        raise LoraError("no parameter requires grad: nothing would train. Check the method / "
                        "load_adapter(..., trainable=True)")
    groups = [{"params": body, "lr": settings.lr}] if body else []
    return groups + ([{"params": head, "lr": settings.head_lr}] if head else [])


def make_optimizer(model: nn.Module, settings: TrainSettings):
    hooks = hooks_of(model)
    params = hooks.param_groups(model, settings, param_groups(model, settings))
    optimizer = hooks.make_optimizer(params, settings)      # GaLore brings its own
    if optimizer is None and settings.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay)
    elif optimizer is None:
        # fused: one kernel for all parameters instead of ~10 small ops per tensor (a LoRA model has
        # dozens of small factors; measured 0.6 ms vs 5.4 ms per step for MiniLM's 26 tensors on CPU)
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay,
                                      fused=_fusable(params))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings, hooks))
    return optimizer, scheduler


def _fusable(groups: list[dict]) -> bool:
    """Fused AdamW takes plain floating-point tensors on CPU or CUDA; torchrun jobs keep the default
    (FSDP's parameters are DTensor shards, and ranks must step exactly as a single process would)."""
    params = [p for g in groups for p in g["params"]]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False
    return bool(params) and all(type(p.data) is torch.Tensor and p.is_floating_point()
                                and p.device.type in ("cpu", "cuda") for p in params)


def evaluate(model: nn.Module, task, data: TensorData, device, settings: TrainSettings) -> dict:
    return evaluate_scores(model, task, data, device, settings)[0]


def evaluate_scores(model: nn.Module, task, data: TensorData, device, settings: TrainSettings):
    """(metrics, logits of every validation example in order, or None for a task's own evaluate)."""
    if hasattr(task, "evaluate"):               # tasks whose metric is not a classifier's (BLEU)
        return task.evaluate(model, data, device, settings), None
    was_training = model.training
    model.eval()
    logits, labels = [], []
    with torch.no_grad(), autocast(device, settings.precision):
        for batch in eval_batches(data, max(settings.batch_size, 64)):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits.append(task.forward(model, batch).float().cpu())
            labels.append(batch["labels"].cpu())
    model.train(was_training)
    logits = torch.cat(logits)
    return classification_metrics(logits, torch.cat(labels)), logits


VAL_LOGITS = "val_logits.safetensors"


def save_val_logits(out: Path, logits: torch.Tensor, step: int) -> None:
    """The best evaluation's logits, one row per validation example, for per-example analyses after
    the run (detection efficiency by signal strength in ``compare``): out/val_logits.safetensors."""
    atomic_write(out / VAL_LOGITS, lambda tmp: save_file({"logits": logits.contiguous()}, tmp,
                                                        metadata={"step": str(step)}))


def train(model: nn.Module, task, train_data: TensorData, val_data: TensorData,
          settings: TrainSettings, out_dir: str | Path, resume: bool = False,
          progress: bool = True, dist: Dist | None = None) -> dict:
    """Train ``model`` (already prepared by a method) and return the run's result record.
    ``dist`` (train/distributed.py): this process's share of a torchrun job; rank 0 writes files."""
    out = Path(out_dir)
    dist = dist or Dist(device=resolve_device(settings.device))
    dist.check_batch(settings.batch_size)
    device = dist.device
    seed_everything(settings.seed)
    model.to(device).train()
    if dist.is_main:            # fail before any training, not at the first checkpoint
        check_output_dir(out, sum(p.numel() * p.element_size() for p in model.parameters()
                                  if p.requires_grad), settings.keep_checkpoints + 1)
        out.mkdir(parents=True, exist_ok=True)
    dist.shard(model)           # FSDP2: before the optimizer sees the parameters
    if settings.compile:            # in place (nn.Module.compile): same module, same state-dict keys
        model.compile()
    optimizer, scheduler = make_optimizer(model, settings)
    net = dist.wrap(model)      # DDP for the training forward/backward; evaluation uses model
    # bf16: the frozen base resident in bf16 for the run (train/precision.py: the products autocast
    # would form, without re-casting every frozen weight at every step); fp32 weights come back at the
    # end. Not for sharded runs or methods with hooks (ReLoRA merges into the frozen weights).
    resident = resident_base(model, settings.precision, sharded=dist.fsdp)
    reset_peak(device)
    baseline_mb = current_rss_mb() if device.type == "cpu" else 0.0

    start_step, train_time, history, best = 0, 0.0, [], None
    checkpoints = complete_checkpoints(out / "checkpoints")
    if resume and checkpoints:
        state = load_checkpoint(checkpoints[-1], model, optimizer, scheduler, dist.restore())
        hooks_of(model).load_state_dict(state["extra"].get("hooks", {}))
        start_step = state["step"]
        train_time, best = state["extra"]["train_time"], state["extra"].get("best")
        history = _read_history(out / "metrics.jsonl", start_step) if dist.is_main else []
    elif dist.is_main:          # a fresh start (also --resume with no checkpoint yet)
        (out / "metrics.jsonl").unlink(missing_ok=True)

    metric = task.metric
    better = HIGHER_IS_BETTER[metric]
    evals_since_best, stopped_early, interrupted = 0, False, False
    bar = _progress(settings.max_steps, start_step, progress, f"{task.name}/{getattr(model, '_method', '')}") \
        if dist.is_main else _Mute()
    step = start_step
    resident.__enter__()        # its copies count as training memory
    try:
        while step < settings.max_steps:
            tick = time.perf_counter()
            loss = _optimizer_step(net, task, train_data, settings, optimizer, scheduler, device, step,
                                   dist)
            train_time += time.perf_counter() - tick
            step += 1
            bar.update(1)
            extra = task.progress_fields(train_time) if hasattr(task, "progress_fields") else {}
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", **extra)
            if step % settings.eval_every == 0 or step == settings.max_steps:
                metrics, logits = evaluate_scores(model, task, val_data, device, settings)
                record = {"step": step, "time_s": round(train_time, 3), "train_loss": loss, **metrics}
                history.append(record)
                if dist.is_main:
                    with open(out / "metrics.jsonl", "a") as handle:
                        handle.write(json.dumps(record) + "\n")
                bar.write(_format_record(record))
                if best is None or (record[metric] > best[metric]) == better and \
                        record[metric] != best[metric]:
                    best, evals_since_best = record, 0
                    if dist.is_main and logits is not None:
                        save_val_logits(out, logits, step)
                else:
                    evals_since_best += 1
                if settings.patience and evals_since_best >= settings.patience:
                    stopped_early = True
            if settings.checkpoint_every and step % settings.checkpoint_every == 0 or stopped_early:
                _checkpoint(dist, out, step, model, optimizer, scheduler, train_time, best, settings)
            if stopped_early:
                bar.write(f"early stop at step {step}: no {metric} gain in {settings.patience} evals")
                break
        if step == settings.max_steps and step > start_step and not (
                settings.checkpoint_every and step % settings.checkpoint_every == 0):
            _checkpoint(dist, out, step, model, optimizer, scheduler, train_time, best, settings)
    except KeyboardInterrupt:
        interrupted = True
        if dist.is_main and not dist.fsdp:     # gathering shards would need every rank: FSDP keeps
            save_checkpoint(out / "checkpoints", step, model, optimizer, scheduler,   # the last one
                            _extra(model, train_time, best), settings.keep_checkpoints)
        bar.write(f"interrupted at step {step}: checkpoint saved; continue with --resume"
                  if not dist.fsdp else f"interrupted at step {step}; --resume continues from the "
                  "last periodic checkpoint")
    finally:
        bar.close()
        resident.__exit__(None, None, None)
        if settings.compile:        # hand back the plain module: saving, merging, reloading follow
            model._compiled_call_impl = None

    params = list(model.parameters())
    return {
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "baseline_memory_mb": round(baseline_mb, 1),
        "train_time_s": round(train_time, 2),
        "steps": step, "device": str(device), "stopped_early": stopped_early,
        "interrupted": interrupted,
        "best": {k: v for k, v in (best or {}).items() if k.startswith("val_") or k == "step"},
        "history": history, "settings": settings.to_dict(),
    }


def _optimizer_step(model, task, data, settings, optimizer, scheduler, device, step,
                    dist: Dist | None = None) -> float:
    """One optimizer step; under torchrun ``model`` is the DDP wrapper and each rank takes its share
    of the global batch (DDP all-reduces gradients at every micro-batch: simple, and correct)."""
    dist = dist or Dist(device=device)
    total = 0.0
    for micro in range(settings.grad_accum):
        order = getattr(data, "batch_indices", batch_indices)   # token data groups rows by length
        index = dist.local(order(len(data), settings.batch_size, settings.seed,
                                 step * settings.grad_accum + micro))
        batch = {k: v.to(device, non_blocking=True) for k, v in data.take(index).items()}
        with autocast(device, settings.precision):
            logits = task.forward(model, batch)
        loss = task_loss(task, logits, batch) / settings.grad_accum
        value = dist.mean(loss)         # over ranks: a NaN on one rank stops them all alike
        if not math.isfinite(value):
            optimizer.zero_grad(set_to_none=True)
            if settings.skip_nonfinite:
                return float("nan")
            raise LoraError(f"loss became {value} at step {step + 1}; lower --lr or use "
                            "--skip-nonfinite. The last checkpoint is kept as it was")
        loss.backward()
        total += value
    hooks = hooks_of(model)
    model = getattr(model, "module", model)     # hooks see parameter names without DDP's prefix
    hooks.after_backward(step, model)
    if settings.grad_clip:
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
    optimizer.step()
    hooks.after_step(step, model, optimizer)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def task_loss(task, logits, batch) -> torch.Tensor:
    """The task's own loss (language modelling) or cross-entropy / BCE on ``batch["labels"]``."""
    if hasattr(task, "loss"):
        return task.loss(logits, batch)
    return classification_loss(logits, batch["labels"])


def _checkpoint(dist: Dist, out: Path, step: int, model, optimizer, scheduler, train_time, best,
                settings: TrainSettings) -> None:
    weights, optimizer_state = dist.checkpoint_payload(model, optimizer)   # FSDP: every rank gathers
    if dist.is_main:
        save_checkpoint(out / "checkpoints", step, model, optimizer, scheduler,
                        _extra(model, train_time, best), settings.keep_checkpoints,
                        weights, optimizer_state)


def _extra(model, train_time: float, best) -> dict:
    return {"train_time": train_time, "best": best, "hooks": hooks_of(model).state_dict()}


def _read_history(path: Path, up_to_step: int) -> list[dict]:
    """Evaluation records already written, up to the resumed checkpoint (later ones are redone)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in records if r["step"] <= up_to_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _format_record(record: dict) -> str:
    parts = [f"step {record['step']:>5}", f"t={record['time_s']:.1f}s"]
    parts += [f"{k[4:]}={v:.4f}" for k, v in record.items() if k.startswith("val_")]
    return "  ".join(parts)


class _Silent:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def write(self, text): print(text, flush=True)
    def close(self): pass


class _Mute(_Silent):
    def write(self, text): pass


def _progress(total: int, start: int, enabled: bool, label: str):
    if not enabled:
        return _Silent()
    from tqdm.auto import tqdm     # deferred: heavy optional dependency
    return tqdm(total=total, initial=start, desc=label, unit="step", dynamic_ncols=True)
