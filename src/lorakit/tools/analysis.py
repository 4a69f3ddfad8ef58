"""What a trained adapter learnt: the LoRA paper's section 7 analyses, from an adapter folder.

For each adapted matrix the update is dW = s B A (m x n, nn.Linear layout: out x in; a fused q/k/v
module gives one matrix per enabled slice; a convolution's A is flattened to (r, in * kernel)).

Singular values and effective rank of dW (sigma_1 >= sigma_2 >= ...):
    numerical rank   #{sigma_i > sigma_1 * max(m, n) * eps_fp32}   (the factors are stored in fp32)
    energy_90        smallest k with sum_{i<=k} sigma_i^2 >= 0.9 sum_i sigma_i^2
    entropy          Roy & Vetterli (2007): exp(-sum_i p_i log p_i), p_i = sigma_i / sum_j sigma_j;
                     equals k for k equal non-zero singular values, and is < k otherwise.

Subspace similarity of two adapters (paper eq. in section 7.2, Figure 3): with U_1 (n, r1) and U_2
(n, r2) the right-singular vectors of A_1 (r1, n) and A_2 (r2, n), ordered by singular value,

    phi(A_1, A_2, i, j) = ||U_1[:, :i]^T U_2[:, :j]||_F^2 / min(i, j)  in [0, 1],  i <= r1, j <= r2.

1 means one subspace contains the other; for independent random subspaces E[phi] = max(i, j) / n.
A starts random, so phi only means something once A has moved away from its init. For the gaussian
init (entries N(0, 1/r^2)) the singular values of an untrained A lie below the Marchenko-Pastur edge
(sqrt(n) + sqrt(r)) / r (up to finite-size fluctuations of a few %: 2.92 vs 2.80 seen untrained
at n = 384, r = 8); ``A_learned_directions`` counts those above 1.1 x the edge.

Amplification (paper section 7.3, Table 7), with W the frozen base weight in the same layout and r the
adapter's rank: for orthonormal U (m, r), V (n, r), ||U^T W V||_F is how much of W lies in the span;
    directions of dW      U, V = top-r left/right singular vectors of dW
    directions of W       U, V = top-r singular vectors of W   (= sqrt(sum of W's top r sigma^2))
    random directions     U, V = random orthonormal (seeded)
    amplification = ||dW||_F / ||U_dW^T W V_dW||_F
The paper (GPT-3 175B, layer 48, W_q) found ||U^T W V|| = 0.32 in dW's directions vs 21.67 in W's
and 0.02 random, ||dW||_F = 6.91: amplification 21.5 for r = 4 (and 3.57 / 1.90 = 1.9 for r = 64).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from lorakit.errors import LoraError
from lorakit.io import read_adapter

ENERGY = 0.9
INIT_EDGE_MARGIN = 1.1        # above the random init's largest singular value, with fluctuations
_FACTOR_KEY = re.compile(r"^(?P<path>.+)\.(?:lora_A\.weight|lora_embedding_A)$")


# --- the adapter as matrices ------------------------------------------------------------------------
def adapter_matrices(adapter_dir) -> dict[str, dict]:
    """{name: {"A": (r, n), "B": (m, r), "scale": s, "module": path, "rows": slice|None}} in float64.

    ``name`` is the module path, with ``[i]`` appended for slice i of a fused module.
    """
    cfg, tensors, meta = read_adapter(adapter_dir)
    fused = meta.get("fused_slices", {})
    gaussian = meta.get("init", cfg.init) == "gaussian"
    out = {}
    for key in sorted(tensors):
        found = _FACTOR_KEY.match(key)
        if not found:
            continue
        path = found["path"]
        embedding = key.endswith("lora_embedding_A")
        a = tensors[key].double().flatten(1)
        b = tensors[f"{path}.lora_embedding_B" if embedding else f"{path}.lora_B.weight"].double()
        b = b.flatten(1)
        r = b.shape[1]
        scale = cfg.alpha_for(path) / (math.sqrt(r) if cfg.rslora else r)
        if path in fused:
            enabled = [i for i, on in enumerate(fused[path]) if on]
            d = b.shape[0] // len(enabled)
            for j, i in enumerate(enabled):
                out[f"{path}[{i}]"] = {"A": a[j * r:(j + 1) * r], "B": b[j * d:(j + 1) * d],
                                       "scale": scale, "module": path, "rows": (i * d, (i + 1) * d),
                                       "gaussian_init": gaussian}
        else:
            # an embedding's A starts at zero (B is the random one), so no init edge applies
            out[path] = {"A": a, "B": b, "scale": scale, "module": path, "rows": None,
                         "gaussian_init": gaussian and not embedding}
    if not out:
        raise LoraError(f"{adapter_dir} holds no LoRA factors (lora_A/lora_B); is it a LoRA adapter?")
    return out


def delta(m: dict) -> torch.Tensor:
    return m["scale"] * m["B"] @ m["A"]


# --- the measures ---------------------------------------------------------------------------------
def effective_ranks(sigma: torch.Tensor, shape: tuple[int, int]) -> dict:
    """Numerical, 90%-energy and entropy (Roy & Vetterli) effective ranks from singular values."""
    sigma = sigma.double()
    if sigma.numel() == 0 or sigma[0] <= 0:
        return {"numerical": 0, "energy_90": 0, "entropy": 0.0}
    numerical = int((sigma > sigma[0] * max(shape) * torch.finfo(torch.float32).eps).sum())
    energy = torch.cumsum(sigma.square(), 0) / sigma.square().sum()
    energy_90 = int((energy < ENERGY - 1e-12).sum()) + 1
    p = sigma[sigma > 0] / sigma.sum()
    return {"numerical": numerical, "energy_90": energy_90,
            "entropy": float(torch.exp(-(p * p.log()).sum()))}


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """phi[i-1, j-1] = phi(A_1, A_2, i, j) for i <= r1, j <= r2 (module doc), shape (r1, r2)."""
    if a1.shape[1] != a2.shape[1]:
        raise LoraError(f"A factors act on different input sizes ({a1.shape[1]} vs {a2.shape[1]}); "
                        "compare adapters of the same base model")
    v1 = torch.linalg.svd(a1.double(), full_matrices=False)[2].T          # (n, r1), by singular value
    v2 = torch.linalg.svd(a2.double(), full_matrices=False)[2].T
    overlap = (v1.T @ v2).square()                                          # (r1, r2)
    cumulative = overlap.cumsum(0).cumsum(1)                                # sum over [:i, :j]
    i = torch.arange(1, overlap.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, overlap.shape[1] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(i, j)


def amplification(dw: torch.Tensor, w: torch.Tensor, r: int, seed: int = 0) -> dict:
    """Table 7's columns for one matrix: ||U^T W V||_F in dW's, W's and random top-r directions."""
    dw, w = dw.double(), w.double()
    if dw.shape != w.shape:
        raise LoraError(f"dW {tuple(dw.shape)} and the base weight {tuple(w.shape)} differ in shape; "
                        "is --base the model the adapter was trained on?")
    r = min(r, *w.shape)
    u, _, vh = torch.linalg.svd(dw, full_matrices=False)
    uw, sw, vhw = torch.linalg.svd(w, full_matrices=False)
    gen = torch.Generator().manual_seed(seed)
    ur = torch.linalg.qr(torch.randn(w.shape[0], r, generator=gen, dtype=torch.float64))[0]
    vr = torch.linalg.qr(torch.randn(w.shape[1], r, generator=gen, dtype=torch.float64))[0]
    along_dw = (u[:, :r].T @ w @ vh[:r].T).norm().item()
    dw_norm = dw.norm().item()
    return {"r": r, "dW_norm": dw_norm, "W_norm": w.norm().item(),
            "proj_dW_dirs": along_dw,
            "proj_W_dirs": (uw[:, :r].T @ w @ vhw[:r].T).norm().item(),
            "proj_random_dirs": (ur.T @ w @ vr).norm().item(),
            "amplification": dw_norm / along_dw if along_dw > 0 else None}


