"""LoraConfig: every knob of one LoRA adapter, validated when it is made.

An adapted layer computes

    h = W0 x + b + s * B A dropout(x),     A: (r, in), B: (out, r),
    s = alpha / r            (Hu et al. 2021)
    s = alpha / sqrt(r)      (rsLoRA, Kalajdzievski 2023; seed 003 writes the scale this way)

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

INITS = ("gaussian", "kaiming")
BIAS_MODES = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """Settings for one adapter. Field names follow DESIGN.md; PEFT's names are mapped in ``io.py``.

    target_modules: module-name suffixes (``["query", "value"]`` matches ``...attention.self.query``),
        one regex string matched against the full dotted name, or ``"all-linear"`` (every Linear /
        GPT-2 Conv1D except the output head).
    exclude_modules: same forms as ``target_modules``; matching names are skipped.
    layers_to_transform / layers_pattern: only adapt blocks with these indices, found as
        ``<layers_pattern>.<index>.`` in the name (``layers_pattern`` defaults to the common names).
    rank_pattern / alpha_pattern: per-module overrides, ``{pattern: value}``; a pattern matches a name
        that equals it, ends with ``.pattern``, or that ``(.*\\.)?pattern`` fully matches as a regex.
    fused_slices: ``{suffix: [True, False, True]}`` puts LoRA on chosen equal slices of a fused
        projection's output (loralib's MergedLinear), e.g. q and v of a fused qkv matrix.
    modules_to_save: modules trained in full and saved with the adapter (a classifier head).
    strict: every target pattern must match at least one module (default); False only warns.
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
        if self.target_modules is None or self.target_modules == [] or self.target_modules == "":
            raise LoraError("target_modules is empty; name module suffixes (e.g. ['query', 'value']), "
                            "a regex string, or 'all-linear'. `lorakit inspect MODEL` lists the names")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value != ALL_LINEAR:
                _check_regex(name, value)
            elif value is not None and not isinstance(value, str):
                if not all(isinstance(v, str) and v for v in value):
                    raise LoraError(f"{name}={value!r} must hold non-empty strings")
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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoraError(f"unknown LoraConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / (math.sqrt(r) if rslora else r)


def pattern_matches(pattern: str, module_name: str) -> bool:
    """True if ``pattern`` names ``module_name``: exact, as a dotted suffix, or as a suffix regex."""
    if module_name == pattern or module_name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(rf"(.*\.)?(?:{pattern})", module_name) is not None
    except re.error:
        return False


def _pattern_value(patterns: dict, module_name: str, default):
    for pattern, value in patterns.items():
        if pattern_matches(pattern, module_name):
            return value
    return default


def _check_rank(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LoraError(f"{name}={value!r} must be a positive integer rank, e.g. 8")


def _check_alpha(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise LoraError(f"{name}={value!r} must be a positive finite number, e.g. 16")


def _check_regex(name: str, value: str) -> None:
    try:
        re.compile(value)
    except re.error as err:
        raise LoraError(f"{name}={value!r} is not a valid regex ({err}); pass a list of suffixes "
                        "to match names literally") from None
