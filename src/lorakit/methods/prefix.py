"""Prefix-layer tuning (the LoRA paper's PreLayer; Li and Liang 2021): P learned positions in front of
the keys and values of every self-attention layer, which every query may attend to.

    mode "activation" (default, PreLayer):  H_p: (P, d) trains per layer,
        K = [H_p W_k^T + b_k ; X W_k^T + b_k],  V = [H_p W_v^T + b_v ; X W_v^T + b_v]   (B, P + T, d)
        |Theta| = L d P  =  L x d_model x (l_p + l_i) with l_p = P, l_i = 0 (no infix)
    mode "kv" (Li and Liang's key/value prefixes): K_p, V_p: (P, d) train per layer,
        K = [K_p ; X W_k^T + b_k],  V = [V_p ; X W_v^T + b_v],   |Theta| = 2 L d P

    attention mask (B, 1, T, T) -> (B, 1, T, P + T): the prefix columns are always visible, padded
    tokens stay masked as before (bool masks get True, additive float masks 0, 2-D masks 1).

``spec.r`` is the prefix length P; ``spec.extra["prefix_mode"]`` picks the mode. Unlike LoRA or
adapters, prefixes change the output at step 0 (every query now also attends to P new positions);
that is the method, not a bug. The prefixes start as standardised input-embedding rows of random
tokens ("real words", which Li and Liang found trains more stably than random vectors). Supported:
BERT-family self-attention of transformers 5 (BERT, MiniLM, RoBERTa, ...: query/key/value Linear).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lorakit.errors import LoraError
from lorakit.module_paths import replace_module
from lorakit.methods.method_files import MethodIO, check_head, train_only

MODES = ("activation", "kv")


class PrefixSelfAttention(nn.Module):
    """Replaces a BERT-style self-attention module; owns its query/key/value (state-dict keys stay)."""

    def __init__(self, attn: nn.Module, init: torch.Tensor, mode: str):
        super().__init__()
        self.query, self.key, self.value, self.dropout = attn.query, attn.key, attn.value, attn.dropout
        self.config, self.layer_idx = attn.config, getattr(attn, "layer_idx", None)
        self.is_causal = getattr(attn, "is_causal", False)       # sdpa reads it; an encoder is not causal
        self.num_attention_heads = attn.num_attention_heads
        self.attention_head_size = attn.attention_head_size
        self.scaling = attn.scaling
        source = sys.modules[type(attn).__module__]     # the model file's own attention functions
        self._functions, self._eager = source.ALL_ATTENTION_FUNCTIONS, source.eager_attention_forward
        self.mode = mode
        self.train(attn.training)                        # a new module starts in training mode
        if mode == "activation":
            self.prefix = nn.Parameter(init.clone())                    # (P, d)
        else:
            with torch.no_grad():
                self.prefix_key = nn.Parameter(self.key(init))         # (P, d)
                self.prefix_value = nn.Parameter(self.value(init))

    @property
    def length(self) -> int:
        return (self.prefix if self.mode == "activation" else self.prefix_key).shape[0]

    def prefix_key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "activation":
            return self.key(self.prefix), self.value(self.prefix)
        return self.prefix_key, self.prefix_value

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
        if past_key_values is not None:
            raise LoraError("prefix tuning here supports encoders (no key/value cache); call the model "
                            "without past_key_values")
        batch, tokens, _ = hidden_states.shape
        heads = (batch, -1, self.num_attention_heads, self.attention_head_size)
        pk, pv = self.prefix_key_value()                                    # (P, d)
        k, v = self.key(hidden_states), self.value(hidden_states)           # (B, T, d)
        k = torch.cat([pk.to(k.dtype).expand(batch, -1, -1), k], dim=1)     # (B, P + T, d)
        v = torch.cat([pv.to(v.dtype).expand(batch, -1, -1), v], dim=1)
        q = self.query(hidden_states).view(heads).transpose(1, 2)           # (B, H, T, d_h)
        k, v = k.view(heads).transpose(1, 2), v.view(heads).transpose(1, 2)  # (B, H, P + T, d_h)
        attention = self._functions.get_interface(self.config._attn_implementation, self._eager)
        out, weights = attention(self, q, k, v, extend_mask(attention_mask, self.length),
                                 dropout=self.dropout.p if self.training else 0.0,
                                 scaling=self.scaling, **kwargs)
        return out.reshape(batch, tokens, -1).contiguous(), weights


def extend_mask(mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """Prepend ``length`` always-visible key columns to an attention mask (..., keys)."""
    if mask is None:                                 # nothing masked: prefixes are visible too
        return None
    fill = True if mask.dtype == torch.bool else 0.0 if mask.is_floating_point() else 1
    return torch.cat([mask.new_full((*mask.shape[:-1], length), fill), mask], dim=-1)


def apply_prefix(model: nn.Module, spec) -> nn.Module:
    check_head(model, spec.head)
    mode = spec.extra.get("prefix_mode", "activation")
    if mode not in MODES:
        raise LoraError(f"prefix_mode={mode!r} is not supported; use one of {MODES}")
    if isinstance(spec.r, bool) or not isinstance(spec.r, int) or spec.r < 1:
        raise LoraError(f"r={spec.r!r} is the prefix length; use a positive integer, e.g. 8")
    targets = attention_modules(model)
    for name, attn in targets:
        init = real_word_rows(model, spec.r, attn.key.in_features)
        replace_module(model, name, PrefixSelfAttention(attn, init, mode))
    own = [p for n, p in model.named_parameters()
           if n.rpartition(".")[2] in ("prefix", "prefix_key", "prefix_value")]
    train_only(model, own, spec.head)
    shapes = {f"{name}.{proj}.weight": tuple(getattr(attn, proj).weight.shape)
              for name, attn in targets for proj in ("key", "value")}
    model.method_io = MethodIO("prefix", spec, apply_prefix, base_shapes=shapes)
    return model


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BERT-family self-attention modules: query/key/value Linear and the model file's attention
    functions (transformers 5)."""
    found = [(name, m) for name, m in model.named_modules() if name and _is_bert_self_attention(m)]
    if not found:
        raise LoraError(f"prefix tuning supports BERT-family self-attention (modules with query/"
                        f"key/value projections, e.g. BERT, MiniLM, RoBERTa); {type(model).__name__} "
                        "has none. Use lora, ia3 or the adapters for other architectures")
    return found


def _is_bert_self_attention(module: nn.Module) -> bool:
    source = sys.modules.get(type(module).__module__)
    return (type(module).__name__.endswith("SelfAttention")
            and all(isinstance(getattr(module, a, None), nn.Linear) for a in ("query", "key", "value"))
            and hasattr(source, "ALL_ATTENTION_FUNCTIONS") and hasattr(source, "eager_attention_forward"))


def real_word_rows(model: nn.Module, length: int, width: int) -> torch.Tensor:
    """(length, width): input-embedding rows of random tokens, standardised per row like a
    LayerNorm output (BERT's hidden states are LayerNorm outputs); N(0, 1) if there is no table."""
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(table, "weight", None)
    if weight is None or weight.shape[1] != width:
        return torch.randn(length, width)
    rows = weight.detach()[torch.randint(0, weight.shape[0], (length,))].float()
    return ((rows - rows.mean(-1, keepdim=True)) / (rows.std(-1, keepdim=True) + 1e-6)).to(weight.dtype)
