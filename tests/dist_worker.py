"""Run by tests/test_distributed.py under torchrun (not a test module): LoRA on TinyNet, a frozen base
inside ModuleList blocks (so each FSDP unit mixes frozen and trainable parameters), trained with DDP,
with FSDP2, and with FSDP2 resumed from a checkpoint. Rank 0 writes, for each, the adapter saved from
the gathered full state and that full state itself.

    torchrun --nproc-per-node 2 tests/dist_worker.py OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

import lorakit
from conftest import TinyNet
from lorakit.train.checkpoint import complete_checkpoints
from lorakit.train.data import TensorData
from lorakit.train.distributed import init_distributed
from lorakit.train.loop import train
from lorakit.train.settings import TrainSettings

SETTINGS = TrainSettings(lr=2e-2, batch_size=16, max_steps=12, eval_every=6, precision="fp32",
                         device="cpu", checkpoint_every=4, keep_checkpoints=3, warmup_frac=0.1)


class IdsTask:
    """Token sequences; the label is the first token mod 3."""

    name, metric = "ids", "val_accuracy"

    def data(self, n: int, seed: int) -> TensorData:
        ids = torch.randint(0, 20, (n, 7), generator=torch.Generator().manual_seed(seed))
        return TensorData({"ids": ids, "labels": ids[:, 0] % 3})

    def forward(self, model, batch):
        return model(batch["ids"])


def lora_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules=["query", "value", "qkv"],
                             modules_to_save=["classifier"])
    return lorakit.apply_lora(TinyNet(), cfg)


def run(out: Path, dist=None, resume: bool = False) -> torch.nn.Module:
    task = IdsTask()
    model = lora_model()
    train(model, task, task.data(128, 1), task.data(64, 2), SETTINGS, out, resume=resume,
          progress=False, dist=dist)
    return model


def save_gathered(model, dist, out: Path) -> None:
    """The full state (a collective), then rank 0 saves it as an adapter from a plain model."""
    state = dist.full_state(model, trainable_only=False)
    if dist.is_main:
        plain = lora_model()
        plain.load_state_dict(state, strict=True)
        lorakit.save_adapter(plain, out / "adapter")
        save_file(state, str(out / "full.safetensors"))


def main(root: Path) -> None:
    ddp = init_distributed("cpu")
    for name, dist in (("ddp", ddp), ("fsdp", replace(ddp, fsdp=True))):
        save_gathered(run(root / name, dist), dist, root / name)

    fsdp = replace(ddp, fsdp=True)          # resume under FSDP: drop the last two checkpoints
    run(root / "fsdp-resume", fsdp)
    if fsdp.is_main:
        for folder in complete_checkpoints(root / "fsdp-resume" / "checkpoints")[1:]:
            shutil.rmtree(folder)
    fsdp.barrier()
    save_gathered(run(root / "fsdp-resume", fsdp, resume=True), fsdp, root / "fsdp-resume")
    ddp.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
