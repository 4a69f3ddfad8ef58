"""A fused LoRA linear: the base GEMM and the low-rank path in one ``torch.autograd.Function``.

Math (x: (N, in) after flattening leading dims, W0: (out, in), A: (r, in), B: (out, r), s = scale,
m = dropout mask / (1 - p), or 1 without dropout):

    forward   xd = m * x                         ax = xd A^T                  (N, r)
              y  = x W0^T + b  + s * ax B^T      (one ``addmm_`` into the base output)
    backward  g  = s * dy B                      (N, r)
              dB = s * dy^T ax                   (out, r)
              dA = g^T xd                        (r, in)
              dx = dy W0 + m * (g A)             (without dropout: one ``addmm_`` into dy W0)

Only x and ax are saved (ax is N x r, tiny). The eager layer (``LoraLinear.lora_forward``) keeps the
dropout output and, when dropout is on, its mask besides; here the mask is regenerated in backward from
the RNG state saved in forward, so dropout costs no activation memory. The dropout draw is the same call
the eager ``nn.Dropout`` makes on CPU, so there the same seed gives the same mask on both paths (CUDA's
``nn.Dropout`` uses its own fused kernel: a mask from the same distribution, not the same bits).

dtypes follow the eager layer exactly: under autocast every matmul runs in the autocast dtype (the eager
``F.linear`` calls cast to it); without autocast the base runs in the weight's dtype and the low-rank
path in the factors' dtype (fp32), its result cast to the output dtype before the add. GPT-2's
``Conv1D`` stores W0 as (in, out) (``fan_in_fan_out``); the factors keep the Linear layout.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

_FUSED = {"mode": "auto"}

# Below this many rows (tokens in the batch), a training step under bf16/fp16 takes the eager path by
# default: the custom autograd.Function's fixed Python cost outweighs its saved passes. Measured on
# one LoRA layer, forward + backward, fused / eager, median of 16 interleaved pairs [95% interval],
# 1 thread, Xeon with AMX (issue 17): d=384 bf16: 32 rows 1.116 [1.076, 1.134], 64 rows 1.020
# [0.981, 1.079], 128 rows 1.013 [0.961, 1.062], 256 rows 0.974 [0.946, 0.999], 1024 rows 0.861,
# 6144 rows (the Whisper demo: 96 sequences x 64 positions) 0.714 [0.642, 0.727]; d=576 bf16: 64
# rows 0.990 [0.971, 1.009], 256 rows 0.957. fp32 never lost (32 rows 0.996 [0.962, 1.010], 128
# rows 0.905 [0.846, 0.946]), so fp32 always takes the fused path. In the whole SmolLM2-135M bf16
# step at 256 rows (2 x 128 tokens, 2 threads, 20 interleaved rounds) fused measured 1.010 [1.001,
# 1.017] x eager, so the bound is 512: at 256 rows neither path wins by more than ~2%.
FUSED_MIN_ROWS_LOW_PRECISION = 512


def fused_enabled() -> bool:
    return _FUSED["mode"] != "never"


def fused_mode() -> str:
    """'auto' (default: fused, except the few-rows low-precision case above), 'always' or 'never'."""
    return _FUSED["mode"]


@contextmanager
def use_fused(enabled: bool | None = True):
    """Inside the block LoraLinear takes the fused path whenever it can (True), the eager reference
    path (False), or lets the default rule pick from the shapes (None)."""
    before = _FUSED["mode"]
    _FUSED["mode"] = "auto" if enabled is None else ("always" if enabled else "never")
    try:
        yield
    finally:
        _FUSED["mode"] = before


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _dropout_scale(x: torch.Tensor, p: float) -> torch.Tensor:
    """m = bernoulli(1 - p) / (1 - p) in x's dtype: the draw ``nn.Dropout`` makes on CPU."""
    return torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)


