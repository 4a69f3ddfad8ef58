"""Combine several named adapters into one new adapter (libraries of adapters, LoraHub: Huang et al. 2023).

For one adapted matrix, adapter i contributes D_i = s_i B_i A_i (s_i = alpha_i / r_i, its own rank and
alpha). The combination asked for is the weighted sum

    T = sum_i w_i D_i = sum_i w_i s_i B_i A_i

and each mode stores a new pair (A, B) with scale s whose product s B A approximates T:

    cat     A = [A_1; A_2; ...] (rows), B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] (cols), s = 1.
            Exact: s B A = T, rank sum_i r_i.
    linear  PEFT 0.21's ``add_weighted_adapter(combination_type="linear")``: with c_i = w_i s_i,
            A = sum_i sign(c_i) sqrt|c_i| A_i,  B = sum_i sqrt|c_i| B_i,  s = 1  (all r_i equal).
            B A = T + sum_{i != j} sign(c_j) sqrt|c_i c_j| B_i A_j: the cross terms are not T at all,
            and PEFT does not say so. Kept because LoraHub composes this way.
    svd     T truncated to its top ``rank`` singular directions: B = U_k S_k, A = V_k^T, s = 1.
            Exact when rank >= rank(T) (at most sum_i r_i); default rank = max_i r_i (PEFT's default).
    ties    TIES-merging (Yadav et al. 2023) on the dense w_i D_i: keep each one's top ``density``
            fraction of entries by magnitude, elect a sign per entry (sign of the sum), average the
            entries that agree with it (PEFT's disjoint mean), then SVD to ``rank``.
    dare    DARE (Yu et al. 2023): drop each entry of each D_i with probability p = 1 - density, scale
            the kept ones by 1/(1 - p), sum the w_i D_i, then SVD to ``rank``. Seeded.

The report gives, per adapted module and overall, the exact relative error of what was stored,

    err = ||s B A - T||_F / ||T||_F,     overall: sqrt(sum_m ||E_m||^2) / sqrt(sum_m ||T_m||^2)

computed in float64 from the factors as stored (fp32): cat ~ 1e-8 (the fp32 rounding of the factors),
svd = the truncation error, ties/dare = pruning (+ averaging) + truncation, linear = the cross terms.

Fused q/k/v layers are combined slice by slice; convolution factors are flattened to matrices
(A: (r, in * kernel)). Trained biases (``bias`` != "none") and ``modules_to_save`` heads are not
low-rank deltas; adapters carrying a head are refused (share one frozen head instead, as
``lorakit lorahub`` does). Everything is checked before the new adapter is added.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from lorakit.errors import LoraError
from lorakit.inject import apply_lora, lora_layers
from lorakit.layers import LoraConv, LoraFusedLinear, LoraLayer
from lorakit.plan import plan_lora
from lorakit.state import check_adapter, lora_state

MODES = ("cat", "linear", "svd", "ties", "dare")


def combine_adapters(model: nn.Module, weights: dict[str, float], mode: str = "cat",
                     new_name: str = "combined", rank: int | None = None, density: float = 0.5,
                     seed: int = 0) -> dict:
    """Add adapter ``new_name`` ~ sum_i weights[i] * (adapter i's delta) and return the error report.

    The new adapter is added inactive (``set_adapter(model, new_name)`` to use it). ``rank`` is the
    target rank of svd/ties/dare (cat's is sum_i r_i, linear's r); ``density`` the kept fraction of
    ties/dare; ``seed`` dare's drop mask.
    Returns {"mode", "new_name", "weights", "rank", "rel_error", "modules": {path: {"rank",
    "rel_error", "target_norm", "error_norm"}}}.
    """
    names = _check(model, weights, mode, new_name, rank, density)
    layers = [(path, layer) for path, layer in lora_layers(model) if names[0] in layer.lora]
    gen = torch.Generator().manual_seed(seed)
    built = {}                                         # path -> (A blocks, B blocks, target blocks)
    for path, layer in layers:
        blocks = [_blocks(layer, layer.lora[n]) for n in names]
        coefs = [float(weights[n]) * layer.lora[n].scale for n in names]
        target = sum(c * b @ a for c, (a, b) in zip(coefs, blocks))
        a_new, b_new = _MODE_FN[mode](blocks, coefs, rank, density, gen, names)
        built[path] = (a_new, b_new, target)
    ranks = {path: a.shape[1] for path, (a, _, _) in built.items()}
    base_cfg = lora_state(model).configs[names[0]]
    cfg = replace(base_cfg, r=max(ranks.values()), alpha=float(max(ranks.values())),
                  target_modules=sorted(ranks), rank_pattern={}, alpha_pattern={}, rslora=False,
                  dropout=0.0, bias="none", modules_to_save=None, exclude_modules=None,
                  layers_to_transform=None, layers_pattern=None, init="gaussian")
    planned = {t.name for t in plan_lora(model, cfg).targets}
    if planned != set(ranks):
        raise LoraError(f"the combined adapter's module list would also match "
                        f"{sorted(planned - set(ranks))}; nothing was changed")
    apply_lora(model, cfg, adapter_name=new_name, ranks=ranks)
    return _write_and_report(model, built, names, weights, mode, new_name)


# --- modes: each maps per-adapter blocks to new (A, B) blocks whose product approximates T ---------
# blocks: list over adapters of (A (k, r_i, n), B (k, m, r_i)) in float64; k = fused slices (else 1).
def _cat(blocks, coefs, rank, density, gen, names):
    return (torch.cat([a for a, _ in blocks], dim=1),
            torch.cat([c * b for c, (_, b) in zip(coefs, blocks)], dim=2))


def _linear(blocks, coefs, rank, density, gen, names):
    a = sum(math.copysign(math.sqrt(abs(c)), c) * a for c, (a, _) in zip(coefs, blocks))
    b = sum(math.sqrt(abs(c)) * b for c, (_, b) in zip(coefs, blocks))
    return a, b


def _svd(blocks, coefs, rank, density, gen, names):
    target = sum(c * b @ a for c, (a, b) in zip(coefs, blocks))
    return _truncate(target, rank or max(a.shape[1] for a, _ in blocks))


def _ties(blocks, coefs, rank, density, gen, names):
    deltas = torch.stack([c * b @ a for c, (a, b) in zip(coefs, blocks)])     # (N, k, m, n)
    kept = torch.stack([_keep_top(d, density) for d in deltas])
    sign = torch.sign(kept.sum(dim=0))                                         # elected sign
    agree = (torch.sign(kept) == sign) & (kept != 0)
    merged = (kept * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)         # disjoint mean
    return _truncate(merged, rank or max(a.shape[1] for a, _ in blocks))


def _dare(blocks, coefs, rank, density, gen, names):
    merged = 0
    for c, (a, b) in zip(coefs, blocks):
        delta = c * b @ a
        mask = torch.rand(delta.shape, generator=gen, dtype=torch.float64) < density
        merged = merged + delta * mask / density
    return _truncate(merged, rank or max(a.shape[1] for a, _ in blocks))


_MODE_FN = {"cat": _cat, "linear": _linear, "svd": _svd, "ties": _ties, "dare": _dare}


def _keep_top(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``density`` fraction of largest-|.| entries (ties kept at the threshold)."""
    flat = delta.abs().flatten()
    keep = max(1, int(round(density * flat.numel())))
    threshold = flat.kthvalue(flat.numel() - keep + 1).values
    return delta * (delta.abs() >= threshold)


def _truncate(target: torch.Tensor, rank: int):
    """Best rank-``rank`` factors of each slice (Eckart-Young): A = V_k^T, B = U_k S_k."""
    u, s, vh = torch.linalg.svd(target, full_matrices=False)       # (k, m, q), (k, q), (k, q, n)
    k = min(rank, s.shape[-1])
    return vh[:, :k, :], u[:, :, :k] * s[:, None, :k]


# --- layer layouts ------------------------------------------------------------------------------
def _blocks(layer: LoraLayer, delta) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (k, r, n), B (k, m, r)) in float64 with D_j = B[j] A[j] the delta of slice j (unscaled)."""
    a, b = delta.A.detach().double(), delta.B.detach().double()
    if isinstance(layer, LoraFusedLinear):
        k = len(layer.enabled)
        return a.view(k, delta.r, -1), b.view(k, layer.slice_size, delta.r)
    if isinstance(layer, LoraConv):
        return a.flatten(1)[None], b.flatten(1)[None]
    return a[None], b[None]


def _write_and_report(model, built, names, weights, mode, new_name) -> dict:
    layers = dict(lora_layers(model))
    modules, err_sq, target_sq = {}, 0.0, 0.0
    with torch.no_grad():
        for path, (a_new, b_new, target) in built.items():
            delta = layers[path].lora[new_name]
            delta.A.copy_(a_new.reshape(delta.A.shape))
            delta.B.copy_((b_new / delta.scale).reshape(delta.B.shape))
            a, b = _blocks(layers[path], delta)                      # read back what was stored
            error = (delta.scale * b @ a - target).norm().item()
            norm = target.norm().item()
            modules[path] = {"rank": delta.r, "rel_error": _ratio(error, norm),
                             "target_norm": norm, "error_norm": error}
            err_sq, target_sq = err_sq + error ** 2, target_sq + norm ** 2
    return {"mode": mode, "new_name": new_name, "weights": {n: float(weights[n]) for n in names},
            "rank": max(m["rank"] for m in modules.values()),
            "rel_error": _ratio(math.sqrt(err_sq), math.sqrt(target_sq)), "modules": modules}


def _ratio(error: float, norm: float) -> float | None:
    """error / norm; 0 for an exact zero target, None when the target is 0 but the result is not."""
    if norm > 0:
        return error / norm
    return 0.0 if error == 0 else None


# --- checks (all before anything changes) ---------------------------------------------------------
def _check(model, weights, mode, new_name, rank, density) -> list[str]:
    if mode not in MODES:
        raise LoraError(f"unknown combination mode {mode!r}; supported: {list(MODES)}")
    if not isinstance(weights, dict) or not weights:
        raise LoraError(f"weights must be a non-empty dict {{adapter name: weight}}; got {weights!r}")
    names = list(weights)
    for name in names:
        check_adapter(model, name)
        if not math.isfinite(float(weights[name])):
            raise LoraError(f"weight for {name!r} is {weights[name]!r}; weights must be finite")
    state = lora_state(model)
    if new_name in state.configs:
        raise LoraError(f"adapter {new_name!r} already exists; pass another new_name or delete it")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise LoraError(f"rank={rank!r} must be a positive int (or None for the mode's default)")
    if not 0.0 < density <= 1.0:
        raise LoraError(f"density={density!r} is the kept fraction and must be in (0, 1]")
    heads = {n: state.configs[n].modules_to_save for n in names if state.configs[n].modules_to_save}
    if heads:
        raise LoraError(f"adapters {heads} carry their own trained heads (modules_to_save), which are "
                        "not low-rank deltas and cannot be combined; train them on one shared frozen "
                        "head (as `lorakit lorahub` does)")
    sets = {n: {p for p, layer in lora_layers(model) if n in layer.lora} for n in names}
    first = names[0]
    for name in names[1:]:
        if sets[name] != sets[first]:
            only_a, only_b = sorted(sets[first] - sets[name]), sorted(sets[name] - sets[first])
            raise LoraError(f"adapters {first!r} and {name!r} adapt different modules (only in "
                            f"{first!r}: {only_a[:5]}, only in {name!r}: {only_b[:5]}); combining "
                            "needs the same module set")
    if mode == "linear":
        for path, layer in lora_layers(model):
            ranks = {n: layer.lora[n].r for n in names}
            if first in layer.lora and len(set(ranks.values())) > 1:
                raise LoraError(f"mode 'linear' sums factors, so every adapter needs the same rank; "
                                f"at {path!r} the ranks are {ranks}. Use mode 'cat' (exact) or 'svd'")
    return names
