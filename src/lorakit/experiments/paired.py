"""Step cost of two methods measured side by side, so a comparison survives a shared machine.

``compare`` trains each method in its own process, one after the other; if another job loads the
machine during one of them, their wall times compare different machines. Here both methods are built
in ONE process, exactly as ``lorakit train`` builds them (the task's model, settings, optimizer and,
under bf16, the resident bf16 base), and their optimizer steps on the task's own batches alternate
(A B, B A, ...; ``lorakit.train.timing.interleave``): each pair sees the same load, and the median
of the per-pair ratios t_A / t_B comes with a bootstrap 95% interval.
"""

from __future__ import annotations

import itertools
import os

import torch

from lorakit.tasks import get_task
from lorakit.tasks.base import ModelOptions
from lorakit.train.loop import _optimizer_step, make_optimizer, seed_everything
from lorakit.train.memory import resolve_device
from lorakit.train.precision import resident_base
from lorakit.train.timing import PairedRatio, interleave, load_average


def method_step(task, method: str, train_data, quick: bool, device: torch.device):
    """One optimizer step of ``method`` as ``lorakit train`` runs it, as a closure (and its cleanup)."""
    settings = task.settings(method, quick)
    seed_everything(settings.seed)
    model = task.build_model(method, ModelOptions()).to(device).train()
    optimizer, scheduler = make_optimizer(model, settings)
    resident = resident_base(model, settings.precision)
    resident.__enter__()
    counter = itertools.count()

    def step():
        _optimizer_step(model, task, train_data, settings, optimizer, scheduler, device, next(counter))
    return step, lambda: resident.__exit__(None, None, None)


def paired_step_cost(task_name: str, a: str = "lora", b: str = "full", pairs: int = 16,
                     warmup: int = 2, quick: bool = False, data_dir: str | None = None,
                     device: str = "auto", threads: int | None = None) -> tuple[PairedRatio, int]:
    """(t_a / t_b per optimizer step, interleaved in this process, and the CPU threads used).

    ``threads=None``: torch's own count, or 1 when the machine is already busy (1-minute load average
    at least the number of cores). Busy cores deschedule threads, and with 2+ threads every parallel op
    then waits for the slowest one: measured on 2 shared cores, a LoRA layer's step took 125 ms with 2
    threads and 23.5 ms with 1, and the ratios measured op counts rather than work."""
    task = get_task(task_name)
    dev = resolve_device(device)
    before = torch.get_num_threads()
    if threads is None:
        threads = 1 if dev.type == "cpu" and load_average() >= (os.cpu_count() or 1) else before
    train_data, _ = task.load_data(quick=quick, seed=0, data_dir=data_dir)
    built = {m: method_step(task, m, train_data, quick, dev) for m in (a, b)}
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    torch.set_num_threads(threads)
    try:
        return interleave({m: step for m, (step, _) in built.items()}, pairs=pairs, warmup=warmup,
                          sync=sync), threads
    finally:
        torch.set_num_threads(before)
        for _, done in built.values():
            done()
