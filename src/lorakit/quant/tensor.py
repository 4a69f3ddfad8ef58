"""A frozen weight stored quantized, usable wherever a weight tensor is: ``QuantizedWeight``.

It is a tensor subclass that reports the original shape and dtype (``weight.shape == (out, in)``) but
holds only the quantized pieces (``formats.py``: NF4 codes + block scales, or int8 codes + row scales).
``F.linear(x, W)`` (what ``nn.Linear`` and every LoRA layer call) goes through ``DequantLinear``:

    forward   W~ = dequant(Wq) in x's dtype          y  = x W~^T + b        W~ freed at once
    backward  W~ = dequant(Wq) again                 dx = dy W~             (no dW: W is frozen)

so only the 4/8-bit storage stays alive between forward and backward (QLoRA, Dettmers et al. 2023;
torchao's ``LinearNF4`` and bitsandbytes' ``MatMul4Bit`` do the same). Under autocast, x and b are cast
to the autocast dtype and W is dequantized straight to it.

``F.embedding(ids, W)`` (an ``nn.Embedding`` with a quantized table) dequantizes the looked-up rows
only (``formats.py``, "Rows"): the same bits as ``F.embedding(ids, W.dequantize())``, without a dense
copy of the table; a table whose rows are not whole NF4 blocks is dequantized whole instead.

Any other op on the weight runs on its dequantized value and returns a plain tensor (``W + 1``,
``W @ v``, ``W.sum()``), so code that only reads weights keeps working. Writing into it in place
(``copy_``, ``add_``...) raises: a quantized weight changes only by re-quantizing, explicitly.
``.to(device)`` moves the storage; ``.to(dtype)`` changes the dtype it dequantizes to, never the storage.
The core finds these weights by the ``lorakit_quantized`` marker (``lorakit.layers.is_quantized``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map_only

from lorakit.errors import LoraError
from lorakit.quant.formats import SCHEMES

aten = torch.ops.aten
_SAME = (aten.detach.default, aten.alias.default)


class QuantizedWeight(torch.Tensor):
    """A 2-D weight (out, in) held as the ``qdata`` tensors of one ``scheme`` (see ``formats.py``).

    qdata:  dict name -> plain tensor (codes, scales, ...), the only memory it holds
    scheme: "nf4" | "int8";  meta: JSON-able settings (block_size, scaler_block, ...)
    """

    lorakit_quantized = True          # the duck-typed marker the core checks

    @staticmethod
    def __new__(cls, data: dict, scheme: str, meta: dict, shape, dtype: torch.dtype):
        device = next(iter(data.values())).device
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device,
                                                   requires_grad=False)

    def __init__(self, data: dict, scheme: str, meta: dict, shape, dtype: torch.dtype):
        self.qdata, self.scheme, self.meta = dict(data), scheme, dict(meta)

    # --- what the rest of lorakit uses ---------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a plain (out, in) tensor: computed in fp32, rounded once to ``dtype``
        (default: the weight's own dtype). Deterministic: the same bits every call."""
        return SCHEMES[self.scheme].dequantize(self.qdata, self.meta, tuple(self.shape),
                                               dtype or self.dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``ids`` of the weight, (*ids.shape, in): equal to ``self.dequantize(dtype)[ids]``
        bit for bit (computed in fp32, rounded once), but only those rows are dequantized."""
        scheme = SCHEMES[self.scheme]
        if scheme.rows_fit(tuple(self.shape), **self.meta):         # rows are not whole blocks
            return self.dequantize(dtype)[ids]
        return scheme.rows(self.qdata, self.meta, tuple(self.shape), ids).to(dtype or self.dtype)

    def quantize_like(self, dense: torch.Tensor) -> QuantizedWeight:
        """``dense`` quantized with this weight's scheme and settings (used by requantized merges)."""
        return quantize_weight(dense, self.scheme, dtype=self.dtype, **self.meta)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.qdata.values())

    def describe(self) -> str:
        bits = 8 * self.storage_bytes() / max(self.numel(), 1)
        return f"{self.scheme} {tuple(self.shape)} {bits:.2f} bits/weight"

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.describe()}, dtype={self.dtype}, device={self.device})"

    # --- plumbing -------------------------------------------------------------------------------
    def _with(self, data: dict | None = None, dtype: torch.dtype | None = None) -> QuantizedWeight:
        return QuantizedWeight(self.qdata if data is None else data, self.scheme, self.meta,
                               self.shape, dtype or self.dtype)

    def __tensor_flatten__(self):
        names = sorted(self.qdata)
        return names, (self.scheme, self.meta, tuple(self.shape), self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        scheme, meta, shape, dtype = ctx
        return QuantizedWeight(inner, scheme, meta, shape, dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return quantized_linear(*args, **kwargs)
        if func is F.embedding:
            return quantized_embedding(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SAME:
            return args[0]._with()
        if func is aten.clone.default:
            return args[0]._with({k: v.clone() for k, v in args[0].qdata.items()})
        if func is aten._to_copy.default:
            return _to_copy(args[0], **kwargs)
        if isinstance(args[0], QuantizedWeight) and func.overloadpacket.__name__.endswith("_"):
            raise LoraError(f"{func.overloadpacket.__name__} would write into a quantized weight "
                            f"({args[0].describe()}); it is frozen. Re-quantize explicitly "
                            "(weight.quantize_like(new_dense)) or dequantize_base(model) first")
        args, kwargs = tree_map_only(QuantizedWeight, lambda t: t.dequantize(), (args, kwargs))
        return func(*args, **kwargs)


def quantize_weight(weight: torch.Tensor, scheme: str, dtype: torch.dtype | None = None,
                    **settings) -> QuantizedWeight:
    """A 2-D float weight as a ``QuantizedWeight`` of ``scheme`` ("nf4" | "int8"); ``settings`` go
    to the scheme (``formats.py``); ``dtype``: what it dequantizes to (default: the weight's)."""
    data, meta = SCHEMES[scheme].quantize(weight.detach(), **settings)
    return QuantizedWeight(data, scheme, meta, tuple(weight.shape), dtype or weight.dtype)


def _to_copy(w: QuantizedWeight, dtype=None, device=None, non_blocking=False, **_) -> QuantizedWeight:
    if dtype is not None and not dtype.is_floating_point:
        raise LoraError(f"a quantized weight dequantizes to floating point only, not {dtype}")
    data = w.qdata
    if device is not None and torch.device(device) != w.device:
        data = {k: v.to(device, non_blocking=non_blocking) for k, v in data.items()}
    return w._with(data, dtype)


class DequantLinear(torch.autograd.Function):
    """y = x dequant(Wq)^T + b; backward dequantizes again for dx (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight: QuantizedWeight, bias):
        ctx.weight = weight             # the 4/8-bit storage only, not a dense copy
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        dx = dy @ ctx.weight.dequantize(dy.dtype) if ctx.needs_input_grad[0] else None
        db = None
        if ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return dx, None, db


def _check_frozen(weight: QuantizedWeight) -> None:
    if weight.requires_grad:
        raise LoraError(f"a quantized weight ({weight.describe()}) is set to train; quantized "
                        "bases are frozen: train LoRA on top (QLoRA), or load the base unquantized "
                        "for full fine-tuning")


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight, bias=None) -> torch.Tensor:
    """``F.linear`` for a quantized weight: x (..., in) -> (..., out)."""
    _check_frozen(weight)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, bias = x.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return DequantLinear.apply(x, weight, bias)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return DequantLinear.apply(x, weight, bias)


def quantized_embedding(ids: torch.Tensor, weight: QuantizedWeight, padding_idx=None, max_norm=None,
                        *_, **__) -> torch.Tensor:
    """``F.embedding`` for a quantized table: the rows ``ids`` in the weight's dtype, as a lookup in
    the dequantized table gives them. padding_idx, scale_grad_by_freq and sparse only shape the
    table's gradient, and a quantized table has none; max_norm would rewrite rows in place: refused."""
    if not isinstance(weight, QuantizedWeight):
        raise LoraError("F.embedding on a quantized weight needs it as the table, not the token ids")
    if max_norm is not None:
        raise LoraError(f"an embedding lookup with max_norm={max_norm} renormalizes the table's rows "
                        f"in place; a quantized table ({weight.describe()}) is frozen. Keep this "
                        "embedding unquantized (quantize_base(..., embeddings=False))")
    _check_frozen(weight)
    return weight.rows(ids)
