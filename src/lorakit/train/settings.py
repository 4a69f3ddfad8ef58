"""TrainSettings: every knob of one training run, with the defaults a task can override."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from lorakit.errors import LoraError

PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainSettings:
    lr: float = 1e-3
    head_lr: float | None = None      # the new task head's lr (None: lr); full FT wants a larger one
    optimizer: str = "adamw"          # "adamw", or "sgd" (as in the LoRALinear MNIST notebook)
    momentum: float = 0.0             # for sgd
    batch_size: int = 32
    max_steps: int = 200              # optimizer steps
    grad_accum: int = 1               # micro-batches per optimizer step
    warmup_frac: float = 0.06         # share of max_steps with linear warmup
    schedule: str = "cosine"          # decay after warmup
    weight_decay: float = 0.01
    grad_clip: float = 1.0            # max global grad norm; 0 disables
    precision: str = "bf16"           # bf16 autocast (about 3x faster on AMX CPUs and on GPUs)
    eval_every: int = 25
    patience: int = 0                 # evals without improvement before stopping; 0 = never
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 0         # optimizer steps; 0 = only at the end
    keep_checkpoints: int = 2
    skip_nonfinite: bool = False      # skip a batch whose loss is NaN/inf instead of stopping
    compile: bool = False             # torch.compile the model's forward (and its backward) in train

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise LoraError(f"precision={self.precision!r}; choose one of {PRECISIONS}")
        if self.optimizer not in OPTIMIZERS:
            raise LoraError(f"optimizer={self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise LoraError(f"schedule={self.schedule!r}; choose one of {SCHEDULES}")
        for name in ("batch_size", "max_steps", "grad_accum", "eval_every"):
            if getattr(self, name) < 1:
                raise LoraError(f"{name}={getattr(self, name)!r} must be at least 1")
        if not self.lr > 0 or (self.head_lr is not None and not self.head_lr > 0):
            raise LoraError(f"lr={self.lr!r}, head_lr={self.head_lr!r} must be positive")

    def replace(self, **changes) -> "TrainSettings":
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise LoraError(f"unknown training settings {sorted(unknown)}; known: {sorted(known)}")
        return TrainSettings(**{**asdict(self), **{k: v for k, v in changes.items() if v is not None}})

    def to_dict(self) -> dict:
        return asdict(self)
