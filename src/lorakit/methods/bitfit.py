"""BitFit (Zaken et al. 2021): train only the bias terms, plus the task head.

    h = x W0^T + b          W0 frozen, b trains: every parameter named ``bias`` (linear layers and the
                            LayerNorm shifts beta)

|Theta| = the number of bias entries. For a BERT block of width d and FFN width d_ff: q, k, v, o
(4d) + FFN in (d_ff) + FFN out (d) + two LayerNorms (2d) = 7d + d_ff; the paper quotes 0.1M for
RoBERTa-base. The biases stay where they are, so "merging" is the model itself.
"""

from __future__ import annotations

from torch import nn

from lorakit.errors import LoraError
from lorakit.methods.method_files import MethodIO, check_head, train_only


def bias_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters() if name.rpartition(".")[2] == "bias"]


def apply_bitfit(model: nn.Module, spec) -> nn.Module:
    check_head(model, spec.head)
    names = bias_names(model)
    if not names:
        raise LoraError(f"{type(model).__name__} has no bias parameters, so BitFit would train "
                        "nothing; use another method (e.g. lora or ia3)")
    params = dict(model.named_parameters())
    train_only(model, [params[n] for n in names], spec.head)
    model.method_io = MethodIO("bitfit", spec, apply_bitfit,
                               base_shapes={n: tuple(params[n].shape) for n in names},
                               merge=lambda m: m)
    return model
