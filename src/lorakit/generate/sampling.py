"""Choosing the next token from logits: greedy, temperature, nucleus (top-p) sampling, seeded.

    temperature == 0:  next = argmax_v logits[v]                                      (greedy)
    temperature  > 0:  p = softmax(logits / temperature); keep the smallest set of the most likely
                       tokens whose mass reaches top_p (Holtzman et al. 2020, "The Curious Case of
                       Neural Text Degeneration"), renormalise, draw one with a seeded generator.

Shapes: logits (B, V) -> tokens (B,). Each row is sampled independently; one ``torch.Generator``
per decode makes a run repeatable for a given seed, batch composition and prompt order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.errors import LoraError


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0        # 0 = greedy
    top_p: float = 1.0              # nucleus mass kept; 1 = the whole distribution
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise LoraError(f"--max-new-tokens {self.max_new_tokens!r} must be a positive integer")
        if not self.temperature >= 0:
            raise LoraError(f"--temperature {self.temperature!r} must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise LoraError(f"--top-p {self.top_p!r} must be in (0, 1]; 1 keeps every token")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with everything outside each row's nucleus set to -inf. The most likely token is always
    kept, so a row never ends up empty."""
    if top_p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
    drop_sorted = mass_before >= top_p                  # the mass before it already reached top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) chosen token ids."""
    logits = logits.float()
    if sampling.greedy:
        return logits.argmax(-1)
    probs = top_p_filter(logits / sampling.temperature, sampling.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
