"""The paper's baselines as methods (bitfit, ia3, adapter-houlsby, adapter-lin, prefix) on tiny random
BERTs: parameter counts equal each paper's formula, only the method's tensors (and the head) get
gradients, a few steps train, files round-trip exactly, (IA)^3 agrees with PEFT both ways, adapters
start as the base, and prefixes keep padded tokens masked."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lorakit.errors import LoraError  # noqa: E402
from lorakit.methods import AdaptSpec, apply_method  # noqa: E402
from lorakit.methods.prefix import PrefixSelfAttention, extend_mask  # noqa: E402

D, L, D_FF, HEADS, LABELS, R = 32, 2, 64, 4, 3, 4
HEAD_PARAMS = D * LABELS + LABELS                      # the classifier trains with every method
METHODS = ["bitfit", "ia3", "adapter-houlsby", "adapter-lin", "prefix"]


def bert(hidden: int = D, impl: str = "sdpa", cls: str = "BertForSequenceClassification"):
    torch.manual_seed(1234)
    config = transformers.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=L,
                                     num_attention_heads=HEADS, intermediate_size=D_FF,
                                     max_position_embeddings=32, num_labels=LABELS)
    config._attn_implementation = impl
    return getattr(transformers, cls)(config).eval()


def llama():
    torch.manual_seed(1234)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=D, intermediate_size=D_FF,
                                      num_hidden_layers=L, num_attention_heads=HEADS,
                                      num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def adapt(method: str, model=None, **extra):
    return apply_method(model if model is not None else bert(), method,
                        AdaptSpec(head=["classifier"], r=R, extra=extra))


IDS = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(7))
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
LABELS_T = torch.tensor([0, 2, 1])


def logits(model, ids=IDS, mask=MASK):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def randomise(model, seed: int = 0) -> None:
    """Move every trainable tensor away from its init (ones, zeros) so comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(trainable(model).items()):
            p.add_(0.2 * torch.randn(p.shape, generator=g))


# --- parameter counts: each paper's formula -----------------------------------------------------------
N_LN = 2 * L + 1                                       # two per block + the embeddings' LayerNorm
FORMULAS = {
    # BitFit: q, k, v, o, FFN in/out biases and two LayerNorm betas per block, + embedding LN, pooler
    "bitfit": L * (7 * D + D_FF) + D + D,
    # (IA)^3: l_k, l_v (d) and l_ff (d_ff) per block
    "ia3": L * (2 * D + D_FF),
    # LoRA paper 5.1: L_Adpt (2 d r + r + d) + 2 L_LN d; Houlsby: 2 adapters/block, the model's LNs
    "adapter-houlsby": 2 * L * (2 * D * R + R + D) + 2 * N_LN * D,
    # Lin: 1 adapter/block, each with its own LayerNorm
    "adapter-lin": L * (2 * D * R + R + D) + 2 * L * D,
    # PreLayer: L d_model (l_p + l_i), l_p = r, no infix
    "prefix": L * D * R,
}


@pytest.mark.parametrize("method", METHODS)
def test_trainable_parameters_follow_the_papers_formula(method):
    model = adapt(method)
    assert sum(p.numel() for p in trainable(model).values()) == FORMULAS[method] + HEAD_PARAMS


def test_prefix_kv_mode_trains_key_and_value_prefixes():
    model = adapt("prefix", prefix_mode="kv")
    assert sum(p.numel() for p in trainable(model).values()) == 2 * L * D * R + HEAD_PARAMS


OWN = {   # how each method's own tensors are named (besides the head)
    "bitfit": lambda n: n.endswith(".bias"),
    "ia3": lambda n: n.endswith(".ia3_l"),
    "adapter-houlsby": lambda n: ".adapter." in n or "LayerNorm." in n,
    "adapter-lin": lambda n: ".adapter." in n,
    "prefix": lambda n: n.endswith(".prefix"),
}


@pytest.mark.parametrize("method", METHODS)
def test_only_the_methods_tensors_and_head_get_gradients_and_it_trains(method):
    model = adapt(method)
    model.train()
    optimizer = torch.optim.Adam(trainable(model).values(), lr=1e-2)
    losses = []
    for step in range(5):
        loss = torch.nn.functional.cross_entropy(model(input_ids=IDS, attention_mask=MASK).logits, LABELS_T)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            assert with_grad == set(trainable(model))
            assert all(OWN[method](n) or n.startswith("classifier.") for n in with_grad)
            assert any(OWN[method](n) for n in with_grad)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", ["adapter-houlsby", "adapter-lin", "ia3", "bitfit"])
def test_method_starts_as_the_base_model(method):
    model = adapt(method)
    assert torch.equal(logits(model), logits(bert()))
    if method.startswith("adapter"):
        ups = [p for n, p in model.named_parameters() if ".adapter.up." in n]
        assert ups and all(torch.count_nonzero(p) == 0 for p in ups)


