"""Dotted module paths: which names a pattern selects, swapping a submodule, whose parameter is whose.

One matching rule serves every place a user names modules: the items of ``target_modules`` and
``exclude_modules`` lists, ``modules_to_save``, and the keys of ``rank_pattern``, ``alpha_pattern`` and
``fused_slices``. A pattern selects a module name when

    name == pattern,   or  name ends with "." + pattern,   or  re.fullmatch(r"(.*\\.)?(?:pattern)", name)

i.e. the pattern, read literally or as a regex, matches a whole dotted suffix of the name:
``"query"`` selects ``encoder.layer.0.attention.self.query`` but not ``...query_proj``;
``"layer\\.[0-2]\\..*query"`` selects the first three blocks' queries. (PEFT uses the suffix rule for
list targets and the regex rule for pattern keys; one rule here means one thing to learn.) A single
*string* ``target_modules`` / ``exclude_modules`` is different, as in PEFT: a regex over the full name.
``LoraConfig.validate`` compiles every pattern, so a bad regex is an error, never a silent miss.
"""

from __future__ import annotations

import functools
import re

from torch import nn

LORA_PART = "lora"                        # LoraLayer.lora: ModuleDict of LowRankDelta per adapter
SAVED_PART = "modules_to_save"            # ModulesToSave.modules_to_save: the per-adapter head copies
ORIGINAL_PART = "original_module"         # ModulesToSave.original_module: the frozen head itself


@functools.lru_cache(maxsize=4096)
def _suffix_regex(pattern: str) -> re.Pattern:
    return re.compile(rf"(?:.*\.)?(?:{pattern})")


def matches_module(name: str, pattern: str) -> bool:
    """True when ``pattern`` selects module ``name`` by the rule in the module docstring."""
    if name == pattern or name.endswith("." + pattern):
        return True
    return _suffix_regex(pattern).fullmatch(name) is not None


def check_pattern(pattern: str) -> str | None:
    """None when ``pattern`` compiles under the matching rule, else the regex error's text."""
    try:
        _suffix_regex(pattern)
    except re.error as err:
        return str(err)
    return None


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule at dotted ``path`` is (``path=""`` is not allowed: the root)."""
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def is_adapter_param(name: str) -> bool:
    """True for parameters an adapter added: LoRA factors (``...query.lora.default.A``) and the
    per-adapter head copies of ``modules_to_save`` (``classifier.modules_to_save.default.weight``)."""
    parts = name.split(".")[:-1]
    return LORA_PART in parts or SAVED_PART in parts


def is_plain_base_param(name: str) -> bool:
    """True for the base model's own parameters outside any adapter machinery: not an adapter's, and
    not the frozen original of a ``modules_to_save`` head (which the head copies replace)."""
    return not is_adapter_param(name) and ORIGINAL_PART not in name.split(".")[:-1]
