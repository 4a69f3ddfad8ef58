"""Sequence-classification adapters behind /v1/classify (a text-cls LoRA with its own head on a tiny
BERT), and ``lorakit check-adapter`` on good and tampered adapters."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("fastapi")

import lorakit  # noqa: E402
from conftest import randomize_adapters, tiny_bert  # noqa: E402
from finetune_helpers import word_tokenizer  # noqa: E402
from lorakit.io import fingerprint_metadata  # noqa: E402
from lorakit.models import load  # noqa: E402
from serve_helpers import ServerProcess, base_dir, make_adapter  # noqa: E402

TEXTS = ["the cat sat on the mat", "what a great movie", "boring and bad"]
LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def bert_lib(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    base = root / "tiny-bert"
    torch.manual_seed(0)
    tiny_bert(max_position_embeddings=64).save_pretrained(base)
    word_tokenizer(chat=False).save_pretrained(base)
    model = load(base, task="classification", num_labels=3).model
    lorakit.apply_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["query", "value"],
                                                 modules_to_save=["classifier"]))
    randomize_adapters(model, seed=1, std=0.3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.normal_(std=1.0)
    folder = root / "adapters" / "sentiment" / "adapter"
    lorakit.save_adapter(model, folder, metadata=fingerprint_metadata(model))
    (folder / "label_map.json").write_text(json.dumps(
        {"label2id": {n: i for i, n in enumerate(LABELS)}, "id2label": dict(enumerate(LABELS))}))
    return root, base, folder


def _expected(base, folder) -> torch.Tensor:
    model = lorakit.load_adapter(load(base, task="classification", num_labels=3).model, folder)
    batch = word_tokenizer(chat=False)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)


def test_classify_returns_the_adapters_label_probabilities(bert_lib):
    root, base, folder = bert_lib
    server = ServerProcess(base, [root / "adapters"], "--name", "bert", log=root / "server.log")
    try:
        models = {m["id"]: m for m in server.request("GET", "/v1/models")[1]["data"]}
        assert models["bert"]["kind"] == "encoder" and models["sentiment"]["kind"] == "classify"
        status, reply = server.request("POST", "/v1/classify", {"model": "sentiment", "input": TEXTS})
        assert status == 200, reply
        assert reply["labels"] == LABELS
        got = torch.tensor([row["probs"] for row in reply["data"]])
        torch.testing.assert_close(got, _expected(base, folder), atol=1e-5, rtol=0)
        assert [row["label"] for row in reply["data"]] == [LABELS[i] for i in got.argmax(-1).tolist()]
        assert len(set(got.argmax(-1).tolist())) > 1 or got.std() > 0.01     # the head is not constant
        one = server.request("POST", "/v1/classify", {"model": "sentiment", "input": TEXTS[0]})[1]
        assert len(one["data"]) == 1
        status, reply = server.request("POST", "/v1/completions", {"model": "bert", "prompt": "hi"})
        assert status == 400 and "encoder" in reply["error"]["message"]
        status, reply = server.request("POST", "/v1/classify", {"model": "sentiment", "input": [1, 2]})
        assert status == 400 and "`input`" in reply["error"]["message"]
        models = {m["id"]: m for m in server.request("GET", "/v1/models")[1]["data"]}
        assert models["sentiment"]["parity"].startswith("checked")
    finally:
        server.stop()


def _check(folder, model) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit", "check-adapter", str(folder), "--model",
                           str(model)], capture_output=True, text=True, timeout=300)


def test_check_adapter_passes_good_adapters_and_names_the_failed_check(bert_lib, tmp_path):
    root, bert, cls_folder = bert_lib
    done = _check(cls_folder, bert)
    assert done.returncode == 0, done.stderr
    assert "OK to serve" in done.stdout and "checked" in done.stdout and "negative" in done.stdout
    llama = base_dir(tmp_path)
    lm = make_adapter(llama, tmp_path / "lm", seed=2, targets="all")
    done = _check(lm, llama)
    assert done.returncode == 0 and "mixed with other adapters" in done.stdout, done.stderr
    unchecked = make_adapter(llama, tmp_path / "plain", seed=2, fingerprint=False)
    assert "unchecked" in _check(unchecked, llama).stdout
    done = _check(lm, bert)                                           # an LM adapter on an encoder
    assert done.returncode == 2 and "cannot be served" in done.stderr, done.stderr
    from safetensors import safe_open
    from safetensors.torch import save_file
    weights = lm / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    for key in tensors:
        if "lora_B" in key:
            tensors[key] = tensors[key] * 2                           # drifted: would not serve as saved
    save_file(tensors, str(weights), metadata=meta)
    done = _check(lm, llama)
    assert done.returncode == 2 and "probe outputs differ" in done.stderr, done.stderr
