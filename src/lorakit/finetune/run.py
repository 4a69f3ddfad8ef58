"""``lorakit finetune`` end to end: prepare (finetune/prepare.py) -> answers before -> train with
lorakit's loop (train/loop.py) -> DIR/adapter -> answers after -> DIR/report.md.

    DIR/config.json      the resolved configuration (``--config DIR/config.json`` re-runs it)
    DIR/adapter/         PEFT-format adapter + tokenizer (+ label_map.json for classification)
    DIR/metrics.jsonl    one line per evaluation      DIR/checkpoints/   for --resume
    DIR/result.json      the run's record             DIR/report.md + loss.png
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from lorakit.adapters import disable_adapter
from lorakit.errors import LoraError
from lorakit.finetune.config import FinetuneConfig
from lorakit.finetune.prepare import Prepared, prepare
from lorakit.finetune.report import loss_plot, write_report
from lorakit.finetune.task import ClassifyTask, SFTTask
from lorakit.generate.sampling import Sampling
from lorakit.generate.stream import generate_texts
from lorakit.io import (PREFIX, atomic_write, fingerprint_metadata, folder_bytes, lora_state_dict,
                        read_adapter, save_adapter)
from lorakit.train.checkpoint import check_output_dir
from lorakit.train.distributed import init_distributed
from lorakit.train.loop import evaluate, seed_everything, train

ADAPTER_TOLERANCE = 0.0       # saved tensors are the trained ones, bit for bit


def run_finetune(cfg: FinetuneConfig) -> dict:
    clock = {"start": time.perf_counter()}
    timing: dict[str, float] = {}
    seed_everything(cfg.seed)
    if cfg.fsdp:
        raise LoraError("--fsdp is not supported by finetune yet (the adapter would have to be gathered "
                        "from shards); run DDP with `torchrun --nproc-per-node N -m lorakit finetune`")
    check_output_dir(Path(cfg.out))
    p = prepare(cfg)
    timing["data + model"] = _lap(clock)
    dist = init_distributed(p.settings.device, False)
    device = dist.device
    out = Path(cfg.out)
    task = SFTTask(p.train) if p.task == "sft" else ClassifyTask(p.train)
    p.model.to(device)
    before = _before(p, task, cfg, device) if dist.is_main else {}
    timing["answers + eval before"] = _lap(clock)
    if dist.is_main:
        if cfg.overwrite and not cfg.resume:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        saved = {**cfg.to_dict(), "resume": False, "overwrite": False}   # a re-run starts afresh
        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(saved, indent=1)))
    p.model._method = "lora"
    result = train(p.model, task, p.train, p.val, p.settings, out, resume=cfg.resume,
                   progress=cfg.progress and dist.is_main, dist=dist)
    dist.close()
    timing["training"] = result["train_time_s"]
    timing["evaluation + checkpoints"] = _lap(clock) - result["train_time_s"]
    result["is_main"] = dist.is_main
    if not dist.is_main:              # under torchrun rank 0 alone saves, answers and reports
        return result
    adapter = save_finetuned(p, out / "adapter", cfg.model)
    timing["saving"] = _lap(clock)
    samples = _after(p, cfg, device, before.get("answers", []))
    timing["answers after"] = _lap(clock)
    history = result["history"]
    result.update(task=p.task, format=p.fmt, chat=p.chat, data=p.stats, label_map=p.label_map,
                  val_loss_before=before.get("val_loss"), val_accuracy_before=before.get("val_accuracy"),
                  tokens_trained=p.train.tokens_served,
                  tokens_per_s=p.train.tokens_served / max(result["train_time_s"], 1e-9),
                  adapter_bytes=folder_bytes(adapter), samples=samples,
                  train_losses=task.train_losses,
                  plot=(loss_plot(history, before.get("val_loss"), out / "loss.png", task.train_losses,
                                  cfg.grad_accum) and "loss.png"))
    timing["total"] = time.perf_counter() - clock["start"]
    result["timing_s"] = {k: round(v, 2) for k, v in timing.items()}
    write_report(out, cfg.to_dict(), result)
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def _lap(clock: dict) -> float:
    now = time.perf_counter()
    elapsed, clock["lap"] = now - clock.get("lap", clock["start"]), now
    return elapsed


def _sampling(cfg: FinetuneConfig) -> Sampling:
    return Sampling(max_new_tokens=cfg.sample_tokens, temperature=0.0, seed=cfg.seed)


def _before(p: Prepared, task, cfg: FinetuneConfig, device) -> dict:
    """The untouched base on the validation set and prompts (adapter switched off)."""
    with disable_adapter(p.model):
        metrics = task.evaluate(p.model, p.val, device, p.settings) if hasattr(task, "evaluate") \
            else evaluate(p.model, task, p.val, device, p.settings)
        answers = generate_texts(p.model, p.tokenizer, [s[0] for s in p.samples], _sampling(cfg),
                                 use_chat=p.chat) if p.samples else []
    p.train.tokens_served = 0                   # evaluation is not training throughput
    return {"val_loss": metrics.get("val_loss"), "val_accuracy": metrics.get("val_accuracy"),
            "answers": answers}


def _after(p: Prepared, cfg: FinetuneConfig, device, before: list[str]) -> list[dict]:
    if not p.samples:
        return []
    after = generate_texts(p.model, p.tokenizer, [s[0] for s in p.samples], _sampling(cfg),
                           use_chat=p.chat)
    return [{"prompt": prompt, "reference": ref, "before": b, "after": a}
            for (prompt, ref), b, a in zip(p.samples, before, after)]


def save_finetuned(p: Prepared, folder: Path, base_name: str) -> Path:
    """PEFT-format adapter + tokenizer (+ label_map.json), then read back and compared with the
    trained tensors."""
    # the serve-parity fingerprint: lorakit serve / check-adapter recompute it before serving
    save_adapter(p.model, folder, base_model_name_or_path=base_name,
                 metadata=fingerprint_metadata(p.model))
    p.tokenizer.save_pretrained(folder)
    if p.label_map is not None:
        atomic_write(folder / "label_map.json", lambda tmp: Path(tmp).write_text(
            json.dumps({"label2id": p.label_map, "id2label": {v: k for k, v in p.label_map.items()}},
                       indent=1)))
    _, tensors, _ = read_adapter(folder)
    trained = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v
               for k, v in lora_state_dict(p.model).items()}
    worst = max(((tensors[k].float() - v.detach().float().cpu()).abs().max().item()
                 for k, v in trained.items() if k in tensors), default=0.0)
    if set(trained) - set(tensors) or worst > ADAPTER_TOLERANCE:
        raise LoraError(f"the adapter saved in {folder} differs from the trained one (max |diff| "
                        f"{worst}); please report this as a bug")
    return folder
