"""Mixed-adapter batches (layers/mixed.py, lorakit.mixed_adapters): one adapter per batch row.

Invariant: row i of a mixed batch equals running row i alone with its adapter active, and a row with
None equals the bare base model. fp32, max |diff| <= 1e-5 (summation order only).
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_bert

transformers = pytest.importorskip("transformers")


def _bert_with_adapters():
    torch.manual_seed(0)
    model = tiny_bert().eval()
    lorakit.apply_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["query", "value"]),
                       adapter_name="a")
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(r=8, alpha=8, target_modules=["query", "value"]))
    lorakit.add_adapter(model, "c", lorakit.LoraConfig(r=2, alpha=4, target_modules=["value", "dense"]))
    randomize_adapters(model, std=0.3)
    return model


def _gpt2_with_adapters():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    model = transformers.GPT2Model(config).eval()
    lorakit.apply_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["c_attn"]),
                       adapter_name="a")
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(r=4, alpha=16, target_modules=["c_attn", "c_fc"]))
    randomize_adapters(model, std=0.3)
    return model


@pytest.mark.parametrize("build", [_bert_with_adapters, _gpt2_with_adapters])
def test_each_row_equals_its_adapter_alone(build):
    model = build()
    names = sorted(lorakit.list_adapters(model))
    rows = names + [None] + names[::-1]
    ids = torch.randint(0, 100, (len(rows), 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), lorakit.mixed_adapters(model, rows):
        mixed = model(ids).last_hidden_state
    with torch.no_grad():
        for i, name in enumerate(rows):
            if name is None:
                with lorakit.disable_adapter(model):
                    alone = model(ids[i:i + 1]).last_hidden_state
            else:
                lorakit.set_adapter(model, name)
                alone = model(ids[i:i + 1]).last_hidden_state
            assert (mixed[i] - alone[0]).abs().max().item() <= 1e-5, (i, name)
        # the adapters really differ, so a wrong gather would be caught
        lorakit.set_adapter(model, names[0])
        first = model(ids[:1]).last_hidden_state
        lorakit.set_adapter(model, names[1])
        assert (model(ids[:1]).last_hidden_state - first).abs().max() > 1e-3


def test_mixed_mode_ends_with_the_block_and_keeps_the_active_adapter():
    model = _bert_with_adapters()
    lorakit.set_adapter(model, "b")
    ids = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        before = model(ids).last_hidden_state
        with lorakit.mixed_adapters(model, ["a", None]):
            pass
        after = model(ids).last_hidden_state
    assert torch.equal(before, after)
    assert all(layer.row_adapters is None for _, layer in lorakit.lora_layers(model))


def test_mixed_batch_under_autocast_matches_each_row_alone_in_values_and_grads():
    """Under bf16 autocast each row (and each adapter's gradient) must equal running that row alone
    with its adapter active under the same autocast, up to bf16 rounding: outputs within 0.05 (the
    adapters move these rows by 0.3 or more, checked below), gradients within 5% of their largest entry
    (measured 2%). A wrong gather, a dropped delta or gradients sent to the wrong adapter are all off by
    100%."""
    model = _bert_with_adapters()
    for name, p in model.named_parameters():       # every adapter trains here, not only the active one
        p.requires_grad_(".lora." in name)
    rows = ["a", "b", None, "c"]
    ids = torch.randint(0, 100, (4, 5), generator=torch.Generator().manual_seed(3))
    # a fixed random weighting: the plain sum of a LayerNorm output has a near-zero gradient
    weight = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))

    def lora_grads():
        grads = {n: p.grad.clone() for n, p in model.named_parameters()
                 if ".lora." in n and p.grad is not None}
        model.zero_grad(set_to_none=True)
        return grads

    with lorakit.mixed_adapters(model, rows), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(ids).last_hidden_state
    (mixed.float() * weight).sum().backward()
    mixed_grads = lora_grads()
    for i, name in enumerate(rows):
        with torch.no_grad(), lorakit.disable_adapter(model):
            base = model(ids[i:i + 1]).last_hidden_state[0]
        if name is None:
            with torch.no_grad(), lorakit.disable_adapter(model), \
                    torch.autocast("cpu", dtype=torch.bfloat16):
                alone = model(ids[i:i + 1]).last_hidden_state[0]
        else:
            lorakit.set_adapter(model, name)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                alone = model(ids[i:i + 1]).last_hidden_state[0]
            (alone.float() * weight).sum().backward()     # set_adapter made `name` the trainable one
            assert (alone.float() - base).abs().max() > 0.25, (i, name)  # the adapter moves this row
        assert (mixed[i].float() - alone.float()).abs().max().item() <= 0.05, (i, name)
    row_grads = lora_grads()
    assert mixed_grads.keys() == row_grads.keys() and len(row_grads) == 32
    for key, expected in row_grads.items():
        err = (mixed_grads[key] - expected).abs().max() / expected.abs().max()
        assert err <= 0.05, (key, err.item())


def test_bad_calls_are_refused_before_anything_changes(tiny):
    model = _bert_with_adapters()
    with pytest.raises(lorakit.LoraError, match="no adapter named 'zzz'"):
        lorakit.set_row_adapters(model, ["a", "zzz"])
    with pytest.raises(lorakit.LoraError, match="empty"):
        lorakit.set_row_adapters(model, [])
    assert all(layer.row_adapters is None for _, layer in lorakit.lora_layers(model))
    with lorakit.mixed_adapters(model, ["a", "b"]):
        with pytest.raises(lorakit.LoraError, match="3 rows"):
            model(torch.randint(0, 100, (3, 5)))
    lorakit.set_adapter(model, "a")
    lorakit.merge_lora(model)
    with pytest.raises(lorakit.LoraError, match="merged"):
        lorakit.set_row_adapters(model, ["a"])
    lorakit.unmerge_lora(model)
    lorakit.add_adapter(model, "d", lorakit.LoraConfig(r=2, target_modules=["query"], dropout=0.1))
    model.train()
    with pytest.raises(lorakit.LoraError, match="model.eval"):
        lorakit.set_row_adapters(model, ["d"])
    lorakit.apply_lora(tiny, lorakit.LoraConfig(r=2, target_modules=["embed", "query"]))
    with pytest.raises(lorakit.LoraError, match="LoraEmbedding"):
        lorakit.set_row_adapters(tiny, ["default"])
