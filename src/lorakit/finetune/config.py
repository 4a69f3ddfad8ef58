"""FinetuneConfig: every setting of one ``lorakit finetune`` run, from defaults, --quick, a config
file and flags, in that order (later wins). The resolved configuration is written to DIR/config.json;
``lorakit finetune --config DIR/config.json`` runs the same thing again.

Config files: TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON, one table of the same keys as the
flags (``max_seq_len`` or ``max-seq-len``). An unknown key is an error, not a silent no-op.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from lorakit.errors import LoraError
from lorakit.quant import check_embeddings_option

# tomllib is in the standard library from Python 3.11; on 3.10 YAML and JSON configs still work
tomllib = importlib.import_module("tomllib") if importlib.util.find_spec("tomllib") else None

TASKS = ("auto", "sft", "classify")
PROMPT_FORMATS = ("auto", "chat", "plain")
# Keys that may differ between a run and its --resume: where it writes and how it shows progress.
RUN_CONTROL = frozenset({"resume", "out", "progress", "overwrite", "config"})


@dataclass
class FinetuneConfig:
    model: str | None = None
    data: str | None = None
    out: str | None = None
    val_data: str | None = None
    val_fraction: float = 0.05          # held out of --data when --val-data is not given
    task: str = "auto"                  # sft | classify | auto (labels in the data -> classify)
    text_column: str = "text"           # classification
    label_column: str = "label"
    prompt_format: str = "auto"         # chat template when the tokenizer has one (auto), or plain
    chat_template: str | None = None    # a Jinja file that replaces / supplies the template
    train_on_prompt: bool = False       # SFT loss on prompt tokens too
    max_seq_len: int = 1024
    pack: bool = False                  # pack short examples into max_seq_len rows
    max_examples: int | None = None     # use the first N training examples
    # LoRA (Hu et al. 2021)
    r: int = 8
    alpha: float = 16.0
    targets: str = "all-linear"         # suffixes "q_proj,v_proj", or all-linear (QLoRA's choice)
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: str = "gaussian"
    quantize: str | None = None         # nf4 | int8: frozen base weights quantized (QLoRA)
    quantize_embeddings: bool = False   # with quantize: the input embeddings and output head too
    # training
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup_frac: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None        # None: --epochs over the training set
    epochs: float = 1.0
    eval_every: int | None = None       # None: about 5 evaluations per run
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    precision: str = "bf16"
    device: str = "auto"
    seed: int = 0
    grad_checkpoint: bool = False
    fsdp: bool = False
    # report
    samples: int = 4                    # validation prompts answered before and after training
    sample_tokens: int = 64
    quick: bool = False
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        for name, allowed in (("task", TASKS), ("prompt_format", PROMPT_FORMATS)):
            if getattr(self, name) not in allowed:
                raise LoraError(f"--{name.replace('_', '-')} {getattr(self, name)!r}; choose one of "
                                f"{allowed}")
        for name in ("max_seq_len", "batch_size", "grad_accum", "r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LoraError(f"--{name.replace('_', '-')} {value!r} must be a positive integer")
        if self.quantize not in (None, "nf4", "int8"):
            raise LoraError(f"--quantize {self.quantize!r}; choose nf4 (QLoRA, Dettmers et al. 2023) "
                            "or int8")
        check_embeddings_option(self.quantize, self.quantize_embeddings)
        if self.max_steps is not None and self.max_steps < 1:
            raise LoraError(f"--max-steps {self.max_steps!r} must be at least 1")
        if not self.epochs > 0:
            raise LoraError(f"--epochs {self.epochs!r} must be positive")
        if not 0 <= self.val_fraction < 1:
            raise LoraError(f"--val-fraction {self.val_fraction!r} must be in [0, 1)")
        if self.max_seq_len < 8:
            raise LoraError(f"--max-seq-len {self.max_seq_len} is too short to hold a prompt and an "
                            "answer; use at least 8 (typically 512-2048)")

    def to_dict(self) -> dict:
        return asdict(self)


QUICK = {"max_steps": 30, "max_examples": 240, "max_seq_len": 256, "samples": 3, "sample_tokens": 48,
         "eval_every": 30, "lr": 1e-3, "warmup_frac": 0.1}


def resolve(flags: dict, config_file: str | None = None) -> FinetuneConfig:
    """defaults < --quick presets < config file < flags given on the command line.
    ``flags``: only the options the user actually passed (argparse defaults of None left out)."""
    from_file = read_config_file(config_file) if config_file else {}
    quick = flags.get("quick", from_file.get("quick", False))
    merged = {**(QUICK if quick else {}), **from_file, **{k: v for k, v in flags.items() if v is not None}}
    for key in ("model", "data", "out"):
        if not merged.get(key):
            raise LoraError(f"--{key} is required (on the command line or as `{key}` in --config)")
    return FinetuneConfig(**merged)


def read_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise LoraError(f"--config {path}: no such file; pass a .toml, .yaml or .json file")
    text, suffix = file.read_text(), file.suffix.lower()
    try:
        if suffix == ".toml":
            if tomllib is None:
                raise LoraError(f"--config {path}: reading TOML needs Python 3.11+; use a .yaml or "
                                ".json config here")
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml  # deferred: heavy optional dependency
            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise LoraError(f"--config {path}: unknown extension {suffix!r}; use .toml, .yaml/.yml or "
                            ".json")
    except LoraError:
        raise
    except Exception as err:                 # the parsers' own error types differ
        raise LoraError(f"--config {path} does not parse as {suffix[1:]}: {err}") from None
    if not isinstance(data, dict):
        raise LoraError(f"--config {path} must hold one table of settings, found {type(data).__name__}")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in fields(FinetuneConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LoraError(f"--config {path}: unknown keys {unknown}; known keys: {sorted(known)}")
    return data


def config_differences(saved: dict, current: FinetuneConfig) -> dict:
    """{key: (saved, now)} for settings that differ, ignoring where/how the run reports."""
    now = current.to_dict()
    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
            if k not in RUN_CONTROL and saved.get(k) != now.get(k)}
