"""The three built-in task models as benchmark subjects, and one training-step closure per configuration.

    minilm   all-MiniLM-L6-v2 (BERT, 6 layers, d 384) + 2-class head, batch 16 x 128 tokens,
             LoRA on query, value (the LoRA paper's choice), head trained
    whisper  the gw task's Whisper tiny.en encoder (4 layers, d 384) on 3 detectors x 80 mels x 128
             frames -> 64 positions, batch 32 (the demo's), LoRA on q, k, v, head trained
    smollm2  SmolLM2-135M (Llama, 30 layers, d 576), causal LM, batch 2 x 128 tokens, LoRA on
             q_proj, v_proj

Configurations (LoRA r = 8, alpha = 16, dropout 0 unless "-drop", B ~ N(0, 0.02) so the low-rank
path is not trivially zero). Under bf16, lorakit, eager, compiled and floor run as ``lorakit train``
runs them: the frozen base resident in bf16 (``lorakit.train.precision``). PEFT gets the model as loaded.
    lorakit   the path lorakit picks by default (``LoraLinear.takes_fused_path``)
    eager     lorakit's eager reference layer (``use_fused(False)``), otherwise the same as lorakit
    fused     the fused function with the fp32 base under autocast (without the resident bf16 base)
    compiled  ``lorakit`` with each repeated block compiled (regional ``torch.compile``)
    peft      PEFT LoRA, same targets, rank, head, dropout
    floor     the frozen base: forward, then backward for the input gradient only (no weight grads)
    full      every weight trains
A step is forward, loss, backward, fused AdamW (lr 1e-4; the same optimizer for every configuration)
and zero_grad (the floor has no optimizer).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("minilm", "whisper", "smollm2")
CONFIGS = ("lorakit", "eager", "fused", "compiled", "peft", "floor", "full", "lorakit-drop", "peft-drop")


@dataclass
class Subject:
    model: nn.Module
    batch: dict
    loss: Callable[[nn.Module, dict], torch.Tensor]
    targets: list[str]
    head: list[str]
    stem: nn.Module           # whose output the floor's input gradient is taken at
    blocks: list[nn.Module]   # the repeated blocks (regional compile)


def subject(name: str, small: bool = False) -> Subject:
    """A fresh model and its fixed batch; the same seed gives every configuration the same weights.
    ``small``: a 2-row batch (and 32 tokens), for trying a configuration out quickly."""
    rows = 2 if small else None
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "minilm":
        from lorakit.models import registry
        model = registry.load("minilm", task="classification", num_labels=2).model
        batch = {"input_ids": torch.randint(1000, 30000, (rows or 16, 32 if small else 128), generator=g),
                 "labels": torch.randint(0, 2, (rows or 16,), generator=g)}
        return Subject(model, batch, lambda m, b: F.cross_entropy(
            m(input_ids=b["input_ids"]).logits.float(), b["labels"]), ["query", "value"],
            ["classifier"], model.bert.embeddings, list(model.bert.encoder.layer))
    if name == "whisper":
        from lorakit.models.whisper import load_whisper_encoder
        from lorakit.tasks.gw import N_FRAMES, WhisperDetector
        encoder = load_whisper_encoder("tiny.en", max_frames=N_FRAMES)
        model = WhisperDetector(encoder, encoder.config.d_model)
        batch = {"features": torch.randn(rows or 32, 3, 80, N_FRAMES, generator=g),
                 "labels": torch.randint(0, 2, (rows or 32,), generator=g).float()}
        return Subject(model, batch, lambda m, b: F.binary_cross_entropy_with_logits(
            m(b["features"]).float(), b["labels"]), ["q_proj", "k_proj", "v_proj"], ["classifier"],
            encoder.conv2, list(encoder.layers))
    if name == "smollm2":
        from lorakit.models import registry
        model = registry.load("smollm2", task="causal-lm").model
        ids = torch.randint(100, 40000, (rows or 2, 32 if small else 128), generator=g)

        def lm_loss(m, b):
            logits = m(input_ids=b["input_ids"]).logits[:, :-1].float()
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["input_ids"][:, 1:].reshape(-1))
        return Subject(model, {"input_ids": ids}, lm_loss, ["q_proj", "v_proj"], [],
                       model.model.embed_tokens, list(model.model.layers))
    raise ValueError(f"unknown model {name!r}; one of {MODELS}")


def _randomise_b(model: nn.Module, marker: str) -> None:
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if marker in pname:
                p.normal_(std=0.02)


def add_lorakit(s: Subject, dropout: float = 0.0) -> nn.Module:
    import lorakit
    torch.manual_seed(1)
    cfg = lorakit.LoraConfig(r=8, alpha=16, target_modules=s.targets, dropout=dropout,
                             modules_to_save=s.head or None)
    model = lorakit.apply_lora(s.model, cfg)
    _randomise_b(model, ".lora.default.B")
    return model


def add_peft(s: Subject, dropout: float = 0.0) -> nn.Module:
    import peft
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=s.targets, lora_dropout=dropout,
                          modules_to_save=s.head or None)
    model = peft.get_peft_model(s.model, cfg)
    _randomise_b(model, "lora_B")
    return model


def _floor_hook(module, args, output):
    """The stem's output becomes a leaf that wants its gradient: backward runs through every block
    for the input gradient, and no weight gradient is formed (every weight is frozen)."""
    out = output[0] if isinstance(output, tuple) else output
    leaf = out.detach().requires_grad_(True)
    return (leaf, *output[1:]) if isinstance(output, tuple) else leaf


def build(model_name: str, config: str, precision: str, small: bool = False,
          ) -> tuple[Callable[[], None], dict]:
    """(step function, info) for one configuration; info has trainable params and compile time."""
    from lorakit.layers import use_fused
    from lorakit.train.precision import frozen_in_dtype
    s = subject(model_name, small)
    dropout = 0.1 if config.endswith("-drop") else 0.0
    base = config.removesuffix("-drop")
    if base == "full":
        model = s.model.requires_grad_(True)
    elif base == "floor":
        model = s.model.requires_grad_(False)
        s.stem.register_forward_hook(_floor_hook)
    elif base == "peft":
        model = add_peft(s, dropout)
    else:
        model = add_lorakit(s, dropout)
    model.train()
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    if precision == "bf16" and base in ("lorakit", "eager", "compiled", "floor"):
        frozen_in_dtype(model, torch.bfloat16).__enter__()      # for the whole process
    fused = (lambda: use_fused(False)) if base == "eager" else nullcontext
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW for every configuration, as ``lorakit train`` uses it (train/loop.py)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
    info = {"trainable_params": sum(p.numel() for p in params), "compile_s": 0.0}
    if base == "compiled":
        for block in s.blocks:
            block.compile()

    def step():
        with fused():
            with amp():
                loss = s.loss(model, s.batch)
            loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if base == "compiled":
        start = time.perf_counter()
        step()
        info["compile_s"] = time.perf_counter() - start
    if base == "lorakit":
        info["fused_share"] = fused_share(model, step)
    return step, info


def fused_share(model: nn.Module, step: Callable[[], None]) -> float:
    """The share of LoRA layer calls in one step that took the fused path by default (1.0: all fused,
    0.0: the default is the eager reference itself at this shape and precision)."""
    from lorakit.layers import LoraLinear
    calls = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: calls.append(mod.takes_fused_path(args[0])))
             for m in model.modules() if isinstance(m, LoraLinear)]
    try:
        step()
    finally:
        for h in hooks:
            h.remove()
    return sum(calls) / max(len(calls), 1)


def flops_per_step(step: Callable[[], None]) -> int:
    """Matmul and attention FLOPs of one step (FlopCounterMode; elementwise work counts 0)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()
