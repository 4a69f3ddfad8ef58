"""Tasks by CLI name. Each module is imported only when its task is asked for, so one task's data
and model code (numpy, lalsuite waveforms, tokenizers) costs nothing to the others or to the CLI."""

from __future__ import annotations

import importlib

from lorakit.errors import LoraError

TASKS = {
    "data-to-text": "lorakit.tasks.data_to_text:DataToTextTask",
    "gw": "lorakit.tasks.gw:GravitationalWaveTask",
    "mnist-lowrank": "lorakit.tasks.mnist_lowrank:MnistLowRankTask",
    "text-cls": "lorakit.tasks.text_cls:TextClassificationTask",
}


def get_task(name: str):
    if name not in TASKS:
        raise LoraError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
