"""End to end on the real base: ``lorakit serve --model smollm2`` with two adapters, answered through
the official openai client; each adapter's greedy answer is the same alone, in a mixed concurrent
batch, streamed, and as lorakit's plain KV-cached decoding with that adapter active gives it."""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")
openai = pytest.importorskip("openai")

import lorakit  # noqa: E402
from lorakit.generate.decode import decode, pad_id, stop_ids  # noqa: E402
from lorakit.generate.prompts import encode_prompt, render_chat  # noqa: E402
from lorakit.generate.sampling import Sampling  # noqa: E402
from lorakit.io import fingerprint_metadata  # noqa: E402
from lorakit.models import load  # noqa: E402
from serve_helpers import ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow
QUESTIONS = ["What is the capital of France?", "Name a colour of the sky.", "Say hello in Spanish."]
TOKENS = 12


def test_smollm2_serves_two_adapters_mixed(tmp_path):
    loaded = load("smollm2", task="causal-lm")
    model, tok = loaded.model, loaded.tokenizer
    for k, targets in enumerate((["q_proj", "v_proj"], "all-linear")):
        torch.manual_seed(k)
        lorakit.apply_lora(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=targets),
                           adapter_name=f"skill{k}")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if f".lora.skill{k}.B" in name:
                    p.normal_(std=0.05)
        lorakit.save_adapter(model, tmp_path / "runs" / f"skill{k}" / "adapter", adapter_name=f"skill{k}",
                             metadata=fingerprint_metadata(model, f"skill{k}"))
    expected = {}
    for name in ("skill0", "skill1", None):
        for q in QUESTIONS:
            ids = encode_prompt(tok, render_chat(tok, [{"role": "user", "content": q}], True))
            if name is None:
                with lorakit.disable_adapter(model):
                    out = decode(model, [ids], Sampling(max_new_tokens=TOKENS), stop_ids(tok, model), pad_id(tok))
            else:
                lorakit.set_adapter(model, name)
                out = decode(model, [ids], Sampling(max_new_tokens=TOKENS), stop_ids(tok, model), pad_id(tok))
            expected[(name or "base", q)] = tok.decode(out[0], skip_special_tokens=True)
    del model, loaded
    server = ServerProcess("smollm2", [tmp_path / "runs"], "--name", "base", "--max-loaded", "2",
                           log=tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=300)
        assert {m.id for m in client.models.list().data} == {"base", "skill0", "skill1"}
        jobs = [(m, q) for m in ("base", "skill0", "skill1") for q in QUESTIONS]
        got, errors = {}, []

        def ask(model_name, question):
            try:
                reply = client.chat.completions.create(model=model_name, max_tokens=TOKENS, temperature=0,
                                                       messages=[{"role": "user", "content": question}])
                got[(model_name, question)] = reply.choices[0].message.content
            except Exception as err:                       # noqa: BLE001 - must stay empty
                errors.append(repr(err))

        threads = [threading.Thread(target=ask, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert not errors, errors
        assert got == expected                              # mixed, concurrent == plain decoding
        assert len({got[(m, QUESTIONS[0])] for m in ("base", "skill0", "skill1")}) == 3
        stream = client.chat.completions.create(model="skill1", max_tokens=TOKENS, temperature=0,
                                                stream=True,
                                                messages=[{"role": "user", "content": QUESTIONS[1]}])
        assert "".join(c.choices[0].delta.content or "" for c in stream) == expected[("skill1", QUESTIONS[1])]
        parity = {m.id: m.model_extra.get("parity") for m in client.models.list().data}
        assert parity["skill0"].startswith("checked") and parity["skill1"].startswith("checked")
    finally:
        server.stop()
