"""One training run end to end: task data + model + method -> train -> files in ``out/``.

    out/metrics.jsonl      one line per evaluation (step, training time, metrics)
    out/result.json        the run's record (params, memory, times, best metrics, history)
    out/adapter/           for LoRA methods: the PEFT-format adapter; for methods with their own
                           format (``model.method_io``, e.g. ia3, adapters, prefix), theirs
    out/trainable.safetensors  for other methods: the weights that trained
    out/checkpoints/       atomic checkpoints for --resume

For LoRA methods the saved adapter is checked end to end before the run counts as done: loaded onto a
freshly built base it must reproduce the trained model's validation logits, and so must that model
after ``merge_and_unload`` (the deployable form). The differences go into result.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorakit.errors import LoraError
from lorakit.inject import merge_and_unload
from lorakit.io import fingerprint_metadata, folder_bytes, inside, load_adapter, read_metadata, save_adapter
from lorakit.quant import quantize_as_recorded, quantize_base, quantize_for_training
from lorakit.state import has_lora
from lorakit.tasks import get_task
from lorakit.tasks.base import ModelOptions
from lorakit.train.checkpoint import check_output_dir, trainable_state
from lorakit.train.distributed import init_distributed
from lorakit.train.loop import seed_everything, train
from lorakit.train.settings import TrainSettings


def run_training(task_name: str, method: str, out: str | Path, quick: bool = False,
                 overrides: dict | None = None, options: ModelOptions | None = None,
                 resume: bool = False, data_dir: str | None = None, progress: bool = True,
                 fsdp: bool = False) -> dict:
    """Under torchrun every rank runs this; rank 0 alone writes files (train/distributed.py)."""
    started = time.perf_counter()
    task = get_task(task_name)
    if method in getattr(task, "reference_methods", ()):       # trains nothing (gw's matched filter)
        return run_reference(task, method, Path(out), quick, data_dir, progress, started)
    settings: TrainSettings = task.settings(method, quick).replace(**(overrides or {}))
    dist = init_distributed(settings.device, fsdp)
    try:
        return _run(task, method, Path(out), quick, settings, options, resume, data_dir, progress,
                    dist, started)
    finally:
        dist.close()


def run_reference(task, method: str, out: Path, quick: bool, data_dir, progress: bool, started) -> dict:
    """A method that scores the validation set without training: the task writes val_logits and
    returns the record; result.json gets the same fields as a trained run's where they apply."""
    check_output_dir(out)
    result = task.run_reference(method, quick, out, data_dir=data_dir, progress=progress)
    result.update(task=task.name, method=method, quick=quick, rank=0,
                  wall_time_s=round(time.perf_counter() - started, 2))
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _run(task, method, out, quick, settings, options, resume, data_dir, progress, dist, started):
    if dist.is_main:
        check_output_dir(out)     # writable? (free space is checked once the model is known)
    seed_everything(settings.seed)
    train_data, val_data = task.load_data(quick=quick, seed=settings.seed, data_dir=data_dir)
    seed_everything(settings.seed)
    options = options or ModelOptions()
    model = task.build_model(method, options)
    if options.extra.get("quantize"):        # QLoRA: the frozen base stored 4/8-bit under the adapters
        if dist.active:
            raise LoraError("--quantize runs in one process for now; drop torchrun or --quantize")
        quantize_for_training(model, options.extra["quantize"], method,
                              embeddings=options.extra.get("quantize_embeddings", False))
    model._method = method
    result = train(model, task, train_data, val_data, settings, out, resume=resume, progress=progress,
                   dist=dist)
    if dist.fsdp:                 # every rank gathers; rank 0 saves from a plain, complete copy
        model = _unsharded(dist, model, lambda: task.build_model(method, options), method)
    result.update(rank=dist.rank, world_size=dist.world,
                  parallel="fsdp" if dist.fsdp else "ddp" if dist.active else "none")
    if not dist.is_main:
        return result
    result.update(task=task.name, method=method, quick=quick,
                  n_train=len(train_data), n_val=len(val_data),
                  model_options={"r": options.r, "alpha": options.alpha, **options.extra},
                  size_on_disk_bytes=_save_weights(model, out))
    if has_lora(model) or getattr(model, "method_io", None) is not None:
        result["adapter_check"] = verify_saved_adapter(model, task, options, val_data,
                                                       out / "adapter")
    result["wall_time_s"] = round(time.perf_counter() - started, 2)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _unsharded(dist, model, build, method: str):
    """A plain model holding the FSDP model's full tensors (gathered: a collective), on rank 0."""
    state = dist.full_state(model, trainable_only=False)
    if not dist.is_main:
        return model
    plain = build()
    plain.load_state_dict(state, strict=True)
    plain._method = method
    return plain.to(dist.device)


def _save_weights(model, out: Path) -> int:
    """Save what this method trained; return its size on disk in bytes."""
    method_io = getattr(model, "method_io", None)
    if method_io is not None:
        return folder_bytes(method_io.save(model, inside(out, "adapter")))
    if has_lora(model):             # with the serve-parity fingerprint where the model takes token ids
        return folder_bytes(save_adapter(model, inside(out, "adapter"),
                                         metadata=fingerprint_metadata(model)))
    path = inside(out, "trainable.safetensors")
    save_file(trainable_state(model), str(path))
    return path.stat().st_size


CHECK_ROWS = 32
CHECK_TOLERANCE = 1e-3      # max |logit difference| in fp32; observed ~1e-6 (summation order)


def verify_saved_adapter(model, task, options, val_data, folder: Path) -> dict:
    """Reload the saved adapter onto a fresh base, merge it, and compare logits with the trained model.

    A method with its own format (``model.method_io``: ``save(model, folder)``, ``load(base, folder)``
    and, where the method can be folded into the weights, ``merge(model) -> plain model``) is checked
    the same way through its own functions."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in val_data.take(torch.arange(min(CHECK_ROWS, len(val_data)))).items()}
    fresh = task.build_model("full", options).to(device)     # the pretrained base + a new random head
    method_io = getattr(model, "method_io", None)
    reloaded = method_io.load(fresh, folder) if method_io else load_adapter(fresh, folder)
    if options.extra.get("quantize"):        # the trained model's base, quantized the same (deterministic)
        if method_io:                         # its own format keeps no record: the run's options
            quantize_base(reloaded, options.extra["quantize"],
                          embeddings=options.extra.get("quantize_embeddings", False))
        else:          # the adapter's own record, as merge and generate use it: a lost field fails here
            record = read_metadata(folder).get("quantized_base")
            if not record:
                raise LoraError(f"the QLoRA adapter saved in {folder} carries no quantized_base record; "
                                "please report this as a bug")
            quantize_as_recorded(reloaded, record)
    merge = getattr(method_io, "merge", None) if method_io else merge_and_unload
    outputs = {}
    with torch.no_grad():
        for name, candidate in (("trained", model), ("reloaded", reloaded)):
            outputs[name] = task.forward(candidate.eval(), batch).float()
        if merge is not None:
            outputs["merged"] = task.forward(merge(reloaded).eval(), batch).float()
    diffs = {f"{name}_max_abs_diff": (outputs[name] - outputs["trained"]).abs().max().item()
             for name in ("reloaded", "merged") if name in outputs}
    if max(diffs.values()) > CHECK_TOLERANCE:
        raise LoraError(f"the saved adapter in {folder} does not reproduce the trained model "
                        f"({diffs}); please report this as a bug")
    return {**diffs, "rows": len(batch["labels"])}
