"""``adalora`` (Zhang et al. 2023): LoRA in SVD form whose rank budget moves to where it matters.

Each target W (out x in) gets, exactly as PEFT 0.21's ``SVDLinear``,

    h = W0 x + b + (x A^T * E^T) B^T * alpha / (ranknum + 1e-5)
    A: (r0, in) right "singular vectors", E: (r0, 1) singular values, B: (out, r0) left ones
    ranknum = r0 (the initial rank; it is not changed by masking)

with E = 0, A, B ~ N(0, 0.02^2) at init, so the model starts at the base. Trainable: r0 (in + out) + r0 per
matrix. Training (``AdaLoraHooks``) follows the paper and PEFT's RankAllocator:

    loss += w * mean over all A, B of ||P P^T - I||_F  (A A^T, B^T B: near-orthogonal factors; w = 0.5)
    I = |p * grad|                          per entry of A, E, B, after each optimizer step
    Ibar <- b1 Ibar + (1 - b1) I            sensitivity, smoothed      (b1 = b2 = 0.85)
    U    <- b2 U + (1 - b2) |I - Ibar|      its uncertainty
    score(triplet i) = S(E_i) + mean_j S(A_ij) + mean_j S(B_ji),   S = Ibar * U
    budget(t) = b0 for t <= tinit; b_T + (b0 - b_T) (1 - (t - tinit) / (T - tfinal - tinit))^3 until
                T - tfinal; then b_T  (b0 = r0 * #matrices, b_T = target_r * #matrices)
    every deltaT steps: E_i <- 0 for the (b0 - budget) lowest-scoring triplets over all matrices;
    from T - tfinal on the mask is frozen and re-applied after every step.

Defaults: r0 = ceil(1.5 r), target_r = r (``spec.r``), T = the run's max_steps, tinit = 10% and tfinal =
20% of T, deltaT = max(1, T // 50); each can be set in ``AdaptSpec.extra`` (``adalora_init_r``,
``adalora_tinit``, ``adalora_tfinal``, ``adalora_delta_t``, ``adalora_orth_reg_weight``).

Files: PEFT's ADALORA format (``model.method_io``): ``adapter_config.json`` (peft_type "ADALORA",
init_r, target_r, ..., rank_pattern {"<path>.lora_E": [kept?] * r0}) and ``adapter_model.safetensors``
with ``base_model.model.<path>.lora_A|lora_E|lora_B`` holding only the kept triplets, plus the head.
PEFT's ``PeftModel.from_pretrained`` loads it with the same outputs, and ``load_adalora`` loads PEFT's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.io import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from lorakit.module_paths import replace_module
from lorakit.plan import plan_lora
from lorakit.methods.hooks import TrainHooks
from lorakit.methods.method_files import write_folder

KINDS = ("linear", "conv1d-gpt2")


class SVDLinear(nn.Module):
    """A linear layer plus B (A * E) * alpha / (ranknum + 1e-5). Owns the base ``weight``/``bias``."""

    def __init__(self, base: nn.Module, r: int, alpha: float, ranknum: int, fan_in_fan_out: bool,
                 dropout: float = 0.0):
        super().__init__()
        self.__dict__["base_layer"] = base                 # unregistered: its parameters are ours
        self.weight = base.weight
        self.register_parameter("bias", getattr(base, "bias", None))
        self.fan_in_fan_out = fan_in_fan_out
        out_f, in_f = self.weight.shape[::-1] if fan_in_fan_out else self.weight.shape
        self.lora_A = nn.Parameter(torch.randn(r, in_f) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1))
        self.lora_B = nn.Parameter(torch.randn(out_f, r) * 0.02)
        self.alpha, self.ranknum = float(alpha), int(ranknum)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank_mask = torch.ones(r, dtype=torch.bool)  # kept triplets (the file's rank_pattern)

    @property
    def scale(self) -> float:
        return self.alpha / (self.ranknum + 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.t() if self.fan_in_fan_out else self.weight
        out = F.linear(x, weight, self.bias)
        h = self.dropout(x).to(self.lora_A.dtype)
        return out + ((h @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scale).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        dw = self.lora_B.detach() @ (self.lora_A.detach() * self.lora_E.detach()) * self.scale
        return dw.t() if self.fan_in_fan_out else dw

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]} (kept {int(self.rank_mask.sum())}), ranknum={self.ranknum}"


def svd_layers(model: nn.Module) -> list[tuple[str, SVDLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SVDLinear)]




# --- the method ---------------------------------------------------------------------------------------
def apply_adalora(model: nn.Module, spec) -> nn.Module:
    init_r = int(spec.extra.get("adalora_init_r", math.ceil(1.5 * spec.r)))
    if init_r < spec.r:
        raise LoraError(f"adalora_init_r={init_r} is below the target rank r={spec.r}; AdaLoRA prunes "
                        "from init_r down to r, so init_r >= r")
    targets = plan_lora(model, LoraConfig(r=spec.r, target_modules=spec.lora_targets)).targets
    bad = [f"{t.name} ({t.kind})" for t in targets if t.kind not in KINDS]
    if bad:
        raise LoraError(f"adalora adapts Linear / GPT-2 Conv1D layers only; not {bad}")
    model.requires_grad_(False)
    for t in targets:
        replace_module(model, t.name, SVDLinear(t.module, init_r, spec.alpha, init_r,
                                          t.kind == "conv1d-gpt2", spec.dropout).to(t.module.weight.device))
    for name in spec.head:
        model.get_submodule(name).requires_grad_(True)
    model.train_hooks = AdaLoraHooks(model, spec.r, spec.extra)
    model.method_io = ADALORA_IO
    model.adalora_config = {"init_r": init_r, "target_r": spec.r, "lora_alpha": spec.alpha,
                            "lora_dropout": spec.dropout, "modules_to_save": list(spec.head) or None}
    return model


class AdaLoraHooks(TrainHooks):
    """Orthogonality regulariser (after_backward), importance + budget masking (after_step)."""

    def __init__(self, model: nn.Module, target_r: int, extra: dict):
        self.layers = svd_layers(model)
        self.extra, self.target_r = extra, target_r
        self.beta1 = self.beta2 = 0.85
        self.orth_reg_weight = float(extra.get("adalora_orth_reg_weight", 0.5))
        self.init_bgt = sum(l.lora_A.shape[0] for _, l in self.layers)
        self.target_bgt = target_r * len(self.layers)
        self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        self.schedule(int(extra.get("adalora_total_step", 0)) or None)

    def schedule(self, total: int | None) -> None:
        self.total = total
        if total is None:
            return
        self.tinit = int(self.extra.get("adalora_tinit", round(0.1 * total)))
        self.tfinal = int(self.extra.get("adalora_tfinal", round(0.2 * total)))
        self.delta_t = int(self.extra.get("adalora_delta_t", max(1, total // 50)))
        if not 0 <= self.tinit < total - self.tfinal or self.delta_t < 1:
            raise LoraError(f"adalora schedule tinit={self.tinit}, tfinal={self.tfinal}, deltaT="
                            f"{self.delta_t} leaves no budgeting phase in {total} steps; need "
                            "0 <= tinit < total - tfinal and deltaT >= 1")

    def param_groups(self, model, settings, groups):
        if self.total is None:
            self.schedule(settings.max_steps)
        return groups

    def after_backward(self, step: int, model: nn.Module) -> None:
        """Add the gradient of w * mean ||P P^T - I||_F over all A (A A^T) and B (B^T B)."""
        if not self.orth_reg_weight:
            return
        with torch.enable_grad():
            terms = []
            for _, layer in self.layers:
                for cov in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
                    terms.append(torch.linalg.norm(cov - torch.eye(len(cov), device=cov.device)))
            (self.orth_reg_weight * torch.stack(terms).mean()).backward()

    def after_step(self, step: int, model: nn.Module, optimizer) -> None:
        final = self.total - self.tfinal
        if step < final:
            self.update_importance()
            budget, mask_now = self.budget(step)
            if mask_now:
                self.mask_to_budget(budget)
        elif step == final:
            self.mask_to_budget(self.target_bgt)
            self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        else:
            self.apply_masks()

    def budget(self, step: int) -> tuple[int, bool]:
        if step <= self.tinit:
            return self.init_bgt, False
        if step > self.total - self.tfinal:
            return self.target_bgt, True
        left = 1 - (step - self.tinit) / (self.total - self.tfinal - self.tinit)
        return int((self.init_bgt - self.target_bgt) * left ** 3 + self.target_bgt), \
            step % self.delta_t == 0

    def update_importance(self) -> None:
        with torch.no_grad():
            for name, layer in self.layers:
                for part in ("lora_A", "lora_E", "lora_B"):
                    p, key = getattr(layer, part), f"{name}.{part}"
                    if p.grad is None:
                        continue
                    ipt = (p * p.grad).abs()
                    avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
                    unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
                    avg = self.beta1 * avg + (1 - self.beta1) * ipt
                    self.exp_avg_ipt[key] = avg
                    self.exp_avg_unc[key] = self.beta2 * unc + (1 - self.beta2) * (ipt - avg).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """score_i = S(E_i) + mean_j S(A_ij) + mean_j S(B_ji), S = Ibar * U; shape (r0,) per layer."""
        def s(key):
            return self.exp_avg_ipt[key] * self.exp_avg_unc[key]
        return {n: s(f"{n}.lora_E").view(-1) + s(f"{n}.lora_A").mean(dim=1) + s(f"{n}.lora_B").mean(dim=0)
                for n, _ in self.layers if f"{n}.lora_E" in self.exp_avg_ipt}

    def mask_to_budget(self, budget: int) -> None:
        scores = self.triplet_scores()
        if budget >= self.init_bgt or len(scores) < len(self.layers):
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), self.init_bgt - budget)[0]
        for name, layer in self.layers:
            layer.rank_mask = (scores[name] > threshold).cpu()
        self.apply_masks()

    def apply_masks(self) -> None:
        with torch.no_grad():
            for _, layer in self.layers:
                layer.lora_E.masked_fill_(~layer.rank_mask.to(layer.lora_E.device)[:, None], 0.0)

    def state_dict(self) -> dict:
        return {"exp_avg_ipt": dict(self.exp_avg_ipt), "exp_avg_unc": dict(self.exp_avg_unc),
                "masks": {n: l.rank_mask for n, l in self.layers}, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.exp_avg_ipt, self.exp_avg_unc = dict(state["exp_avg_ipt"]), dict(state["exp_avg_unc"])
        for name, layer in self.layers:
            layer.rank_mask = state["masks"][name].bool()
        self.schedule(state["total"])


# --- files: PEFT's ADALORA format -------------------------------------------------------------------------
def save_adalora(model: nn.Module, folder: str | os.PathLike) -> Path:
    cfg, hooks = model.adalora_config, model.train_hooks
    layers = svd_layers(model)
    tensors, pattern = {}, {}
    for name, layer in layers:
        keep = layer.rank_mask.to(layer.lora_A.device)
        if not keep.all():
            pattern[f"{name}.lora_E"] = keep.tolist()
        tensors[f"{name}.lora_A"] = layer.lora_A[keep]
        tensors[f"{name}.lora_E"] = layer.lora_E[keep]
        tensors[f"{name}.lora_B"] = layer.lora_B[:, keep]
    for head in cfg["modules_to_save"] or []:
        for pname, p in model.get_submodule(head).named_parameters():
            tensors[f"{head}.{pname}"] = p
    total = hooks.total or 1000
    config = {"peft_type": "ADALORA", "task_type": None, "base_model_name_or_path": None,
              "inference_mode": True, "target_modules": [n for n, _ in layers], "r": 8,
              "init_r": cfg["init_r"], "target_r": cfg["target_r"], "lora_alpha": cfg["lora_alpha"],
              "lora_dropout": cfg["lora_dropout"], "bias": "none",
              "fan_in_fan_out": any(l.fan_in_fan_out for _, l in layers),
              "modules_to_save": cfg["modules_to_save"], "init_lora_weights": True,
              "total_step": total, "tinit": getattr(hooks, "tinit", 0),
              "tfinal": getattr(hooks, "tfinal", 0), "deltaT": getattr(hooks, "delta_t", 1),
              "beta1": hooks.beta1, "beta2": hooks.beta2, "orth_reg_weight": hooks.orth_reg_weight,
              "rank_pattern": pattern or None}
    return write_folder(folder, {PREFIX + k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                        config)


def load_adalora(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Load an ADALORA adapter (lorakit's or PEFT's) onto a base model, for inference. Checks first."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / CONFIG_NAME).read_text())
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as handle:
            tensors = {k.removeprefix(PREFIX): handle.get_tensor(k) for k in handle.keys()}
    except (OSError, ValueError) as err:
        raise LoraError(f"{folder} is not a readable AdaLoRA adapter ({err})") from None
    if cfg.get("peft_type") != "ADALORA":
        raise LoraError(f"{folder} holds peft_type={cfg.get('peft_type')!r}, not 'ADALORA'; use "
                        "lorakit.load_adapter for LoRA files")
    paths = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".lora_E")})
    modules = dict(model.named_modules())
    plan = {}
    for path in paths:
        module = modules.get(path)
        a, e, b = (tensors.get(f"{path}.{p}") for p in ("lora_A", "lora_E", "lora_B"))
        if module is None or not hasattr(module, "weight") or a is None or b is None:
            raise LoraError(f"{folder}: {path!r} is missing in the model or in the file; the adapter was "
                            "saved for another base model")
        fan_in_fan_out = type(module).__name__ == "Conv1D"
        out_f, in_f = module.weight.shape[::-1] if fan_in_fan_out else module.weight.shape
        if a.shape != (e.shape[0], in_f) or b.shape != (out_f, e.shape[0]):
            raise LoraError(f"{folder}: {path} factors A{tuple(a.shape)} E{tuple(e.shape)} "
                            f"B{tuple(b.shape)} do not fit weight {tuple(module.weight.shape)}")
        plan[path] = (module, fan_in_fan_out)
    heads = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in paths}
    params = dict(model.named_parameters())
    stray = [k for k in heads if k not in params or params[k].shape != heads[k].shape]
    if stray:
        raise LoraError(f"{folder}: keys {stray[:5]} match no parameter of this model")
    model.requires_grad_(False)
    with torch.no_grad():
        for key, value in heads.items():
            params[key].copy_(value)
        for path, (module, fan_in_fan_out) in plan.items():
            layer = SVDLinear(module, tensors[f"{path}.lora_E"].shape[0], cfg["lora_alpha"],
                              cfg["init_r"], fan_in_fan_out).to(module.weight.device)
            for part in ("lora_A", "lora_E", "lora_B"):
                getattr(layer, part).copy_(tensors[f"{path}.{part}"])
            layer.requires_grad_(False)
            replace_module(model, path, layer)
    return model


def merge_adalora(model: nn.Module) -> nn.Module:
    """W <- W + B (A * E) alpha / (ranknum + 1e-5), then the plain modules back in place."""
    with torch.no_grad():
        for path, layer in svd_layers(model):
            layer.weight.add_(layer.delta_weight().to(layer.weight.dtype))
            base = layer.base_layer
            base.weight = layer.weight
            replace_module(model, path, base)
    return model


class _AdaLoraIO:
    save, load, merge = staticmethod(save_adalora), staticmethod(load_adalora), staticmethod(merge_adalora)


ADALORA_IO = _AdaLoraIO()
