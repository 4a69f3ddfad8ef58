"""The two storage formats: NF4 (QLoRA, Dettmers et al. 2023) and int8 absmax per output channel.

NF4. The flattened weight is cut into blocks of ``block_size`` (64) values; block j keeps its absmax
s_j and each value w is stored as the 4-bit index of the nearest entry of the NormalFloat table
``NF4_TABLE`` (16 quantiles of N(0, 1), rescaled to [-1, 1], with an exact 0) to w / s_j:

    codes   (numel / 2,) uint8        two 4-bit indices per byte, high nibble first
    w~ = s~_j * NF4_TABLE[code]       s~_j the stored (possibly double-quantized) block scale

Double quantization stores the scales themselves in 8 bits: subtract their mean m, cut them into
blocks of ``scaler_block`` (256, or the largest power of two >= 16 dividing the block count), and
store round((s - m) * f_k) as int8 with f_k = 128 / max_k |s - m| (one fp32 f_k per scale block):

    scale_codes (numel / block_size,) int8     scale_factor (n_scale_blocks,) fp32     scale_mean () fp32
    s~_j = scale_codes_j / f_k + m

That is 4 + 8/64 + 32/(64*256) = 4.127 bits per weight (4.5 with fp32 scales, ``double_quant=False``).
Error bound, elementwise: |w - w~| <= h * s_j + |s_j - s~_j|, with h = 0.1519 the largest half-gap of
the table (between -1 and -0.6962) and |s_j - s~_j| <= max_k |s - m| / 128.
The layout, the table and the rounding are torchao's NF4Tensor's (the format torchtune trains with):
the double-quantized scales come from torchao's own ``double_quantize_scalers``, the codes from an
equivalent binary search (``nf4_codes``), so the pieces convert 1:1 to ``NF4Tensor``. Dequantization
here is one table look-up per byte (``F.embedding`` on a 256 x 2 table), 3x faster on CPU than
torchao's own.

int8. Per output row i: s_i = max_j |W_ij| / 127, codes = round(W / s_i) in [-127, 127]:

    codes (out, in) int8     scales (out,) fp32         |w - w~| <= s_i / 2;  8 + 32/in bits per weight

Rows. A quantized embedding table is read a few rows at a time (``nf4_rows``, ``int8_rows``): only the
looked-up rows are dequantized, each value the same fp32 product as in the whole-table dequantization,
so a lookup equals ``F.embedding(ids, dequantize())`` bit for bit. NF4 needs rows of whole blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lorakit.errors import LoraError

# torchao's NF4 table (Dettmers et al. 2023, Appendix E, to 4 decimals)
NF4_TABLE = (-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
             0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0)
NF4_HALF_GAP = max(b - a for a, b in zip(NF4_TABLE, NF4_TABLE[1:])) / 2     # 0.1519
_ZERO_CODE = NF4_TABLE.index(0.0)
_PAIR_TABLES: dict[torch.device, torch.Tensor] = {}


def _pair_table(device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: byte b -> (table[b >> 4], table[b & 15]), the two weights one byte holds."""
    if device not in _PAIR_TABLES:
        table = torch.tensor(NF4_TABLE, dtype=torch.float32, device=device)
        b = torch.arange(256, device=device)
        _PAIR_TABLES[device] = torch.stack([table[b >> 4], table[b & 15]], dim=1)
    return _PAIR_TABLES[device]


def scaler_block_for(n_blocks: int) -> int | None:
    """The scale-block size for double quantization: 256 as in QLoRA, else the largest power of two
    >= 16 that divides the number of blocks (torchao needs an exact division); None if none does."""
    for size in (256, 128, 64, 32, 16):
        if n_blocks % size == 0:
            return size
    return None


