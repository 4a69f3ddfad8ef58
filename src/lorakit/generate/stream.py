"""Printing tokens as they are generated, and generating for many prompts in batches.

Streaming decodes the whole answer so far and prints only the new suffix: a token can be part of a
multi-byte character or a word piece, so decoding tokens one by one would print broken text.
"""

from __future__ import annotations

import sys
from typing import TextIO

from torch import nn

from lorakit.generate.decode import DecodeState, decode, pad_id, stop_ids
from lorakit.generate.prompts import encode_prompt, prompt_text
from lorakit.generate.sampling import Sampling


class TextStreamer:
    """``on_step`` callback for ``decode`` that writes row ``row``'s new text to ``out``."""

    def __init__(self, tokenizer, out: TextIO | None = None, row: int = 0):
        self.tokenizer, self.out, self.row, self.shown = tokenizer, out or sys.stdout, row, ""

    def __call__(self, state: DecodeState) -> None:
        text = self.tokenizer.decode(state.tokens[self.row], skip_special_tokens=True)
        if text.endswith("\ufffd"):          # an incomplete UTF-8 sequence: wait for the next token
            return
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
        self.shown = text


def generate_texts(model: nn.Module, tokenizer, prompts: list, sampling: Sampling,
                   batch_size: int = 8, use_chat: bool = True, progress=None) -> list[str]:
    """Answers to ``prompts`` (strings or message lists), generated ``batch_size`` at a time.

    Prompts are sorted by length before batching, so a batch pads little, and answers come back in
    the input order. ``progress``: an optional tqdm-like bar, advanced per prompt."""
    ids = [encode_prompt(tokenizer, prompt_text(tokenizer, p, use_chat)) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    stops, pad = stop_ids(tokenizer, model), pad_id(tokenizer)
    answers: list[str] = [""] * len(ids)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        out = decode(model, [ids[i] for i in rows], sampling, stops, pad)
        for i, tokens in zip(rows, out):
            answers[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        if progress is not None:
            progress.update(len(rows))
    return answers


def stream_one(model: nn.Module, tokenizer, prompt, sampling: Sampling, use_chat: bool = True,
               out: TextIO | None = None) -> str:
    """Generate one answer, printing it as it grows; return the full text."""
    ids = encode_prompt(tokenizer, prompt_text(tokenizer, prompt, use_chat))
    streamer = TextStreamer(tokenizer, out)
    tokens = decode(model, [ids], sampling, stop_ids(tokenizer, model), pad_id(tokenizer), streamer)[0]
    return tokenizer.decode(tokens, skip_special_tokens=True)