def _replay_dropout(x: torch.Tensor, p: float, state: torch.Tensor) -> torch.Tensor:
    """The mask forward drew, regenerated from its saved RNG state; the current RNG is left as it was."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=x.device.type):
        if x.device.type == "cuda":
            torch.cuda.set_rng_state(state, x.device)
        else:
            torch.set_rng_state(state)
        return _dropout_scale(x, p)


def _forward(x, weight, bias, A, B, scale: float, p: float, x_dtype: torch.dtype, fan_in_fan_out: bool):
    """(y, ax, rng state) for 2-D x already in the matmul dtype. x_dtype is the dtype the caller's x
    had, in which eager dropout draws and scales its mask (it differs from x.dtype only under autocast)."""
    state = _rng_state(x.device) if p > 0 else None
    m = _dropout_scale(x.new_empty(x.shape, dtype=x_dtype), p) if p > 0 else None
    xd = x if m is None else (x.to(x_dtype) * m).to(x.dtype)
    ax = F.linear(xd.to(A.dtype), A)                                       # (N, r)
    out = F.linear(x, weight.t() if fan_in_fan_out else weight, bias)     # (N, out)
    if ax.dtype == out.dtype:
        out.addmm_(ax, B.t(), alpha=scale)
    else:                                      # fp32 factors on a bf16 base without autocast
        out += (scale * F.linear(ax, B)).to(out.dtype)
    return out, ax, state


class LoraLinearFunction(torch.autograd.Function):
    """y = x W0^T + b + s * (m x) A^T B^T for 2-D x; see the module docstring for the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale: float, p: float, x_dtype: torch.dtype,
                fan_in_fan_out: bool):
        out, ax, state = _forward(x, weight, bias, A, B, scale, p, x_dtype, fan_in_fan_out)
        ctx.save_for_backward(x, weight, A, B, ax, state)
        ctx.scale, ctx.p, ctx.x_dtype, ctx.fan_in_fan_out = scale, p, x_dtype, fan_in_fan_out
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, A, B, ax, state = ctx.saved_tensors
        s, p = ctx.scale, ctx.p
        need_x, need_w, need_b, need_a, need_b_factor = ctx.needs_input_grad[:5]
        m = _replay_dropout(x.new_empty(x.shape, dtype=ctx.x_dtype), p, state) if p > 0 else None
        dy_lora = dy.to(B.dtype)
        g = (dy_lora @ B).mul_(s)                                          # (N, r)
        dx = dw = db = da = dbf = None
        if need_a:
            xd = x if m is None else (x.to(ctx.x_dtype) * m).to(x.dtype)
            da = g.t() @ xd.to(A.dtype)                                    # (r, in)
        if need_b_factor:
            dbf = (dy_lora.t() @ ax).mul_(s)                               # (out, r)
        if need_x:
            dx = dy @ (weight.t() if ctx.fan_in_fan_out else weight)      # (N, in)
            if m is None and g.dtype == dx.dtype:
                dx.addmm_(g, A)
            else:
                low = g @ A
                dx += (low if m is None else low * m).to(dx.dtype)
        if need_w:
            dw = x.t() @ dy if ctx.fan_in_fan_out else dy.t() @ x
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        return dx, dw, db, da, dbf, None, None, None, None


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias, A: torch.Tensor, B: torch.Tensor,
                      scale: float, p: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """Base linear plus one LoRA adapter, fused; x: (..., in) -> (..., out). ``p``: dropout to apply
    now (pass 0 in eval mode). Under autocast the inputs are cast as the eager ``F.linear`` calls
    would cast them, and the function runs with autocast off."""
    device_type = x.device.type
    x_dtype = x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    args = (x2, weight, bias, A, B)
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        args = tuple(t if t is None else t.to(dtype) for t in args)
    # Inference needs no saved tensors: call the math directly, without the autograd node.
    run = LoraLinearFunction.apply if torch.is_grad_enabled() else \
        (lambda *a: _forward(*a)[0])
    with torch.autocast(device_type, enabled=False):
        out = run(*args, scale, p, x_dtype, fan_in_fan_out)
    return out.view(*lead, out.shape[-1])
