"""Autoregressive decoding with a KV cache, over a batch of left-padded prompts.

    prefill:  ids (B, P) left-padded, mask (B, P), positions = cumsum(mask) - 1
              -> one forward fills the cache (past_key_values) and gives logits (B, V) of the next token
    step:     chosen (B,) -> forward of (B, 1) with mask (B, P + t + 1), positions (B, 1)
              attention reads the cached keys/values of all earlier tokens: O(P + t) per new token
              instead of re-running the whole sequence (O((P + t)^2) attention, P + t MLP rows).

Left padding puts every row's next token in the last column, so one (B, 1) forward serves the whole
batch; position ids count real tokens only, so a padded row computes exactly what it would alone
(tests/test_generate.py checks batched == one at a time, and cached == recomputed).

``prefill`` and ``step`` are the reusable core (a server can drive them one step at a time);
``decode`` is the simple loop on top: sample, stop rows at an end token, stream, repeat.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lorakit.generate.sampling import Sampling, next_tokens


@dataclass
class DecodeState:
    """Everything one batch carries between steps."""

    cache: Any                      # the model's past_key_values (a transformers Cache)
    mask: torch.Tensor              # (B, L) 1 for real tokens (prompt + generated), 0 for padding
    positions: torch.Tensor         # (B,) position id the next token will get
    logits: torch.Tensor            # (B, V) scores for the next token
    done: torch.Tensor              # (B,) bool: the row met an end token
    tokens: list[list[int]] = field(default_factory=list)   # generated ids per row, end token excluded


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask), both (B, P), padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def prefill(model: nn.Module, prompts: list[list[int]], pad_id: int) -> DecodeState:
    """Run the prompts once, filling the KV cache."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    names = _forward_names(model)
    last = {"logits_to_keep": 1} if "logits_to_keep" in names else {}   # lm_head on the last column only
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last)
    return DecodeState(cache=_cache_of(out), mask=mask, positions=mask.sum(-1),
                       logits=out.logits[:, -1].float(), done=torch.zeros(len(prompts), dtype=torch.bool,
                                                                          device=device),
                       tokens=[[] for _ in prompts])


@torch.no_grad()
def step(model: nn.Module, state: DecodeState, chosen: torch.Tensor) -> DecodeState:
    """Feed each row's chosen token (B,), update the cache and the next-token logits in place."""
    state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)
    cache_arg = "cache" if "cache" in _forward_names(model) else "past_key_values"
    out = model(input_ids=chosen[:, None], attention_mask=state.mask,
                position_ids=state.positions[:, None], use_cache=True, **{cache_arg: state.cache})
    state.cache, state.logits = _cache_of(out), out.logits[:, -1].float()
    state.positions = state.positions + 1
    return state


def _forward_names(model: nn.Module) -> frozenset:
    """The model's forward keyword names: transformers 5 calls the KV cache ``cache`` (formerly
    ``past_key_values``) and can compute the LM head on the last ``logits_to_keep`` columns only."""
    return frozenset(inspect.signature(model.forward).parameters)


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def decode(model: nn.Module, prompts: list[list[int]], sampling: Sampling, stop_ids: set[int],
           pad_id: int, on_step: Callable[[DecodeState], None] | None = None) -> list[list[int]]:
    """Generated token ids for each prompt (end token excluded), at most ``max_new_tokens`` each.
    ``on_step(state)`` is called after every new token (streaming)."""
    was_training = model.training
    model.eval()
    try:
        state = prefill(model, prompts, pad_id)
        generator = None if sampling.greedy else sampling.generator(state.logits.device)
        stops = torch.tensor(sorted(stop_ids), device=state.logits.device)
        for t in range(sampling.max_new_tokens):
            chosen = next_tokens(state.logits, sampling, generator)
            ended = torch.isin(chosen, stops) & ~state.done
            for row in (~state.done & ~ended).nonzero().flatten().tolist():
                state.tokens[row].append(int(chosen[row]))
            state.done |= ended
            if on_step is not None:
                on_step(state)
            if bool(state.done.all()) or t == sampling.max_new_tokens - 1:
                break
            # finished rows keep stepping on a pad token (simplest shape-stable batch); ignored
            step(model, state, torch.where(state.done, torch.full_like(chosen, pad_id), chosen))
        return state.tokens
    finally:
        model.train(was_training)


def stop_ids(tokenizer, model: nn.Module | None = None) -> set[int]:
    """End-of-turn tokens: the tokenizer's eos and the model's generation_config eos (int or list)."""
    found = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    found |= set(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    return found


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0
