"""The training loop on a tiny task: it learns, logs, checkpoints atomically, resumes bit for bit,
stops on NaN with a message, and gives the head its own learning rate."""

import json

import pytest
import torch
from torch import nn

from lorakit import LoraError
from lorakit.methods import AdaptSpec, apply_method
from lorakit.train.checkpoint import complete_checkpoints
from lorakit.train.data import TensorData
from lorakit.train.loop import param_groups, train
from lorakit.train.settings import TrainSettings


class BlobTask:
    """Two Gaussian blobs in 16-d; an MLP body with a `classifier` head."""

    name, metric = "blobs", "val_accuracy"

    def __init__(self, poison_at: int | None = None, interrupt_at: int | None = None):
        self.calls, self.poison_at, self.interrupt_at = 0, poison_at, interrupt_at

    def data(self, n: int, seed: int) -> TensorData:
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, 16, generator=g) + 1.5 * (2 * labels[:, None] - 1) * torch.ones(16) / 4
        return TensorData({"x": x, "labels": labels})

    def model(self, method: str = "lora") -> nn.Module:
        torch.manual_seed(0)
        body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        model = nn.Sequential()
        model.add_module("body", body)
        model.add_module("classifier", nn.Linear(32, 2))
        spec = AdaptSpec(head=["classifier"], lora_targets=["body.0", "body.2"], r=4, alpha=8)
        return apply_method(model, method, spec)

    def forward(self, model, batch):
        self.calls += 1
        if self.interrupt_at and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        logits = model(batch["x"])
        return logits * float("nan") if self.poison_at and self.calls >= self.poison_at else logits


SETTINGS = TrainSettings(lr=1e-2, batch_size=16, max_steps=30, eval_every=10, precision="fp32",
                         device="cpu", warmup_frac=0.1)


def run(tmp_path, task=None, settings=SETTINGS, resume=False, method="lora"):
    task = task or BlobTask()
    model = task.model(method)
    result = train(model, task, task.data(256, 1), task.data(128, 2), settings, tmp_path,
                   resume=resume, progress=False)
    return model, result


def adapter_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_learns_logs_and_reports(tmp_path):
    model, result = run(tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30] == [h["step"] for h in result["history"]]
    assert {"time_s", "train_loss", "val_loss", "val_accuracy", "val_auc"} <= set(lines[0])
    assert result["best"]["val_accuracy"] > 0.8                # chance is 0.5
    assert result["trainable_params"] == 4 * (16 + 32) + 4 * (32 + 32) + 66
    assert result["peak_memory_mb"] > 0 and result["steps"] == 30
    assert len(complete_checkpoints(tmp_path / "checkpoints")) == 1     # the final one


def test_same_seed_same_weights(tmp_path):
    a, _ = run(tmp_path / "a")
    b, _ = run(tmp_path / "b")
    for (name, x), y in zip(adapter_weights(a).items(), adapter_weights(b).values()):
        assert torch.equal(x, y), name


def test_interrupt_saves_and_resume_is_bit_exact(tmp_path):
    straight, _ = run(tmp_path / "straight")
    settings = SETTINGS.replace(checkpoint_every=7)
    # 128 val rows / 64 per eval batch = 2 forward calls per eval; interrupt inside step 17's forward
    _, first = run(tmp_path / "cut", BlobTask(interrupt_at=17 + 2), settings)
    assert first["interrupted"] and first["steps"] == 16
    assert [p.name for p in complete_checkpoints(tmp_path / "cut" / "checkpoints")] == \
        ["step-00000014", "step-00000016"]                     # keep 2: the periodic one + Ctrl-C's
    resumed, second = run(tmp_path / "cut", settings=settings, resume=True)
    assert second["steps"] == 30 and [h["step"] for h in second["history"]] == [10, 20, 30]
    for (name, x), y in zip(adapter_weights(straight).items(), adapter_weights(resumed).values()):
        assert torch.equal(x, y), name


def test_half_written_checkpoint_is_ignored(tmp_path):
    run(tmp_path, settings=SETTINGS.replace(checkpoint_every=10, max_steps=20))
    broken = tmp_path / "checkpoints" / "step-00000099"
    broken.mkdir()
    (broken / "trainable.safetensors").write_bytes(b"partial")          # no COMPLETE marker
    assert complete_checkpoints(tmp_path / "checkpoints")[-1].name == "step-00000020"


def test_nan_loss_stops_naming_the_step(tmp_path):
    with pytest.raises(LoraError, match="at step 7;"):
        run(tmp_path, BlobTask(poison_at=7))                       # one forward call per step


def test_nan_loss_can_be_skipped(tmp_path):
    _, result = run(tmp_path, BlobTask(poison_at=10 ** 9), SETTINGS.replace(skip_nonfinite=True))
    assert result["steps"] == 30


def test_head_gets_its_own_learning_rate():
    model = BlobTask().model("full")
    groups = param_groups(model, SETTINGS.replace(lr=1e-4, head_lr=1e-2))
    assert [g["lr"] for g in groups] == [1e-4, 1e-2]
    assert sum(p.numel() for p in groups[1]["params"]) == 66
    assert len(param_groups(model, SETTINGS)) == 1                      # head_lr unset: one group


def test_nothing_trainable_is_an_error(tmp_path):
    task = BlobTask()
    model = task.model("full").requires_grad_(False)
    with pytest.raises(LoraError, match="nothing would train"):
        train(model, task, task.data(32, 1), task.data(32, 2), SETTINGS, tmp_path, progress=False)


@pytest.mark.parametrize("bad", [dict(precision="fp16"), dict(lr=0), dict(batch_size=0),
                                 dict(optimizer="lion"), dict(head_lr=-1.0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(LoraError):
        SETTINGS.replace(**bad)
