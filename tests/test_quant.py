"""Quantized bases under LoRA (QLoRA): error bounds, zero delta, gradients, merges, files, bad input.

A tiny random Llama (2 layers, hidden 64, vocab 128; no download) in fp32. Reference models use the
dequantized weights as plain dense Parameters, so "the same model" is exact, not approximate.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn

import lorakit
from lorakit.layers import is_quantized
from lorakit.quant import (NF4_HALF_GAP, QuantizedWeight, check_frozen, dequantize_base,
                           load_quantized, plan_quantize, quantize_as_recorded, quantize_weight,
                           save_quantized, weight_memory)
from lorakit.quant.formats import nf4_block_scales

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, tie: bool = False, hidden: int = 64):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


def ids(seed: int = 1, b: int = 2, t: int = 12):
    return torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None):
    with torch.no_grad():
        return model(ids() if x is None else x).logits


def lora(model, r: int = 4, seed: int = 0, randomize: bool = True):
    lorakit.apply_lora(model, lorakit.LoraConfig(r=r, alpha=8, target_modules=TARGETS))
    if randomize:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora." in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def dense_copy(model):
    """The same model with every quantized weight replaced by its dequantized dense value."""
    return dequantize_base(copy.deepcopy(model))


# --- the formats ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dist", ["normal", "student-t"])
def test_nf4_error_within_table_bound(dist):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 192, generator=gen) * 0.02
    if dist == "student-t":           # heavy tails: a few large weights per block, as in real LLMs
        w = w / torch.rand(w.shape, generator=gen).clamp_min(0.05)
    q = quantize_weight(w, "nf4", block_size=64, double_quant=True)
    deq = q.dequantize()
    s_true = w.reshape(-1, 64).abs().amax(1)
    s_stored = nf4_block_scales(q.qdata, q.meta)
    spread = (s_true - s_true.mean()).view(-1, q.meta["scaler_block"]).abs().amax(1)
    # the double-quantized scale is within one int8 step of the true absmax
    assert ((s_stored - s_true).abs().view(len(spread), -1) <= spread[:, None] / 128 + 1e-7).all()
    # |w - w~| <= h s + |s - s~| elementwise (formats.py)
    bound = NF4_HALF_GAP * s_true + (s_stored - s_true).abs()
    err = (deq - w).abs().reshape(-1, 64)
    assert (err <= bound[:, None] * (1 + 1e-5) + 1e-8).all()
    assert err.max() > 0.5 * (bound.max() if dist == "normal" else 0)   # the bound is not vacuous
    rel = float((deq - w).norm() / w.norm())
    assert 0.03 < rel < 0.15, rel          # NF4's usual 4-bit error
    assert 8 * q.storage_bytes() / w.numel() == pytest.approx(4.127, abs=0.01)


def test_nf4_matches_torchao_dequantization():
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(512, 1024, generator=gen) / torch.rand(512, 1024, generator=gen).clamp_min(0.05)
    q = quantize_weight(w, "nf4")
    assert torch.equal(q.dequantize(), to_nf4(w, 64, 256).get_original_weight())


def test_nf4_zero_block_and_fp32_scales():
    w = torch.randn(64, 64)
    w[0] = 0                                   # a block of zeros (w / absmax = 0 / 0)
    for dq in (True, False):
        q = quantize_weight(w, "nf4", double_quant=dq)
        deq = q.dequantize()
        assert torch.isfinite(deq).all() and (deq[0] == 0).all()
    assert 8 * q.storage_bytes() / w.numel() == pytest.approx(4.5)


def test_int8_error_half_a_step():
    w = torch.randn(96, 80) * torch.linspace(0.01, 1, 96)[:, None]
    q = quantize_weight(w, "int8")
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-7).all()
    assert q.qdata["codes"].dtype == torch.int8


def test_quantized_weight_behaves_like_a_frozen_tensor():
    lin = nn.Linear(64, 32)
    q = quantize_weight(lin.weight, "nf4")
    lin.weight = nn.Parameter(q, requires_grad=False)
    assert isinstance(lin.weight, QuantizedWeight) and lin.weight.shape == (32, 64)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = lin(x)
    ref = torch.nn.functional.linear(x, q.dequantize(), lin.bias)
    assert torch.equal(y, ref)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert torch.allclose(g, g_ref, atol=1e-6)
    lin.to(torch.bfloat16)                       # dtype changes what it dequantizes to, not storage
    assert lin.weight.dtype == torch.bfloat16 and lin.weight.qdata["codes"].dtype == torch.uint8
    assert lin(x.detach().bfloat16()).dtype == torch.bfloat16
    assert isinstance(copy.deepcopy(lin).weight, QuantizedWeight)
    with pytest.raises(lorakit.LoraError, match="frozen"), torch.no_grad():
        lin.weight.copy_(torch.zeros(32, 64))


def test_forward_keeps_only_the_quantized_weight_for_backward():
    lin = nn.Linear(256, 512, bias=False)
    lin.weight = nn.Parameter(quantize_weight(lin.weight, "nf4"), requires_grad=False)
    x = torch.randn(8, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lin(x)
    assert not any(t.numel() >= lin.weight.numel() for t in saved)     # no dense W saved
    assert y.grad_fn.weight is lin.weight                              # the 4-bit storage is


# --- quantize_base ---------------------------------------------------------------------------------
def test_quantize_base_plan_keeps_head_embeddings_and_unfit_layers():
    model = tiny_llama()
    model.model.extra = nn.Linear(10, 7)        # 70 weights: no 64-blocks -> kept, with the reason
    before = weight_memory(model)
    plan = plan_quantize(model, "nf4")
    kept = {r.name: r.reason for r in plan.kept}
    assert "lm_head" in kept and "model.extra" in kept and "block_size=64" in kept["model.extra"]
    lorakit.quantize_base(model, "nf4")
    names = {n for n, p in model.named_parameters() if is_quantized(p)}
    assert len(names) == 2 * len(TARGETS) and all(not p.requires_grad for p in model.parameters()
                                                  if is_quantized(p))
    assert not is_quantized(model.lm_head.weight) and not is_quantized(model.model.extra.weight)
    assert not is_quantized(model.model.embed_tokens.weight)
    record = model.__dict__["_lorakit_quant"]
    assert record["scheme"] == "nf4" and record["double_quant"] and "model.extra" in record["kept_modules"]
    after = weight_memory(model)
    assert after["Linear"]["bytes"] < 0.6 * before["Linear"]["bytes"]      # lm_head stays fp32
    assert after["Embedding"] == before["Embedding"]


def test_lora_over_nf4_is_zero_delta_at_init():
    model = lorakit.quantize_base(tiny_llama(), "nf4")
    base = logits(model)
    lora(model, randomize=False)
    assert torch.equal(logits(model), base)


@pytest.mark.parametrize("autocast", [False, True])
def test_lora_gradients_match_dense_reference(autocast):
    model = lora(lorakit.quantize_base(tiny_llama(), "nf4"))
    ref = dense_copy(model)
    assert not any(is_quantized(p) for p in ref.parameters())
    x = ids(b=3, t=16)
    grads = []
    for m in (model, ref):
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = m(x, labels=x).loss
        loss.backward()
        grads.append({n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 4 * len(TARGETS)
    for name, g in grads[0].items():
        tol = 2e-2 if autocast else 1e-4
        assert torch.allclose(g, grads[1][name], rtol=tol, atol=tol * g.abs().max()), name


def test_quantizing_after_lora_equals_quantizing_before():
    before = lora(lorakit.quantize_base(tiny_llama(), "nf4"))
    after = lorakit.quantize_base(lora(tiny_llama()), "nf4")
    layer = after.model.layers[1].mlp.down_proj
    assert is_quantized(layer.weight) and layer.base_layer.weight is layer.weight
    assert torch.equal(logits(before), logits(after))


def test_int8_base_trains_lora():
    model = lora(lorakit.quantize_base(tiny_llama(), "int8"))
    assert all(p.qdata["codes"].dtype == torch.int8 for p in model.parameters() if is_quantized(p))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = ids(b=4, t=16)
    losses = []
    for _ in range(5):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# --- merging -----------------------------------------------------------------------------------------
def test_merge_unmerge_on_quantized_layer_is_exact():
    model = lora(lorakit.quantize_base(tiny_llama(), "nf4"))
    layer = model.model.layers[0].self_attn.q_proj
    wq = layer.weight
    out = logits(model)
    lorakit.merge_lora(model)
    assert not is_quantized(layer.weight)                  # dense W = dequant(Wq) + s B A
    assert torch.allclose(logits(model), out, atol=1e-5)
    lorakit.unmerge_lora(model)
    assert layer.weight is wq and torch.equal(logits(model), out)   # the very same 4-bit weight back


def test_default_merge_and_unload_is_exact_and_dense():
    model = lora(lorakit.quantize_base(tiny_llama(), "nf4"))
    out = logits(model)
    plain = lorakit.merge_and_unload(model)
    assert not any(is_quantized(p) for p in plain.parameters())
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert torch.allclose(logits(plain), out, atol=1e-5)
    assert "_lorakit_quant" not in plain.__dict__


def test_requantized_merge_reports_and_refuses_above_threshold(capsys):
    model = lora(lorakit.quantize_base(tiny_llama(), "nf4"))
    out = logits(model)
    with pytest.raises(lorakit.LoraError, match="refusing the requantized merge"):
        lorakit.merge_and_unload(model, requantize=True, threshold=0.0)
    assert "max |logit diff|" in capsys.readouterr().out
    assert torch.equal(logits(model), out) and len(lorakit.lora_layers(model)) == 2 * len(TARGETS)
    merged = lorakit.merge_and_unload(model, requantize=True, threshold=0.0, force=True, probe=ids())
    report = merged.__dict__["_lorakit_merge"]
    assert 0 < report["rel_weight_error"] < 0.2 and report["max_logit_diff"] > 0
    assert 0 < report["lost_update"] and len(report["layers"]) == 2 * len(TARGETS)
    assert all(is_quantized(merged.get_submodule(f"model.layers.0.self_attn.{t}").weight)
               for t in ("q_proj", "v_proj"))
    assert not lorakit.lora_layers(merged)
    diff = (logits(merged) - out).abs().max().item()
    assert diff == pytest.approx(report["max_logit_diff"], rel=1e-4, abs=1e-6)


# --- files -------------------------------------------------------------------------------------------
def test_adapter_trained_on_nf4_loads_on_plain_base(tmp_path):
    model = lora(lorakit.quantize_base(tiny_llama(), "nf4"), randomize=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids(b=4, t=16)
    for _ in range(3):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lorakit.save_adapter(model, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lorakit"])
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    assert meta["quantized_base"]["scheme"] == "nf4" and meta["quantized_base"]["block_size"] == 64
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    plain = lorakit.load_adapter(tiny_llama(), tmp_path / "adapter")     # the unquantized base
    trained = dict(model.named_parameters())
    for name, p in plain.named_parameters():
        if ".lora." in name:
            assert torch.equal(p, trained[name]), name
    # on the plain base the adapter sees W instead of dequant(Wq): close, not equal
    assert (logits(plain) - logits(model)).abs().max() < 0.5
    import peft
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    assert torch.allclose(logits(theirs), logits(plain), atol=1e-5)       # PEFT reads it the same


def test_quantized_model_saves_and_reloads(tmp_path):
    model = lorakit.quantize_base(tiny_llama(tie=True), "nf4")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_quantized(model, tmp_path / "q")
    fresh = load_quantized(tiny_llama(seed=5, tie=True), tmp_path / "q")
    assert torch.equal(logits(fresh), logits(model))
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert is_quantized(a) == is_quantized(b), n
        if is_quantized(a):
            assert all(torch.equal(a.qdata[k], b.qdata[k]) for k in a.qdata)
    assert fresh.__dict__["_lorakit_quant"]["scheme"] == "nf4"


# --- embeddings (quantize_base(..., embeddings=True)) -----------------------------------------------
EMBED_SCHEMES = [("nf4", {"double_quant": True}), ("nf4", {"double_quant": False}), ("int8", {})]


@pytest.mark.parametrize("scheme,settings", EMBED_SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_lookup_dequantizes_only_the_rows_it_reads(scheme, settings, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(256, 128, generator=gen) / torch.rand(256, 128, generator=gen).clamp_min(0.05))
    q = quantize_weight(w.to(dtype), scheme, **settings)
    x = torch.randint(0, 256, (3, 7), generator=gen)
    ref = torch.nn.functional.embedding(x, q.dequantize())
    with monkeypatch.context() as m:             # no whole-table dequantization on the way
        m.setattr(QuantizedWeight, "dequantize", lambda *a, **k: pytest.fail("dequantized all"))
        table = nn.Embedding(256, 128, padding_idx=0)
        table.weight = nn.Parameter(q, requires_grad=False)
        out = table(x)
    assert out.dtype == dtype and out.shape == (3, 7, 128)
    assert torch.equal(out, ref)                                   # the same bits
    assert torch.equal(torch.nn.functional.embedding(x[0], q), ref[0])


def test_embedding_lookup_rows_not_whole_blocks_and_max_norm():
    q = quantize_weight(torch.randn(64, 96), "nf4")        # 96 values a row: 1.5 blocks of 64
    x = torch.tensor([[5, 63, 0]])
    assert torch.equal(torch.nn.functional.embedding(x, q), q.dequantize()[x])
    with pytest.raises(lorakit.LoraError, match="max_norm"):
        torch.nn.functional.embedding(x, q, max_norm=1.0)
    with pytest.raises(IndexError):
        torch.nn.functional.embedding(torch.tensor([64]), quantize_weight(torch.randn(64, 64), "nf4"))


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_tied_embeddings_quantized_once_shared_and_exact(scheme):
    model = tiny_llama(tie=True)
    plan = plan_quantize(model, scheme, embeddings=True)
    rows = {r.name: r for r in plan.rows}
    assert rows["model.embed_tokens"].action == rows["lm_head"].action == "quantize"
    assert "model.embed_tokens" in plan.table() and "tied to model.embed_tokens" in plan.table()
    lorakit.quantize_base(model, scheme, embeddings=True)
    embed = model.model.embed_tokens.weight
    assert is_quantized(embed) and model.lm_head.weight is embed and not embed.requires_grad
    assert model.__dict__["_lorakit_quant"]["embeddings"] is True
    assert torch.allclose(logits(model), logits(dense_copy(model)), atol=1e-5)
    out = logits(model)
    lora(model, randomize=False)
    assert torch.equal(logits(model), out)                     # LoRA's zero delta at init


def test_tied_quantized_embeddings_train_lora_only():
    model = lora(lorakit.quantize_base(tiny_llama(tie=True), "nf4", embeddings=True))
    ref = dense_copy(model)
    x = ids(b=3, t=16)
    grads = []
    for m in (model, ref):
        m.train()
        m(x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 4 * len(TARGETS) and all(g is not None and g.abs().sum() > 0
                                                     for g in grads[0].values())
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-4, atol=1e-4 * g.abs().max()), name
    assert model.model.embed_tokens.weight.grad is None


def test_untied_head_and_embeddings_quantized_separately():
    model = lorakit.quantize_base(tiny_llama(), "nf4", embeddings=True)
    assert is_quantized(model.lm_head.weight) and is_quantized(model.model.embed_tokens.weight)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.allclose(logits(model), logits(dense_copy(model)), atol=1e-5)


def test_embedding_weight_memory_shrinks_about_4x_from_bf16():
    model = tiny_llama(tie=True).to(torch.bfloat16)
    before = weight_memory(model)
    lorakit.quantize_base(model, "nf4", embeddings=True)
    after = weight_memory(model)
    assert after["Embedding"]["params"] == before["Embedding"]["params"] == 128 * 64   # counted once
    assert after["Embedding"]["bytes"] / before["Embedding"]["bytes"] == pytest.approx(4.127 / 16, abs=0.01)


def test_embeddings_that_do_not_fit_are_kept_with_the_reason():
    model = tiny_llama(tie=True, hidden=32)           # rows of 32 values: not whole blocks of 64
    plan = plan_quantize(model, "nf4", embeddings=True)
    kept = {r.name: r.reason for r in plan.kept}
    assert "not whole blocks" in kept["model.embed_tokens"]
    assert "tied to model.embed_tokens, which is kept" in kept["lm_head"]
    lorakit.quantize_base(model, "nf4", embeddings=True)
    assert not is_quantized(model.model.embed_tokens.weight)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert is_quantized(model.model.layers[0].mlp.up_proj.weight)


def test_quantized_embeddings_save_reload_and_reproduce_from_the_record(tmp_path):
    model = lorakit.quantize_base(tiny_llama(tie=True), "nf4", embeddings=True)
    save_quantized(model, tmp_path / "q")
    fresh = load_quantized(tiny_llama(seed=5, tie=True), tmp_path / "q")
    assert is_quantized(fresh.lm_head.weight) and fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(logits(fresh), logits(model))
    record = json.loads(json.dumps(model.__dict__["_lorakit_quant"]))     # as an adapter stores it
    again = quantize_as_recorded(tiny_llama(tie=True), record)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    mine, theirs = dict(model.named_parameters()), dict(again.named_parameters())
    assert {n for n, p in mine.items() if is_quantized(p)} == {n for n, p in theirs.items()
                                                                if is_quantized(p)}
    for name, p in mine.items():
        if is_quantized(p):
            assert all(torch.equal(p.qdata[k], theirs[name].qdata[k]) for k in p.qdata), name


# --- bad input -----------------------------------------------------------------------------------------
def test_bad_input_is_refused_before_anything_changes(tmp_path):
    model = lorakit.quantize_base(tiny_llama(), "nf4")
    with pytest.raises(lorakit.LoraError, match="already quantized"):
        lorakit.quantize_base(model, "int8")
    fresh = tiny_llama()
    w = fresh.model.layers[0].mlp.up_proj.weight
    for kwargs, match in (({"scheme": "nf3"}, "unknown quantization"),
                          ({"scheme": "nf4", "block_size": 48}, "power of two")):
        with pytest.raises(lorakit.LoraError, match=match):
            lorakit.quantize_base(fresh, **kwargs)
    assert fresh.model.layers[0].mlp.up_proj.weight is w
    with pytest.raises(lorakit.LoraError, match="no adapter|adapter"):
        lorakit.save_adapter(model, tmp_path / "not-an-adapter")          # a quantized base alone
    lora(model)
    with pytest.raises(lorakit.LoraError, match="stores the base only"):
        save_quantized(model, tmp_path / "q")
    for p in model.parameters():                 # method `full`: every weight set to train
        p.requires_grad_(True)
    with pytest.raises(lorakit.LoraError, match="quantized base is frozen"):
        check_frozen(model)
    with pytest.raises(lorakit.LoraError, match="frozen"):
        model(ids(), labels=ids()).loss.backward()
    with pytest.raises(lorakit.LoraError, match="requantize=True needs"):
        lorakit.merge_and_unload(lora(tiny_llama()), requantize=True)


def test_quantizing_lets_go_of_a_memory_mapped_checkpoint():
    """Kept tensors backed by memory torch did not allocate (a safetensors memory map; here a numpy
    buffer) are copied, so the file's mapping, with every 16-bit page read while quantizing, can go."""
    import numpy as np
    model = tiny_llama(seed=3)
    norm = model.model.norm
    outside = np.random.default_rng(0).random(norm.weight.shape[0], dtype=np.float32)
    norm.weight = nn.Parameter(torch.from_numpy(outside), requires_grad=False)
    assert not norm.weight.untyped_storage().resizable()
    lorakit.quantize_base(model, "nf4")
    assert norm.weight.untyped_storage().resizable()
    assert norm.weight.data_ptr() != outside.ctypes.data and torch.equal(norm.weight,
                                                                         torch.from_numpy(outside))
