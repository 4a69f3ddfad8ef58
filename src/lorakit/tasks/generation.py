"""Evaluating a causal LM on a text-generation task: teacher-forced loss, greedy decoding, BLEU.

Decoding runs on a throw-away inference copy of the model: LoRA merged into the weights (the paper's
zero-latency deployment form, and no extra matmuls per generated token) and, under bf16, the weights
cast to bf16 once, instead of autocast re-casting every weight at every generated token.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from lorakit.inject import merge_and_unload
from lorakit.state import has_lora
from lorakit.train.data import TensorData, eval_batches


def teacher_forced_loss(task, model: nn.Module, data: TensorData, device) -> float:
    """The task's loss over ``data``, averaged per target token (not per batch)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(data, 16):
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += task.loss(task.forward(model, batch), batch).item() * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def inference_copy(model: nn.Module, precision: str) -> nn.Module:
    """A copy for decoding: LoRA merged and unloaded, bf16 weights when precision is bf16."""
    fast = copy.deepcopy(model)
    if has_lora(fast):
        fast = merge_and_unload(fast)
    if precision == "bf16":
        fast = fast.to(torch.bfloat16)
    return fast.eval()


def greedy_decode(model: nn.Module, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                  device, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuation of each left-padded prompt (N, P), stopped at the tokenizer's eos token
    (or after ``max_new_tokens``), decoded to text without special tokens. Pass an
    ``inference_copy``: ``model`` runs as it is, in its own dtype.

    Batched through ``generate`` with its KV cache: each new token costs one forward of (batch, 1)."""
    from transformers import GenerationConfig     # deferred: heavy optional dependency
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    fast = model.eval()
    texts = []
    with torch.no_grad():
        for start in range(0, len(prompt_ids), batch_size):
            mask = prompt_mask[start:start + batch_size]
            width = int(mask.sum(1).max())          # left-padded: keep the last `width` columns
            ids, mask = prompt_ids[start:start + batch_size, -width:], mask[:, -width:]
            out = fast.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                generation_config=config)
            texts += tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
    return [text.strip() for text in texts]


def corpus_bleu(hypotheses: list[str], references: Sequence[Sequence[str]]) -> float:
    """sacreBLEU corpus BLEU (0-100, default 13a tokenisation), each hypothesis against all of its
    references; the number of references may differ between hypotheses."""
    import sacrebleu     # deferred: heavy optional dependency
    most = max(len(r) for r in references)
    streams = [[r[i] if i < len(r) else None for r in references] for i in range(most)]
    return sacrebleu.corpus_bleu(hypotheses, streams).score
