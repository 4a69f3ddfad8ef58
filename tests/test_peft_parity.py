"""Parity with Hugging Face PEFT, both ways, on tiny random BERT, GPT-2 and Llama models.

lorakit promises PEFT's on-disk format, so an adapter must mean the same thing to both libraries:

    lorakit -> PEFT:  apply_lora, randomise, save_adapter  ->  PeftModel.from_pretrained(fresh base)
    PEFT -> lorakit:  get_peft_model, randomise, save_pretrained  ->  lorakit.load_adapter(fresh base)

and the two models must give the same outputs (max |diff| < 1e-5 in fp32) and hold bitwise equal
adapter tensors under the same keys. Every trainable tensor (A, B, head copies, lora_only biases) is
randomised first, because B = 0 at init would make any two adapters agree. The measured differences
are printed; run ``pytest tests/test_peft_parity.py -s`` to quote them.

GPT-2 exercises ``Conv1D`` (weight stored (in, out), PEFT's fan_in_fan_out); Llama exercises grouped
k/v projections of a different width; BERT exercises nn.Embedding (word_embeddings) targets, rank /
alpha patterns, bias="lora_only" and a modules_to_save classifier head.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lorakit  # noqa: E402
from conftest import tiny_bert  # noqa: E402

TOL = 1e-5
SEQ = (2, 7)          # batch, tokens


# --- tiny random bases (no downloads): same seed, same weights -------------------------------------
def _bert(cls_name: str = "BertModel"):
    return tiny_bert(cls_name, num_labels=3)


def _gpt2():
    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config)


def _llama():
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


BUILDERS = {
    "bert": _bert,
    "bert-cls": lambda: _bert("BertForSequenceClassification"),
    "gpt2": _gpt2,
    "llama": _llama,
}

TARGETS = {
    "bert": ["query", "key", "value", "dense", "word_embeddings"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def build(arch: str) -> torch.nn.Module:
    """A fresh random base; calling it twice gives identical weights."""
    torch.manual_seed(1234)
    return BUILDERS[arch]().eval()


# --- one case = one adapter described once, translated into each library's config -----------------
CORE = [dict(arch=arch, targets=TARGETS[arch], rslora=rslora)
        for arch in ("bert", "gpt2", "llama") for rslora in (False, True)]
FEATURES = {
    # query of block 0 gets rank 8 and alpha 32 (scale 4); everything else r=4, alpha=8 (scale 2)
    "rank_alpha_pattern": dict(arch="bert", targets=["query", "value"],
                               rank_pattern={"layer.0.attention.self.query": 8},
                               alpha_pattern={"layer.0.attention.self.query": 32}),
    "rank_alpha_pattern_llama_rslora": dict(arch="llama", targets=["q_proj", "v_proj"], rslora=True,
                                            rank_pattern={"layers.1.self_attn.v_proj": 2},
                                            alpha_pattern={"layers.1.self_attn.v_proj": 3}),
    "bias_lora_only": dict(arch="bert", targets=["query", "value", "dense"], bias="lora_only"),
    "bias_lora_only_gpt2": dict(arch="gpt2", targets=["c_attn", "c_fc"], bias="lora_only"),
    "embedding_only": dict(arch="bert", targets=["word_embeddings"]),
    "classifier_head": dict(arch="bert-cls", targets=["query", "value"],
                            modules_to_save=["classifier"]),
}
CASES = [pytest.param(c, id=f"{c['arch']}-rslora={c['rslora']}") for c in CORE] + \
        [pytest.param(c, id=name) for name, c in FEATURES.items()]


def lorakit_config(case: dict) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(r=4, alpha=8, target_modules=case["targets"],
                              rslora=case.get("rslora", False), bias=case.get("bias", "none"),
                              rank_pattern=case.get("rank_pattern", {}),
                              alpha_pattern=case.get("alpha_pattern", {}),
                              modules_to_save=case.get("modules_to_save"))


def peft_config(case: dict, **extra) -> "peft.LoraConfig":
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=case["targets"],
                           use_rslora=case.get("rslora", False), bias=case.get("bias", "none"),
                           rank_pattern=case.get("rank_pattern", {}),
                           alpha_pattern=case.get("alpha_pattern", {}),
                           modules_to_save=case.get("modules_to_save"),
                           fan_in_fan_out=case["arch"] == "gpt2", lora_dropout=0.0, **extra)


# --- helpers ---------------------------------------------------------------------------------------
def randomise_trainable(model: torch.nn.Module, seed: int = 0) -> list[str]:
    """Overwrite every trainable tensor (LoRA factors, head copies, lora_only biases) with N(0, 0.1^2).

    Both libraries mark exactly the adapter's own tensors trainable after injection, so this is a
    library-neutral way to make the adapter non-trivial."""
    g = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
                names.append(name)
    assert names, "nothing was trainable after injection"
    return names


def forward(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 100, SEQ, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key].float(), want[key].float()), key


def assert_file_holds_case(case: dict, folder) -> None:
    """The saved file really contains what the case is about (so a feature cannot pass by absence)."""
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
        shapes = {k.removeprefix("base_model.model."): handle.get_slice(k).get_shape()
                  for k in handle.keys()}
    if "word_embeddings" in case["targets"]:
        assert shapes["embeddings.word_embeddings.lora_embedding_A"] == [4, 100]
    if case.get("bias") == "lora_only":
        assert any(k.endswith(".base_layer.bias") for k in shapes)
    for name in case.get("modules_to_save") or []:
        assert f"{name}.weight" in shapes and f"{name}.bias" in shapes
    for pattern, rank in case.get("rank_pattern", {}).items():
        hits = [shape for k, shape in shapes.items() if k.endswith(f"{pattern}.lora_A.weight")]
        assert hits == [[rank, 32]]


def report(case_id: str, direction: str, diff: float, effect: float | None = None) -> None:
    moved = "" if effect is None else f"   (adapter moves outputs by {effect:.2e})"
    print(f"\nPEFT parity {case_id:>34} {direction:<15} max|diff| = {diff:.2e}{moved}")


# --- the two directions ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_lorakit_adapter_loads_in_peft(case, tmp_path, request):
    base_out = forward(build(case["arch"]))
    model = lorakit.apply_lora(build(case["arch"]), lorakit_config(case))
    randomise_trainable(model)
    model.eval()
    ours = forward(model)
    lorakit.save_adapter(model, tmp_path)
    assert_file_holds_case(case, tmp_path)

    theirs_model = peft.PeftModel.from_pretrained(build(case["arch"]), str(tmp_path)).eval()
    theirs = forward(theirs_model)

    diff = (ours - theirs).abs().max().item()
    effect = (ours - base_out).abs().max().item()
    report(request.node.callspec.id, "lorakit->PEFT", diff, effect)
    assert effect > 1e-2, "the adapter barely changes the output; the comparison would prove nothing"
    assert diff < TOL
    # Same keys, same bits: PEFT would save exactly what lorakit saved (factors, heads, biases).
    assert_same_tensors(peft.get_peft_model_state_dict(theirs_model), lorakit.lora_state_dict(model))


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_lorakit(case, tmp_path, request):
    base_out = forward(build(case["arch"]))
    theirs_model = peft.get_peft_model(build(case["arch"]), peft_config(case))
    randomise_trainable(theirs_model)
    theirs_model.eval()
    theirs = forward(theirs_model)
    theirs_model.save_pretrained(str(tmp_path))
    assert_file_holds_case(case, tmp_path)

    model = lorakit.load_adapter(build(case["arch"]), tmp_path)
    model.eval()
    ours = forward(model)

    diff = (ours - theirs).abs().max().item()
    effect = (theirs - base_out).abs().max().item()
    report(request.node.callspec.id, "PEFT->lorakit", diff, effect)
    assert effect > 1e-2
    assert diff < TOL
    assert_same_tensors(lorakit.lora_state_dict(model), peft.get_peft_model_state_dict(theirs_model))


def test_peft_sequence_classification_adapter_loads_in_lorakit(tmp_path):
    """task_type="SEQ_CLS" is how most PEFT classifiers are made: PEFT then adds both "classifier" and
    "score" to modules_to_save in the saved config, although a BERT has no "score" module."""
    case = FEATURES["classifier_head"]
    base_out = forward(build("bert-cls"))
    theirs_model = peft.get_peft_model(build("bert-cls"), peft_config(case, task_type="SEQ_CLS"))
    randomise_trainable(theirs_model)
    theirs_model.eval()
    theirs_model.save_pretrained(str(tmp_path))
    assert "score" in json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]

    model = lorakit.load_adapter(build("bert-cls"), tmp_path).eval()
    theirs = forward(theirs_model)
    diff = (forward(model) - theirs).abs().max().item()
    report("bert-cls task_type=SEQ_CLS", "PEFT->lorakit", diff, (theirs - base_out).abs().max().item())
    assert diff < TOL
    assert lorakit.list_adapters(model)["default"].modules_to_save == ["classifier"]
    head = model.classifier.modules_to_save["default"]
    want = theirs_model.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(head.weight, want.weight) and torch.equal(head.bias, want.bias)


def test_merged_lorakit_model_matches_peft_merge(tmp_path):
    """Merging is part of the contract too: lorakit's merged weights equal PEFT's merge_and_unload."""
    case = CORE[3]                                               # gpt2, rslora: Conv1D transposes
    model = lorakit.apply_lora(build("gpt2"), lorakit_config(case))
    randomise_trainable(model)
    lorakit.save_adapter(model, tmp_path)
    ours = lorakit.merge_and_unload(model).eval()
    theirs = peft.PeftModel.from_pretrained(build("gpt2"), str(tmp_path)).merge_and_unload().eval()
    diff = max((ours.state_dict()[k] - v).abs().max().item() for k, v in theirs.state_dict().items())
    report("gpt2 merged weights", "lorakit vs PEFT", diff)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert diff < TOL