# --- base weights in dW's layout --------------------------------------------------------------------
def base_matrix(base: nn.Module, m: dict) -> torch.Tensor:
    """The frozen weight of ``m``'s module as an (out, in) matrix, sliced like ``m`` if fused."""
    module = find_module(base, m["module"])
    w = module.weight.detach().double()
    module = module.__dict__.get("base_layer", module)        # a LoRA layer: what it wraps
    if isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D":
        w = w.T                       # Embedding (num, dim) and GPT-2 Conv1D (in, out) store it turned
    w = w.flatten(1)
    if m["rows"] is not None:
        w = w[m["rows"][0]:m["rows"][1]]
    return w


def find_module(base: nn.Module, path: str) -> nn.Module:
    """``path`` in ``base``, or the one module whose name ends with it or whose path ends with the
    module's name (adapters saved on a head model name ``bert.encoder...``, a bare encoder
    ``encoder...``)."""
    modules = dict(base.named_modules())
    if path in modules:
        return modules[path]
    found = [n for n in modules if n and (n.endswith("." + path) or path.endswith("." + n))
             and hasattr(modules[n], "weight")]
    if len(found) != 1:
        raise LoraError(f"the base model has {'no' if not found else len(found)} module matching "
                        f"adapter module {path!r}; is --base the model the adapter was trained on?")
    return modules[found[0]]


