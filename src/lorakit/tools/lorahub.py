"""LoraHub (Huang et al. 2023): weights for a library of task adapters from a few examples.

Given N upstream adapters on one model (same modules, one shared frozen head) and k examples of a
new task, find weights w in R^N for the combined adapter sum_i w_i B_i A_i (tools/combine.py) by a
gradient-free search, minimising

    objective(w) = few-shot loss(model with combine_adapters(w)) + l1 * sum_i |w_i|

Two optimizers, the same box [-1.5, 1.5] and penalty:
    "nevergrad"    as LoraHub's code runs it: nevergrad's NGOpt over w started at 0, budget
                   ``max_evals`` (LoraHub: 40), seeded by ``seed``. NGOpt chooses the algorithm from
                   the dimension and budget; nevergrad 1.0 chooses COBYLA for 5-20 weights and 40
                   evaluations (the paper names CMA-ES); the report records the choice
    "nelder-mead"  scipy's bounded Nelder-Mead started from the uniform weights 1/N (the simplex's
                   other vertices step +0.5 along each axis)
Only forward passes are needed, so the search costs ``max_evals`` few-shot evaluations.

LoraHub combines by summing A's and B's (PEFT's ``linear``, with its cross terms); ``mode="cat"``
composes exactly. The best combination is left on the model as adapter ``new_name``, active.
"""

from __future__ import annotations

import math
import time
import warnings

import torch
from torch import nn

from lorakit.adapters import active_adapters, delete_adapter, set_adapter
from lorakit.errors import LoraError
from lorakit.state import check_adapter
from lorakit.tools.combine import combine_adapters

TRIAL = "_lorahub_trial"


def lorahub(model: nn.Module, adapter_names: list[str], examples, loss_fn, mode: str = "cat",
            l1: float = 0.05, max_evals: int = 60, bounds: tuple[float, float] = (-1.5, 1.5),
            new_name: str = "lorahub", optimizer: str = "nelder-mead",
            seed: int = 0) -> tuple[dict[str, float], dict]:
    """Search the combination weights; return ({name: weight}, report).

    ``loss_fn(model, examples) -> float`` is the few-shot loss with the model as it is (called under
    the combined adapter, in eval mode, without gradients; it should not change the model).
    report: {"mode", "l1", "optimizer", "evaluations", "seconds", "start": {"weights", "loss",
    "objective"} (the first point tried: uniform for nelder-mead, 0 for nevergrad), "uniform" (the
    same, nelder-mead only), "best": {...}, "history": [{"weights", "loss", "objective"}],
    "combine_rel_error"}.
    """
    import numpy as np                      # deferred: heavy optional dependency
    from scipy.optimize import minimize     # deferred: heavy optional dependency

    names = list(adapter_names)
    if len(names) < 2:
        raise LoraError(f"LoraHub combines a library of adapters; got {names}, give at least two")
    for name in names:
        check_adapter(model, name)
    if not (math.isfinite(l1) and l1 >= 0):
        raise LoraError(f"l1={l1!r} must be a finite non-negative penalty weight, e.g. 0.05")
    if optimizer not in ("nelder-mead", "nevergrad"):
        raise LoraError(f"optimizer={optimizer!r}; choose 'nevergrad' (LoraHub's) or 'nelder-mead'")
    if optimizer == "nelder-mead" and max_evals < len(names) + 1:
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
    was_training = model.training
    model.eval()
    try:
        chosen = None
        if optimizer == "nevergrad":
            chosen = _nevergrad(objective, len(names), bounds, max_evals, seed)
        else:
            x0 = np.full(len(names), 1.0 / len(names))
            simplex = np.vstack([x0] + [x0 + 0.5 * np.eye(len(names))[i] for i in range(len(names))])
            minimize(objective, x0, method="Nelder-Mead", bounds=[bounds] * len(names),
                     options={"maxfev": max_evals, "initial_simplex": np.clip(simplex, *bounds),
                              "xatol": 1e-3, "fatol": 1e-4})
    finally:
        set_adapter(model, previous)
        model.train(was_training)
    best = min(history, key=lambda h: h["objective"])
    report = combine_adapters(model, best["weights"], mode=mode, new_name=new_name)
    set_adapter(model, new_name)
    first = history[0]                                   # x0 is evaluated first
    return best["weights"], {"mode": mode, "l1": l1, "bounds": list(bounds), "optimizer": optimizer,
                             "algorithm": chosen or "Nelder-Mead", "evaluations": len(history), "start": first,
                             "uniform": first if optimizer == "nelder-mead" else None,
                             "seconds": time.perf_counter() - start,
                             "best": best, "history": history,
                             "combine_rel_error": report["rel_error"]}


def _nevergrad(objective, n: int, bounds: tuple[float, float], budget: int, seed: int) -> str:
    """LoraHub's search: NGOpt on an n-vector in the box, started at 0, ``budget`` evaluations.
    Returns the name of the algorithm NGOpt chose."""
    import nevergrad as ng           # deferred: heavy optional dependency
    import numpy as np               # deferred: heavy optional dependency
    lo, hi = bounds
    param = ng.p.Array(init=np.zeros(n), lower=np.full(n, lo), upper=np.full(n, hi))
    param.random_state = np.random.RandomState(seed)
    search = ng.optimizers.NGOpt(parametrization=param, budget=budget)
    with warnings.catch_warnings():
        # nevergrad hands COBYLA a final trust radius scipy resets (and says so on every search)
        warnings.filterwarnings("ignore", message=".*RHOEND", category=UserWarning)
        search.minimize(objective)
    chosen = getattr(search, "optim", None)
    return type(chosen).__name__ if chosen is not None else type(search).__name__


def evaluate(model: nn.Module, weights: dict[str, float], mode: str, examples, loss_fn) -> float:
    """loss_fn with the combination ``weights`` as the only active adapter (removed afterwards)."""
    previous = active_adapters(model)
    combine_adapters(model, weights, mode=mode, new_name=TRIAL)
    try:
        set_adapter(model, TRIAL)
        with torch.no_grad():
            return float(loss_fn(model, examples))
    finally:
        set_adapter(model, previous)
        delete_adapter(model, TRIAL)
