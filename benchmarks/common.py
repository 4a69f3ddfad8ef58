"""What every benchmark shares: the model (pretrained MiniLM-L6 classifier), the batch, the adapters.

Model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params) with a 2-class head, loaded offline
by ``lorakit.models.load("minilm")``. Batch: 16 sequences x 128 tokens of random ids. LoRA: r = 8,
alpha = 16 on query and value, the classifier head trained (modules_to_save) in both libraries.
``--device cuda`` (train_step.py, inference.py, run.py) builds everything on the CPU, then moves it.
"""

from __future__ import annotations

import resource
import time

import torch

BATCH, SEQ = 16, 128
TARGETS = ["query", "value"]


def load_model():
    from lorakit.models import registry
    torch.manual_seed(0)
    return registry.load("minilm", task="classification", num_labels=2).model


def batch(seed: int = 0, device: str | torch.device = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 30000, (BATCH, SEQ), generator=g).to(device),
            "labels": torch.randint(0, 2, (BATCH,), generator=g).to(device)}


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:i``; a CUDA device torch cannot see stops the run with the reason."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA device "
                         "(torch.cuda.is_available() is False); run on a GPU machine or use --device cpu")
    return device


def add_lorakit(model, name: str = "default", dropout: float = 0.0, seed: int = 0, head: bool = True):
    import lorakit
    torch.manual_seed(seed)
    cfg = lorakit.LoraConfig(r=8, alpha=16, target_modules=TARGETS, dropout=dropout,
                             modules_to_save=["classifier"] if head else None)
    if lorakit.state.has_lora(model):
        lorakit.add_adapter(model, name, cfg)
    else:
        lorakit.apply_lora(model, cfg, adapter_name=name)
    with torch.no_grad():     # B = 0 at init would make the unmerged path trivially cheap to check
        for pname, p in model.named_parameters():
            if f".lora.{name}.B" in pname:
                p.normal_(std=0.02)
    return model


def add_peft(model, dropout: float = 0.0):
    import peft
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=dropout,
                          modules_to_save=["classifier"])
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(std=0.02)
    return model


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def timed(fn) -> float:
    """Seconds fn() takes; once CUDA is in use, its queued work is waited for before and after."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])
