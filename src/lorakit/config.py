"""LoraConfig: every knob of one LoRA adapter, validated when it is made.

An adapted layer computes

    h = W0 x + b + s * B A dropout(x),     A: (r, in), B: (out, r),
    s = alpha / r            (Hu et al. 2021)
    s = alpha / sqrt(r)      (rsLoRA, Kalajdzievski 2023)

With ``init="gaussian"`` A ~ N(0, 1/r^2) and B = 0 (the paper's choice; std 1/r as in PEFT), so the
adapted model equals the base exactly at step 0. ``init="kaiming"`` draws A kaiming-uniform
(a = sqrt(5), loralib's and PEFT's default) and also sets B = 0. Embedding layers swap the roles (A = 0,
B Gaussian), as PEFT does, because their A acts as a lookup table.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

from lorakit.errors import LoraError
from lorakit.module_paths import check_pattern, matches_module
from lorakit.peft_names import RENAMED, TASK_TYPES, translate

INITS = ("gaussian", "kaiming")
BIAS_MODES = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """Settings for one adapter. ``from_peft`` / ``from_dict`` also take PEFT's field names (the
    mapping is in ``lorakit/peft_names.py``).

    target_modules: module-name patterns (``["query", "value"]`` matches ``...attention.self.query``),
        one regex string matched against the full dotted name, or ``"all-linear"`` (every Linear /
        GPT-2 Conv1D except the output head). None: the usual attention projections of the model's
        architecture (PEFT's table, ``peft_names.DEFAULT_TARGETS``), picked by ``plan_lora`` with a
        warning naming them.
    exclude_modules: same forms as ``target_modules``; matching names are skipped.
    layers_to_transform / layers_pattern: only adapt blocks with these indices, found as
        ``<layers_pattern>.<index>.`` in the name (``layers_pattern`` defaults to the common names).
    rank_pattern / alpha_pattern: per-module overrides, ``{pattern: value}``, matched by the one rule
        of ``lorakit.module_paths.matches_module`` (a dotted suffix, literally or as a regex).
    fused_slices: ``{suffix: [True, False, True]}`` puts LoRA on chosen equal slices of a fused
        projection's output (loralib's MergedLinear), e.g. q and v of a fused qkv matrix.
    modules_to_save: modules trained in full and saved with the adapter (a classifier head).
    strict: every target pattern must match at least one module (default); False only warns.
    dora: DoRA (Liu et al. 2024): each adapted layer also learns a magnitude per output feature
        (``layers/dora.py``).
    task_type: PEFT's task type. "SEQ_CLS" / "TOKEN_CLS" / "QUESTION_ANS" also train the model's head
        (classifier / score / qa_outputs, those it has) in full, as PEFT's PeftModelFor<Task> does.
    lora_bias: B also has a bias (out,), scaled with s like B A (PEFT's lora_bias; lora_B.bias on disk).
    """

    r: int = 8
    alpha: float = 8.0
    target_modules: list[str] | str | None = None
    dropout: float = 0.0
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init: str = "gaussian"
    rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fused_slices: dict[str, list[bool]] = field(default_factory=dict)
    strict: bool = True
    dora: bool = False
    task_type: str | None = None
    lora_bias: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        self.validate()

    def validate(self) -> None:
        """Raise LoraError naming the first bad field and what it accepts."""
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise LoraError(f"dropout={self.dropout!r} is outside [0, 1); use e.g. 0.0 or 0.1")
        if self.bias not in BIAS_MODES:
            raise LoraError(f"bias={self.bias!r} is not supported; choose one of {BIAS_MODES}")
        if self.init not in INITS:
            raise LoraError(f"init={self.init!r} is not supported; choose one of {INITS}")
        if self.target_modules == [] or self.target_modules == "":
            raise LoraError("target_modules is empty; name module suffixes (e.g. ['query', 'value']), "
                            "a regex string, 'all-linear', or None for the architecture's usual ones. "
                            "`lorakit inspect MODEL` lists the names")
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, str) and value != ALL_LINEAR:
                _check_regex(name, value)
            elif value is not None and not isinstance(value, str):
                if not all(isinstance(v, str) and v for v in value):
                    raise LoraError(f"{name}={value!r} must hold non-empty strings")
                for pattern in value:
                    _check_pattern(f"{name} entry", pattern)
        for name in ("rank_pattern", "alpha_pattern", "fused_slices"):
            for pattern in getattr(self, name):
                _check_pattern(f"{name} key", pattern)
        for name in ("dora", "lora_bias", "rslora", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise LoraError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.lora_bias and self.dora:
            raise LoraError("lora_bias=True with dora=True: DoRA rescales the whole weight, so a bias on "
                            "B has no defined merge (PEFT refuses the pair too); drop one of them")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise LoraError(f"task_type={self.task_type!r} is not one of PEFT's task types {TASK_TYPES} "
                            "(or None)")
        for suffix, mask in self.fused_slices.items():
            if not mask or not all(isinstance(m, bool) for m in mask) or not any(mask):
                raise LoraError(f"fused_slices[{suffix!r}]={mask!r} must be a list of booleans with "
                                "at least one True, e.g. [True, False, True] for q and v of a fused qkv")
        if self.layers_to_transform is not None:
            if not all(isinstance(i, int) and i >= 0 for i in self.layers_to_transform):
                raise LoraError(f"layers_to_transform={self.layers_to_transform!r} must be "
                                "non-negative block indices")

    # --- per-module values -------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scale_for(self, module_name: str) -> float:
        return lora_scale(self.alpha_for(module_name), self.rank_for(module_name), self.rslora)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LoraConfig":
        """From lorakit's field names, PEFT's (``lora_alpha``, ``use_dora``, ...), or a mix of both."""
        values = translate(data, new_adapter=True)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LoraError(f"unknown LoraConfig fields {unknown}; known fields: {sorted(known)}, and "
                            f"PEFT's names {sorted(RENAMED)} (lorakit/peft_names.py has the mapping)")
        return cls(**values)

    @classmethod
    def from_peft(cls, config) -> "LoraConfig":
        """The same adapter settings from PEFT's: a ``peft.LoraConfig`` or its dict (``to_dict()``,
        ``adapter_config.json``). Omitted fields take PEFT's defaults (init_lora_weights=True: kaiming
        A). Options lorakit does not implement are refused by name."""
        data = config if isinstance(config, dict) else getattr(config, "to_dict", lambda: None)()
        if not isinstance(data, dict):
            raise LoraError(f"from_peft takes a peft.LoraConfig or a dict of its fields, got "
                            f"{type(config).__name__}")
        return cls.from_dict({"init_lora_weights": True, **data})


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / (math.sqrt(r) if rslora else r)


def _pattern_value(patterns: dict, module_name: str, default):
    for pattern, value in patterns.items():
        if matches_module(module_name, pattern):
            return value
    return default


def _check_rank(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LoraError(f"{name}={value!r} must be a positive integer rank, e.g. 8")


def _check_alpha(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise LoraError(f"{name}={value!r} must be a positive finite number, e.g. 16")


def _check_pattern(what: str, pattern: str) -> None:
    error = check_pattern(pattern)
    if error is not None:
        raise LoraError(f"{what} {pattern!r} is not a valid pattern ({error}); a pattern is a module-"
                        "name suffix, read literally or as a regex (escape regex characters)")


def _check_regex(name: str, value: str) -> None:
    try:
        re.compile(value)
    except re.error as err:
        raise LoraError(f"{name}={value!r} is not a valid regex ({err}); pass a list of suffixes "
                        "to match names literally") from None