# --- files --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_is_exact(method, tmp_path):
    model = adapt(method)
    randomise(model)
    want = logits(model)
    model.method_io.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    reloaded = model.method_io.load(bert(), tmp_path).eval()
    assert torch.equal(logits(reloaded), want)
    merge = getattr(reloaded.method_io, "merge", None)
    assert (merge is not None) == (method in ("ia3", "bitfit"))     # adapters/prefix cannot fold away
    if merge is not None:
        merged = merge(reloaded)
        assert all(type(m).__module__.startswith(("torch", "transformers")) for m in merged.modules())
        assert (logits(merged) - want).abs().max() < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_load_onto_a_wrong_base_fails_before_changing_it(method, tmp_path):
    model = adapt(method)
    model.method_io.save(model, tmp_path)
    other = bert(hidden=48)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(LoraError, match=r"bert\.\S+ .*\[32\D.*\[48\D"):
        model.method_io.load(other, tmp_path)
    assert sorted(other.state_dict()) == sorted(before)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in other.modules())


def test_load_refuses_a_file_of_another_method(tmp_path):
    model = adapt("adapter-lin")
    model.method_io.save(model, tmp_path)
    with pytest.raises(LoraError, match="adapter-lin"):
        adapt("adapter-houlsby").method_io.load(bert(), tmp_path)


# --- (IA)^3 parity with PEFT, both ways ------------------------------------------------------------
def test_ia3_file_loads_in_peft_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    model = adapt("ia3")
    randomise(model)
    ours = logits(model)
    model.method_io.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["modules_to_save"] == ["classifier"]
    theirs_model = peft.PeftModel.from_pretrained(bert(), str(tmp_path)).eval()
    theirs = logits(theirs_model)
    assert (ours - logits(bert())).abs().max() > 1e-2           # the adapter does something
    assert (ours - theirs).abs().max() < 1e-5
    wrapped = [n for n, m in theirs_model.named_modules() if isinstance(m, peft.tuners.ia3.Linear)]
    assert len(wrapped) == 3 * L                                 # key, value, FFN down per block
    peft_state = peft.get_peft_model_state_dict(theirs_model)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(peft_state) == sorted(saved)
    assert all(torch.equal(peft_state[k], saved[k]) for k in saved)


def test_peft_ia3_adapter_loads_in_lorakit(tmp_path):
    """PEFT's own BERT default: target "output.dense" also hits attention.output.dense (as a
    feed-forward module, input-scaled), which lorakit reproduces by PEFT's matching rules."""
    peft = pytest.importorskip("peft")
    from lorakit.methods.ia3 import IA3Linear, load_ia3
    config = peft.IA3Config(target_modules=["key", "value", "output.dense"],
                            feedforward_modules=["output.dense"], modules_to_save=["classifier"])
    theirs_model = peft.get_peft_model(bert(), config)
    randomise(theirs_model)
    theirs_model.eval()
    theirs = logits(theirs_model)
    theirs_model.save_pretrained(str(tmp_path))
    model = load_ia3(bert(), tmp_path).eval()
    assert (logits(model) - theirs).abs().max() < 1e-5
    ff = sorted(n for n, m in model.named_modules() if isinstance(m, IA3Linear) and m.feedforward)
    assert len(ff) == 2 * L and any("attention.output.dense" in n for n in ff)


def test_ia3_merge_is_exact_and_gives_plain_linears():
    model = adapt("ia3")
    randomise(model)
    want = logits(model)
    merged = model.method_io.merge(model)
    assert type(merged.bert.encoder.layer[0].attention.self.key) is torch.nn.Linear
    assert (logits(merged) - want).abs().max() < 1e-5


# --- other architectures --------------------------------------------------------------------------------
def test_adapters_and_ia3_on_llama_use_its_projections():
    from lorakit.methods.adapters import AdapterLinear
    from lorakit.methods.ia3 import IA3Linear
    ids = IDS
    for method, suffixes in (("adapter-houlsby", ("o_proj", "down_proj")), ("adapter-lin", ("down_proj",)),
                             ("ia3", ("k_proj", "v_proj", "down_proj"))):
        model = apply_method(llama(), method, AdaptSpec(head=[], r=R))
        wrapped = [n for n, m in model.named_modules() if isinstance(m, (AdapterLinear, IA3Linear))]
        assert sorted(wrapped) == sorted(n for n, _ in llama().named_modules() if n.endswith(suffixes))
        assert len(wrapped) == len(suffixes) * L
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, llama()(input_ids=ids).logits)
    model = apply_method(llama(), "ia3", AdaptSpec(head=[]))
    # grouped-query attention: k/v are 2 heads of 8 = 16 wide, not d = 32
    assert sum(p.numel() for p in trainable(model).values()) == L * (2 * 16 + D_FF)