# --- everything for one adapter ---------------------------------------------------------------------
def analyze(adapter_dir, other_dir=None, base: nn.Module | None = None, seed: int = 0) -> dict:
    """The ``analysis.json`` dict: per matrix spectra and ranks; phi with ``other_dir``; Table 7 with
    ``base``. Phi matrices are returned under ``"phi"`` (tensors, not saved in the JSON)."""
    mats = adapter_matrices(adapter_dir)
    others = adapter_matrices(other_dir) if other_dir is not None else {}
    result = {"adapter": str(adapter_dir), "other": str(other_dir) if other_dir else None,
              "definitions": DEFINITIONS, "modules": {}, "phi": {}}
    for name, m in mats.items():
        dw = delta(m)
        sigma = torch.linalg.svdvals(dw)[:m["A"].shape[0]]
        entry = {"shape": list(dw.shape), "r": m["A"].shape[0],
                 "singular_values": [float(s) for s in sigma],
                 "effective_rank": effective_ranks(sigma, tuple(dw.shape))}
        if m["gaussian_init"]:
            r, n = m["A"].shape
            sigma_a = torch.linalg.svdvals(m["A"])
            entry["A_init_edge"] = (math.sqrt(n) + math.sqrt(r)) / r
            edge = INIT_EDGE_MARGIN * entry["A_init_edge"]
            entry["A_learned_directions"] = int((sigma_a > edge).sum())
        if name in others:
            phi = subspace_similarity(m["A"], others[name]["A"])
            result["phi"][name] = phi
            n = m["A"].shape[1]
            entry["phi"] = {"r_other": phi.shape[1], "phi_1_1": float(phi[0, 0]),
                            "phi_r_r": float(phi[-1, min(phi.shape) - 1]),
                            "random_1_1": 1.0 / n,
                            "random_r_r": phi.shape[0] / n}
        if base is not None:
            entry["amplification"] = amplification(dw, base_matrix(base, m), m["A"].shape[0], seed)
        result["modules"][name] = entry
    if other_dir is not None and not result["phi"]:
        raise LoraError(f"{adapter_dir} and {other_dir} share no adapted module; compare two adapters "
                        "on the same modules")
    result["summary"] = summarize(result["modules"])
    return result


def summarize(modules: dict) -> dict:
    """Means over matrices, grouped by the module's last name part (query, value, ...)."""
    groups: dict[str, list[dict]] = {}
    for name, entry in modules.items():
        groups.setdefault(re.sub(r"\[\d+\]$", "", name).split(".")[-1], []).append(entry)
    out = {}
    for kind, entries in groups.items():
        row = {"count": len(entries), "r": entries[0]["r"]}
        for key in ("numerical", "energy_90", "entropy"):
            row[f"mean_{key}_rank"] = _mean(e["effective_rank"][key] for e in entries)
        if all("A_learned_directions" in e for e in entries):
            row["mean_A_learned_directions"] = _mean(e["A_learned_directions"] for e in entries)
        if all("phi" in e for e in entries):
            row["mean_phi_1_1"] = _mean(e["phi"]["phi_1_1"] for e in entries)
            row["mean_phi_r_r"] = _mean(e["phi"]["phi_r_r"] for e in entries)
        if all("amplification" in e for e in entries):
            for key in ("dW_norm", "W_norm", "proj_dW_dirs", "proj_W_dirs", "proj_random_dirs",
                        "amplification"):
                row[f"mean_{key}"] = _mean(e["amplification"][key] for e in entries)
        out[kind] = row
    return out


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)


DEFINITIONS = {
    "dW": "s * B @ A (out x in), s = alpha / r (alpha / sqrt(r) with rslora)",
    "numerical_rank": "#{sigma_i > sigma_1 * max(m, n) * eps_fp32}",
    "energy_90_rank": "smallest k with sum_{i<=k} sigma_i^2 >= 0.9 * sum sigma_i^2",
    "entropy_rank": "Roy & Vetterli 2007: exp(-sum p_i log p_i), p_i = sigma_i / sum sigma_j",
    "phi": "||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), U = right-singular vectors of A",
    "phi_r_r": "phi(r1, min(r1, r2)); random subspaces give about max(i, j) / n",
    "amplification": "||dW||_F / ||U^T W V||_F, U, V = dW's top-r singular vectors (paper Table 7)",
    "A_learned_directions": "#{singular values of A > 1.1 (sqrt(n) + sqrt(r)) / r}: above the edge "
                            "of the gaussian init's spectrum, directions A learnt",
}
