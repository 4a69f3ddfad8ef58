"""``galore`` (Zhao et al. 2024): full-weight training with low-rank *gradient* projection. An optimizer,
not an adapter: every parameter trains, but Adam's moments of each projected 2-D weight live in an r-dim
subspace of its gradient, which is where the memory goes in full fine-tuning.

For a weight W (m x n) with gradient G, on the smaller side (the official "std" projection):

    m <= n:  P = top-r left singular vectors of G  (m, r);   R = P^T G  (r, n);   update = P N
    m >  n:  Q = top-r right singular vectors of G (n, r);   R = G Q    (m, r);   update = N Q^T
    M <- b1 M + (1 - b1) R,   V <- b2 V + (1 - b2) R^2,   N = M_hat / (sqrt(V_hat) + eps)   (Adam on R)
    W <- W - lr * alpha * update - lr * wd * W                                               (AdamW)

P (or Q) is recomputed every T steps (``update_proj_gap``; paper 200, here min(200, max_steps // 5) unless
``AdaptSpec.extra["galore_update_proj_gap"]`` says otherwise); the moments are kept across the switch, as in
the paper's code. Projected are the 2-D weights of the model's ``nn.Linear`` layers outside the task head
(attention and MLP, as in the paper); everything else gets plain AdamW. Rank = ``spec.r``, scale alpha =
``extra["galore_scale"]`` (default 0.25, the paper's).

Optimizer state per projected weight: 2 r max(m, n) + min(m, n) r floats instead of AdamW's 2 m n
(``optimizer_state_numel`` counts it).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import LoraError
from lorakit.methods.hooks import TrainHooks


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose param groups with ``rank`` set project their 2-D gradients (see the module doc)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=None,
                 update_proj_gap=200, scale=0.25):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad.float(), self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                project = group["rank"] is not None and p.dim() == 2
                if project and (int(state["step"]) % group["update_proj_gap"] == 0):
                    state["proj"] = _projector(grad, group["rank"])
                if project:
                    grad = _down(grad, state["proj"])
                if "exp_avg" not in state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
                state["step"] += 1
                t = int(state["step"])
                state["exp_avg"].lerp_(grad, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                update = (state["exp_avg"] / (1 - b1 ** t)) / denom
                if project:
                    update = group["scale"] * _up(update, state["proj"], p.shape)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss


def _projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` singular vectors of ``grad`` on its smaller side: (m, r) if m <= n else (n, r)."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    return u[:, :rank].contiguous() if grad.shape[0] <= grad.shape[1] else vh[:rank].t().contiguous()


def _down(grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    return proj.t() @ grad if grad.shape[0] <= grad.shape[1] else grad @ proj


def _up(low: torch.Tensor, proj: torch.Tensor, shape) -> torch.Tensor:
    return proj @ low if shape[0] <= shape[1] else low @ proj.t()


def optimizer_state_numel(optimizer: torch.optim.Optimizer) -> int:
    """Floats held in the optimizer's state tensors (step counters excluded)."""
    return sum(v.numel() for s in optimizer.state.values() for k, v in s.items()
               if torch.is_tensor(v) and k != "step")


class GaLoreHooks(TrainHooks):
    def __init__(self, projected: list[nn.Parameter], rank: int, gap: int | None, scale: float):
        self.ids, self.rank, self.gap, self.scale = {id(p) for p in projected}, rank, gap, scale

    def make_optimizer(self, groups, settings):
        gap = self.gap or min(200, max(1, settings.max_steps // 5))
        split = []
        for group in groups:                     # each group once projected, once plain
            low = [p for p in group["params"] if id(p) in self.ids]
            rest = [p for p in group["params"] if id(p) not in self.ids]
            split += [{**group, "params": low, "rank": self.rank}] if low else []
            split += [{**group, "params": rest, "rank": None}] if rest else []
        return GaLoreAdamW(split, lr=settings.lr, weight_decay=settings.weight_decay,
                           update_proj_gap=gap, scale=self.scale)


def apply_galore(model: nn.Module, spec) -> nn.Module:
    gap = spec.extra.get("galore_update_proj_gap")
    if gap is not None and (not isinstance(gap, int) or gap < 1):
        raise LoraError(f"galore_update_proj_gap={gap!r} must be a positive number of steps")
    model.requires_grad_(True)
    heads = tuple(f"{h}." for h in spec.head)
    projected = [m.weight for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and not f"{name}.".startswith(heads)
                 and min(m.weight.shape) > spec.r]
    if not projected:
        raise LoraError(f"galore found no nn.Linear weight wider than rank r={spec.r} outside the head "
                        f"{spec.head}; lower r")
    model.train_hooks = GaLoreHooks(projected, spec.r, gap,
                                    float(spec.extra.get("galore_scale", 0.25)))
    return model
