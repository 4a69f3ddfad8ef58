"""LoraHub (Huang et al. 2023, seed 002): weights for a library of task adapters from a few examples.

Given N upstream adapters on one model (same modules, one shared frozen head) and k examples of a
new task, find weights w in R^N for the combined adapter sum_i w_i B_i A_i (lorakit.combine) by a
gradient-free search, minimising

    objective(w) = few-shot loss(model with combine_adapters(w)) + l1 * sum_i |w_i|

LoraHub uses nevergrad's NGOpt/CMA with w in [-1.5, 1.5], l1 = 0.05 and about 40 steps; here
scipy's bounded Nelder-Mead (a maintained, already-installed optimizer) with the same box and
penalty, started from the uniform weights 1/N (the simplex's other vertices step +0.5 along each
axis). Only forward passes are needed, so the search costs ``max_evals`` few-shot evaluations.

LoraHub combines by summing A's and B's (PEFT's ``linear``, with its cross terms); ``mode="cat"``
composes exactly. The best combination is left on the model as adapter ``new_name``, active.
"""

from __future__ import annotations

import math
import time

import numpy as np
from torch import nn

from lorakit.adapters import active_adapters, delete_adapter, set_adapter
from lorakit.combine import combine_adapters
from lorakit.errors import LoraError
from lorakit.state import check_adapter

TRIAL = "_lorahub_trial"


def lorahub(model: nn.Module, adapter_names: list[str], examples, loss_fn, mode: str = "cat",
            l1: float = 0.05, max_evals: int = 60, bounds: tuple[float, float] = (-1.5, 1.5),
            new_name: str = "lorahub") -> tuple[dict[str, float], dict]:
    """Search the combination weights; return ({name: weight}, report).

    ``loss_fn(model, examples) -> float`` is the few-shot loss with the model as it is (called under
    the combined adapter, in eval mode, without gradients; it should not change the model).
    report: {"mode", "l1", "evaluations", "seconds", "uniform": {"weights", "loss", "objective"},
    "best": {...}, "history": [{"weights", "loss", "objective"}], "combine_rel_error"}.
    """
    from scipy.optimize import minimize

    names = list(adapter_names)
    if len(names) < 2:
        raise LoraError(f"LoraHub combines a library of adapters; got {names}, give at least two")
    for name in names:
        check_adapter(model, name)
    if not (math.isfinite(l1) and l1 >= 0):
        raise LoraError(f"l1={l1!r} must be a finite non-negative penalty weight, e.g. 0.05")
    if max_evals < len(names) + 1:
        raise LoraError(f"max_evals={max_evals} cannot even build the first simplex of "
                        f"{len(names) + 1} points; use at least {len(names) + 1}")
    previous = active_adapters(model)
    history: list[dict] = []

    def objective(x: np.ndarray) -> float:
        weights = {n: float(v) for n, v in zip(names, x)}
        loss = evaluate(model, weights, mode, examples, loss_fn)
        value = loss + l1 * float(np.abs(x).sum())
        history.append({"weights": weights, "loss": loss, "objective": value})
        return value

    start = time.perf_counter()
    x0 = np.full(len(names), 1.0 / len(names))
    simplex = np.vstack([x0] + [x0 + 0.5 * np.eye(len(names))[i] for i in range(len(names))])
    was_training = model.training
    model.eval()
    try:
        minimize(objective, x0, method="Nelder-Mead", bounds=[bounds] * len(names),
                 options={"maxfev": max_evals, "initial_simplex": np.clip(simplex, *bounds),
                          "xatol": 1e-3, "fatol": 1e-4})
    finally:
        set_adapter(model, previous)
        model.train(was_training)
    best = min(history, key=lambda h: h["objective"])
    report = combine_adapters(model, best["weights"], mode=mode, new_name=new_name)
    set_adapter(model, new_name)
    uniform = history[0]                                 # x0 is evaluated first
    return best["weights"], {"mode": mode, "l1": l1, "bounds": list(bounds),
                             "evaluations": len(history),
                             "seconds": time.perf_counter() - start,
                             "uniform": uniform, "best": best, "history": history,
                             "combine_rel_error": report["rel_error"]}


def evaluate(model: nn.Module, weights: dict[str, float], mode: str, examples, loss_fn) -> float:
    """loss_fn with the combination ``weights`` as the only active adapter (removed afterwards)."""
    import torch

    previous = active_adapters(model)
    combine_adapters(model, weights, mode=mode, new_name=TRIAL)
    try:
        set_adapter(model, TRIAL)
        with torch.no_grad():
            return float(loss_fn(model, examples))
    finally:
        set_adapter(model, previous)
        delete_adapter(model, TRIAL)