def nf4_codes(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 entry of each value in [-1, 1], two 4-bit indices per byte (high nibble first).
    A binary search over the midpoints between table entries, ties to the lower entry: the same codes
    as torchao's ``NF4Tensor.convert_to_norm_float_weight`` (an argmin over all 16 distances, which
    costs 16 floats per weight; tests/test_quant.py checks they agree) at a tenth of its time."""
    table = torch.tensor(NF4_TABLE, dtype=torch.float32, device=scaled.device)
    v = scaled.reshape(-1)
    index = torch.bucketize(v, (table[1:] + table[:-1]) / 2)
    # a value on a midpoint is a tie in exact arithmetic; settle it as the argmin over the fp32
    # distances does (the lower entry wins an exact tie), so the codes are torchao's bit for bit
    here = (v - table[index]).abs()
    up, down = (index + 1).clamp_(max=15), (index - 1).clamp_(min=0)
    index = torch.where((v - table[up]).abs() < here, up, index)
    index = torch.where((v - table[down]).abs() <= (v - table[index]).abs(), down, index)
    index = index.to(torch.uint8)
    return index[0::2] << 4 | index[1::2]


def nf4_fits(shape, block_size: int = 64, double_quant: bool = True, **_) -> str | None:
    """None if a weight of ``shape`` can be stored as NF4 with these settings, else why not."""
    numel = 1
    for d in shape:
        numel *= d
    if numel % block_size:
        return f"{numel} weights are not a multiple of block_size={block_size}"
    if double_quant and scaler_block_for(numel // block_size) is None:
        return (f"its {numel // block_size} blocks of {block_size} split into no scale blocks of "
                "16..256 for double quantization (use double_quant=False)")
    return None


# Loggers that torchao's import fills with warnings saying nothing about the run: one for each optional
# compiled kernel (CUDA, mxfp8) it cannot load on a CPU machine, and torch's pytree about torchao's
# enum registration. Quieted here while lorakit imports torchao, and by the CLI for the whole run
# (transformers imports torchao too).
IMPORT_NOISE_LOGGERS = ("torchao", "torch.utils._pytree")


def _torchao_nf4():
    """torchao's NF4Tensor class, imported with ``IMPORT_NOISE_LOGGERS`` at ERROR level."""
    loggers = [logging.getLogger(name) for name in IMPORT_NOISE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor  # deferred: heavy optional dependency
    except ImportError:
        raise LoraError("NF4 quantization uses torchao's NF4 format; install it with "
                        "`pip install 'lorakit[quant]'` (torchao 0.18), or use \"int8\"") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return NF4Tensor


def nf4_quantize(w: torch.Tensor, block_size: int = 64, double_quant: bool = True,
                 scaler_block: int | None = None) -> tuple[dict, dict]:
    NF4Tensor = _torchao_nf4()
    reason = nf4_fits(w.shape, block_size, double_quant)
    if reason:
        raise LoraError(f"cannot store this weight as NF4: {reason}")
    flat = w.detach().float().contiguous().reshape(-1)
    n_blocks = flat.numel() // block_size
    blocks = flat.view(n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)
    codes = nf4_codes(blocks / absmax.unsqueeze(1))
    zero = absmax == 0             # w / 0 is NaN there: store the table's exact 0 instead
    if zero.any():
        codes.view(n_blocks, block_size // 2)[zero] = _ZERO_CODE * 17     # both nibbles
    meta = {"block_size": block_size, "double_quant": double_quant}
    if not double_quant:
        return {"codes": codes, "scales": absmax}, meta
    scaler_block = scaler_block or scaler_block_for(n_blocks)
    if scaler_block is None or n_blocks % scaler_block:
        raise LoraError(f"scaler_block={scaler_block} does not divide the {n_blocks} scale blocks")
    spread = (absmax - absmax.mean()).view(-1, scaler_block).abs().amax(dim=1)
    if not (spread > 0).all():     # equal scales in a block: f = 128 / 0; keep its fp32 scales
        return {"codes": codes, "scales": absmax}, {**meta, "double_quant": False}
    scale_codes, factor, mean = NF4Tensor.double_quantize_scalers(flat, block_size, scaler_block)
    data = {"codes": codes, "scale_codes": scale_codes, "scale_factor": factor.float(),
            "scale_mean": mean.float().reshape(())}
    return data, {**meta, "scaler_block": scaler_block}


def nf4_block_scales(data: dict, meta: dict) -> torch.Tensor:
    """The stored block scales s~ (n_blocks,) in fp32."""
    if "scales" in data:
        return data["scales"]
    factor = data["scale_factor"]
    codes = data["scale_codes"].view(factor.numel(), -1).float()
    return (codes / factor.unsqueeze(1)).reshape(-1) + data["scale_mean"]


# Dequantization runs in chunks of this many weights: the fp32 products of a chunk (2 MB) stay in the
# core's cache on their way to the output dtype, and no full-size fp32 copy of the weight is made (the
# head of a 150K-token vocabulary would need 0.9 GB for it). To bf16, same bits as one pass, 2 threads:
# 8960 x 1536 (Qwen2.5-1.5B's MLP) 10.3 ms vs 27.0 ms, 151936 x 1536 (its head) 308 vs 713 ms,
# 1536 x 576 (SmolLM2's MLP) 0.73 vs 0.68 ms; chunks of 2^16 to 2^21 weights measured, 2^19 best.
DEQUANT_CHUNK = 1 << 19


def nf4_dequantize(data: dict, meta: dict, shape: tuple, dtype: torch.dtype = torch.float32
                   ) -> torch.Tensor:
    """The (out, in) weight in ``dtype``: table[code] * s~_j formed in fp32 and rounded once to
    ``dtype``, chunk by chunk (the same bits as one pass)."""
    codes = data["codes"]
    scales = nf4_block_scales(data, meta)
    block = codes.numel() * 2 // scales.numel()
    out = torch.empty(shape, dtype=dtype, device=codes.device).view(scales.numel(), block)
    table = _pair_table(codes.device)
    step = max(1, DEQUANT_CHUNK // block)                                # blocks per chunk
    for start in range(0, scales.numel(), step):
        stop = min(start + step, scales.numel())
        values = F.embedding(codes[start * block // 2:stop * block // 2].int(), table)
        values = values.view(stop - start, block).mul_(scales[start:stop].unsqueeze(1))
        out[start:stop].copy_(values)
    return out.view(shape)


def nf4_rows_fit(shape, block_size: int = 64, double_quant: bool = True, **_) -> str | None:
    """None if each row of ``shape`` is a whole number of blocks (what ``nf4_rows`` needs)."""
    if len(shape) != 2 or shape[1] % block_size:
        return (f"its rows of {shape[-1]} values are not whole blocks of block_size={block_size}, "
                "so a lookup could not dequantize single rows")
    return nf4_fits(shape, block_size, double_quant)


def _take(t: torch.Tensor, rows: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of ``t`` viewed as (rows, -1): (*ids.shape, -1). ``index_select`` checks the
    bounds as ``F.embedding`` does (a negative id is an error, not a wrap-around)."""
    return t.view(rows, -1).index_select(0, ids.reshape(-1)).view(*ids.shape, -1)


def nf4_rows(data: dict, meta: dict, shape: tuple, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of the (out, in) weight in fp32, dequantizing only those rows: (*ids.shape, in).

    With in % block_size == 0, row r is codes[r*in/2 : (r+1)*in/2] and blocks [r*in/bs, (r+1)*in/bs).
    The stored block scales s~ are computed first (a small vector, numel/block_size), then indexed.
    Each value is table[code] * s~_j in fp32, the very product ``nf4_dequantize`` forms: same bits."""
    rows, width = shape
    values = F.embedding(_take(data["codes"], rows, ids).int(), _pair_table(data["codes"].device))
    scales = _take(nf4_block_scales(data, meta), rows, ids)              # (*ids, in / bs)
    return values.view(*scales.shape, -1).mul_(scales.unsqueeze(-1)).view(*ids.shape, width)


def int8_fits(shape, **_) -> str | None:
    return None if len(shape) == 2 else f"int8 per output channel needs a 2-D weight, not {shape}"


def int8_quantize(w: torch.Tensor) -> tuple[dict, dict]:
    w32 = w.detach().float()
    absmax = w32.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    codes = torch.round(w32 / scales.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return {"codes": codes, "scales": scales}, {}


def int8_dequantize(data: dict, meta: dict, shape: tuple, dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
    return (data["codes"].float() * data["scales"].unsqueeze(1)).view(shape).to(dtype)


def int8_rows(data: dict, meta: dict, shape: tuple, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` in fp32, codes_r * s_r per row: the same products as ``int8_dequantize``."""
    rows = shape[0]
    return _take(data["codes"], rows, ids).float() * _take(data["scales"], rows, ids)


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: str                          # for tables: "4-bit NF4 + 8-bit block scales"
    fits: Callable
    quantize: Callable                 # (weight, **settings) -> (data, meta)
    dequantize: Callable               # (data, meta, shape, dtype=fp32) -> the weight in dtype
    settings: tuple                    # the quantize_base arguments it takes
    rows_fit: Callable                 # (shape, **settings) -> None, or why single rows can't be read
    rows: Callable                     # (data, meta, shape, ids) -> fp32 rows ids of the weight


SCHEMES = {
    "nf4": Scheme("nf4", "NF4 4-bit, block scales (double-quantized)", nf4_fits, nf4_quantize,
                  nf4_dequantize, ("block_size", "double_quant"), nf4_rows_fit, nf4_rows),
    "int8": Scheme("int8", "int8, absmax per output channel", int8_fits, int8_quantize,
                   int8_dequantize, (), int8_fits, int8_rows),
}