def test_ia3_targets_by_name():
    spec = AdaptSpec(head=[], extra={"targets": ["query"], "feedforward": [r"intermediate\.dense"]})
    model = apply_method(bert(), "ia3", spec)
    shapes = {n: tuple(p.shape) for n, p in trainable(model).items()}
    assert shapes == {**{f"bert.encoder.layer.{i}.attention.self.query.ia3_l": (D,) for i in range(L)},
                      **{f"bert.encoder.layer.{i}.intermediate.dense.ia3_l": (D,) for i in range(L)}}


def test_adapter_targets_by_name():
    spec = AdaptSpec(head=[], r=R, extra={"targets": ["intermediate.dense"]})
    model = apply_method(bert(), "adapter-lin", spec)
    assert [n for n, _ in trainable(model).items() if n.endswith("up.weight")] == \
        [f"bert.encoder.layer.{i}.intermediate.dense.adapter.up.weight" for i in range(L)]


@pytest.mark.parametrize("method, model, spec, match", [
    ("adapter-houlsby", bert, AdaptSpec(head=["classifier"], r=0), "bottleneck width"),
    ("adapter-lin", bert, AdaptSpec(head=["nope"]), "nope"),
    ("adapter-lin", bert, AdaptSpec(head=[], extra={"targets": ["LayerNorm"]}), "nn.Linear"),
    ("adapter-lin", bert, AdaptSpec(head=[], extra={"targets": ["missing"]}), "missing"),
    ("prefix", llama, AdaptSpec(head=[]), "BERT-family"),
    ("prefix", bert, AdaptSpec(head=[], extra={"prefix_mode": "deep"}), "deep"),
    ("ia3", lambda: torch.nn.Sequential(torch.nn.Linear(2, 2)), AdaptSpec(head=[]), "model_type"),
])
def test_bad_input_is_refused_before_anything_changes(method, model, spec, match):
    base = model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(LoraError, match=match):
        apply_method(base, method, spec)
    assert sorted(base.state_dict()) == sorted(before)
    assert all(p.requires_grad for p in base.parameters())


# --- prefix: shapes and masks -------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_prefix_keeps_padded_tokens_masked(impl):
    """A padded row gives the same logits as the same tokens alone without padding."""
    model = adapt("prefix", model=bert(impl=impl))
    randomise(model)
    padded = logits(model)
    for row, n in enumerate(MASK.sum(1).tolist()):
        alone = logits(model, IDS[row:row + 1, :n], torch.ones(1, n, dtype=torch.long))
        assert (alone - padded[row]).abs().max() < 1e-5


def test_prefix_eager_and_sdpa_agree():
    outs = []
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = adapt("prefix", model=bert(impl=impl))
        randomise(model)
        outs.append(logits(model))
    assert (outs[0] - outs[1]).abs().max() < 1e-5


def test_prefix_attention_matches_a_written_out_reference():
    model = adapt("prefix", model=bert(impl="eager"))
    randomise(model)
    attn = model.bert.encoder.layer[0].attention.self
    assert isinstance(attn, PrefixSelfAttention)
    x = torch.randn(2, 5, D)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min   # (B, 1, 1, T)
    with torch.no_grad():
        got, _ = attn(x, attention_mask=additive)
        k = torch.cat([attn.key(attn.prefix).expand(2, -1, -1), attn.key(x)], 1)          # (B, P + T, d)
        v = torch.cat([attn.value(attn.prefix).expand(2, -1, -1), attn.value(x)], 1)
        q = attn.query(x)
        split = lambda t: t.view(2, t.shape[1], HEADS, D // HEADS).transpose(1, 2)
        scores = split(q) @ split(k).transpose(-1, -2) / (D // HEADS) ** 0.5                # (B, H, T, P + T)
        visible = torch.cat([torch.ones(2, R), mask.float()], 1)[:, None, None, :]
        weights = torch.softmax(scores.masked_fill(visible == 0, float("-inf")), -1)
        want = (weights @ split(v)).transpose(1, 2).reshape(2, 5, D)
    assert weights.shape == (2, HEADS, 5, R + 5)
    assert (got - want).abs().max() < 1e-5


def test_extend_mask_prepends_visible_columns():
    assert extend_mask(None, 3) is None
    boolean = torch.tensor([[[[True, False]]]])
    assert extend_mask(boolean, 2).tolist() == [[[[True, True, True, False]]]]
    additive = torch.tensor([[[[0.0, -1e9]]]])
    assert extend_mask(additive, 1).tolist() == [[[[0.0, 0.0, -1e9]]]]
    assert extend_mask(torch.tensor([[1, 0]]), 2).tolist() == [[1, 1, 1, 0]]
