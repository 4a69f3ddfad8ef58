"""``lorakit serve`` as a real uvicorn process on 127.0.0.1, driven by the official ``openai`` client
and by raw HTTP: completions and chat (streamed and not), bad requests, hot loading, faults."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from serve_helpers import ServerProcess, base_dir, make_adapter  # noqa: E402

PROMPT = "what is the cat ?"


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    base = base_dir(root)
    folder = root / "adapters"
    make_adapter(base, folder / "qv", seed=1, targets="qv")
    make_adapter(base, folder / "mlp", seed=2, targets="mlp", r=8)
    spare = root / "adapters" / "spare"                 # hot-loaded under other names
    make_adapter(base, spare / "extra", seed=4, targets="all", r=2)
    outside = root / "outside"
    make_adapter(base, outside / "evil", seed=5)
    # a different tiny Llama (wider): its adapter cannot load on this base
    other = root / "other-base"
    from finetune_helpers import word_tokenizer
    import torch
    import transformers
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=2,
                                      pad_token_id=2, bos_token_id=1)
    torch.manual_seed(9)
    transformers.LlamaForCausalLM(config).save_pretrained(other)
    word_tokenizer().save_pretrained(other)
    make_adapter(other, spare / "wrongbase", seed=6)
    # the same, declared a classification adapter (as the gw task's Whisper adapters are)
    shutil.copytree(spare / "wrongbase", spare / "wronghead")
    config_file = spare / "wronghead" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "modules_to_save": ["score"]}))
    return root, base, folder


@pytest.fixture(scope="module")
def server(lib):
    root, base, folder = lib
    srv = ServerProcess(base, [folder], "--max-loaded", "4", "--name", "tiny", log=root / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_base_and_every_adapter(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny"
    assert {"qv", "mlp", "spare/extra", "spare/wrongbase"} <= set(ids)


@pytest.mark.parametrize("model", ["tiny", "qv", "mlp"])
def test_completions_stream_and_not_agree(client, model):
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    assert full.choices[0].finish_reason in ("length", "stop") and full.usage.prompt_tokens == 5
    pieces = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in pieces if c.choices) == full.choices[0].text
    assert pieces[-1].usage.completion_tokens == full.usage.completion_tokens


def test_adapters_answer_differently(client):
    texts = {m: client.completions.create(model=m, prompt=PROMPT, max_tokens=8, temperature=0)
             .choices[0].text for m in ("tiny", "qv", "mlp")}
    assert len(set(texts.values())) == 3, texts


def test_chat_completions_use_the_chat_template(client, server):
    messages = [{"role": "user", "content": "hello"}]
    full = client.chat.completions.create(model="qv", messages=messages, max_tokens=6, temperature=0)
    # the template renders "<|im_start|>user hello<|im_end|> <|im_start|>assistant": 6 tokens
    assert full.usage.prompt_tokens == 6 and full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="qv", messages=messages, max_tokens=6, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_raw_stream_is_sse_ending_with_done(server):
    status, text = server.request("POST", "/v1/completions", {"model": "qv", "prompt": PROMPT,
                                                              "max_tokens": 3, "stream": True})
    assert status == 200
    events = [line for line in text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


BAD = [
    # (body or raw bytes, status, words in the message)
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"prompt": PROMPT}, 400, "`model` is required"),
    ({"model": "nope", "prompt": PROMPT}, 404, "no model or adapter named 'nope'"),
    ({"model": "qv"}, 400, "`prompt` is required"),
    ({"model": "qv", "prompt": 5}, 400, "`prompt` must be"),
    ({"model": "qv", "prompt": [PROMPT, PROMPT]}, 400, "one prompt per request"),
    ({"model": "qv", "prompt": PROMPT, "max_tokens": 0}, 400, "out of range"),
    ({"model": "qv", "prompt": PROMPT, "max_tokens": 10**9}, 400, "out of range"),
    ({"model": "qv", "prompt": PROMPT, "max_tokens": "8"}, 400, "`max_tokens` must be int"),
    ({"model": "qv", "prompt": PROMPT, "max_tokens": True}, 400, "`max_tokens` must be int"),
    ({"model": "qv", "prompt": PROMPT, "max_tokens": 300}, 400, "context is 256 tokens"),
    ({"model": "qv", "prompt": "cat " * 300, "max_tokens": 4}, 400, "context is 256 tokens"),
    ({"model": "qv", "prompt": PROMPT, "temperature": -1}, 400, "`temperature`"),
    ({"model": "qv", "prompt": PROMPT, "temperature": "hot"}, 400, "`temperature` must be"),
    ({"model": "qv", "prompt": PROMPT, "top_p": 0}, 400, "`top_p`"),
    ({"model": "qv", "prompt": PROMPT, "n": 2}, 400, "`n` = 2"),
    ({"model": "qv", "prompt": PROMPT, "stop": [""]}, 400, "`stop`"),
    ({"model": "qv", "prompt": PROMPT, "stream": "yes"}, 400, "`stream` must be bool"),
    ({"model": "qv", "prompt": PROMPT, "logprobs": 3}, 400, "`logprobs` is not supported"),
    ({"model": "qv", "prompt": [10**6]}, 400, "outside the vocabulary"),
    ({"model": ["qv"], "prompt": PROMPT}, 400, "`model` must be str"),
]
CHAT_BAD = [
    ({"model": "qv", "messages": []}, 400, "at least one message"),
    ({"model": "qv", "messages": "hi"}, 400, "`messages` must be list"),
    ({"model": "qv", "messages": [{"role": "wizard", "content": "x"}]}, 400, "needs a `role`"),
    ({"model": "qv", "messages": [{"role": "user", "content": 3}]}, 400, "content must be a string"),
    ({"model": "qv", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text only"),
]


@pytest.mark.parametrize("path,body,status,words",
                         [("/v1/completions", *case) for case in BAD] +
                         [("/v1/chat/completions", *case) for case in CHAT_BAD] +
                         [("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "`lora_path` is required"),
                          ("/v1/unload_lora_adapter", {"lora_name": "ghost"}, 404, "ghost"),
                          ("/v1/classify", {"model": "qv", "input": "x"}, 400, "lm adapter"),
                          ("/v1/classify", {"model": "tiny", "input": "x"}, 400, "untrained"),
                          ("/v1/completions", {"model": "spare/wronghead", "prompt": "x"}, 400,
                           "trained on another base model"),
                          ("/v1/nowhere", {}, 404, "no route")])
def test_bad_requests_get_4xx_json_naming_the_problem(server, path, body, status, words):
    raw = body if isinstance(body, bytes) else None
    got, reply = server.request("POST", path, None if raw else body, raw=raw)
    assert got == status, reply
    assert words in reply["error"]["message"], reply
    assert server.alive()


def test_openai_client_sees_the_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="qv", prompt=PROMPT, max_tokens=255)


def test_hot_load_and_unload_with_vllm_names(server, client, lib):
    root, _, folder = lib
    status, reply = server.request("POST", "/v1/load_lora_adapter",
                                   {"lora_name": "hot", "lora_path": str(folder / "spare" / "extra")})
    assert status == 200 and reply["parity"].startswith("checked"), reply
    assert "hot" in [m.id for m in client.models.list().data]
    hot = client.completions.create(model="hot", prompt=PROMPT, max_tokens=6, temperature=0)
    same = client.completions.create(model="spare/extra", prompt=PROMPT, max_tokens=6, temperature=0)
    assert hot.choices[0].text == same.choices[0].text
    status, _ = server.request("POST", "/v1/load_lora_adapter",
                               {"lora_name": "hot", "lora_path": str(folder / "qv")})
    assert status == 400                                  # the name is taken by another folder
    assert server.request("POST", "/v1/unload_lora_adapter", {"lora_name": "hot"})[0] == 200
    assert "hot" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="hot", prompt=PROMPT, max_tokens=2)


@pytest.mark.parametrize("path,words", [("../outside/evil", "'..'"), ("{root}/outside/evil", "outside"),
                                        ("/etc", "outside"), ("qv/adapter_model.bin", "pickle"),
                                        ("spare/wrongbase", "base model mismatch"),
                                        ("missing", "no such adapter folder")])
def test_hot_load_refusals_leave_the_server_serving(server, client, lib, path, words):
    root, _, _ = lib
    status, reply = server.request("POST", "/v1/load_lora_adapter",
                                   {"lora_name": "bad", "lora_path": path.format(root=root)})
    assert status == 400 and words in reply["error"]["message"], reply
    assert "bad" not in [m.id for m in client.models.list().data]
    assert client.completions.create(model="qv", prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text


def test_corrupt_adapter_fails_its_own_requests_only(server, client, lib):
    _, _, folder = lib
    broken = folder / "broken"
    shutil.copytree(folder / "qv", broken)
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[:len(data) // 2])      # truncated
    with pytest.raises(openai.BadRequestError, match="corrupt or truncated"):
        client.completions.create(model="broken", prompt=PROMPT, max_tokens=2)
    models = {m.id: m for m in client.models.list().data}
    assert models["broken"].model_extra["parity"] == "refused"
    assert client.completions.create(model="mlp", prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text
    shutil.rmtree(broken)


def test_disconnect_mid_stream_frees_the_slot(server):
    # ignore_eos: a sampled end-of-text token would end the stream before the client leaves
    body = json.dumps({"model": "qv", "prompt": PROMPT, "max_tokens": 240, "stream": True,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while received.count(b"data: ") < 3:
            received += sock.recv(4096)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = server.request("GET", "/health")[1]
        if health["active"] == 0:
            break
        time.sleep(0.1)
    assert health["active"] == 0, health
    metrics = server.request("GET", "/metrics")[1]
    count = next(line for line in metrics.splitlines()
                 if line.startswith("lorakit_client_disconnects_total"))
    assert float(count.split()[-1]) >= 1


def test_metrics_are_prometheus_text(server):
    status, text = server.request("GET", "/metrics")
    assert status == 200
    for name in ("lorakit_requests_total", "lorakit_generated_tokens_total", "lorakit_queue_depth",
                 "lorakit_batch_size", "lorakit_resident_adapters", "lorakit_adapter_load_seconds_bucket"):
        assert name in text, name


def test_adapters_load_and_unload_while_requests_stream(server, client, lib):
    """Fault test: hot loads and unloads of other adapters while streams over two adapters run."""
    _, _, folder = lib
    errors, texts = [], []

    def stream(model):
        try:
            out = client.completions.create(model=model, prompt=PROMPT, max_tokens=30, temperature=0,
                                            stream=True)
            texts.append((model, "".join(c.choices[0].text for c in out if c.choices)))
        except Exception as err:                       # noqa: BLE001 - counted, must stay zero
            errors.append(repr(err))

    threads = [threading.Thread(target=stream, args=(m,)) for m in ["qv", "mlp"] * 4]
    for t in threads:
        t.start()
    for i in range(4):
        name = f"churn{i % 2}"
        assert server.request("POST", "/v1/load_lora_adapter",
                              {"lora_name": name, "lora_path": str(folder / "spare" / "extra")})[0] == 200
        assert server.request("POST", "/v1/unload_lora_adapter", {"lora_name": name})[0] == 200
    for t in threads:
        t.join(120)
    assert not errors and len(texts) == 8
    alone = {m: client.completions.create(model=m, prompt=PROMPT, max_tokens=30, temperature=0)
             .choices[0].text for m in ("qv", "mlp")}
    assert all(text == alone[m] for m, text in texts)


def test_queue_bound_gives_429_and_an_api_key_is_enforced(lib):
    root, base, folder = lib
    key = "k" * 24
    srv = ServerProcess(base, [folder], "--max-batch", "1", "--max-queue", "1", api_key=key,
                        log=root / "server-small.log")
    try:
        assert srv.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert srv.request("GET", "/metrics", headers={"Authorization": ""})[0] == 401
        assert srv.request("GET", "/health", headers={"Authorization": ""})[0] == 200
        statuses = []

        def call():
            statuses.append(srv.request("POST", "/v1/completions",
                                        {"model": "qv", "prompt": PROMPT, "max_tokens": 60})[0])

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert 429 in statuses and 200 in statuses, statuses
        good = openai.OpenAI(base_url=srv.url, api_key=key, max_retries=0)
        assert good.completions.create(model="qv", prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url, api_key="x" * 24, max_retries=0).models.list()
    finally:
        srv.stop()


def _junk(rng, depth=0):
    kinds = ["int", "big", "float", "nan", "str", "uni", "bool", "none", "list", "dict"]
    kind = rng.choice(kinds[:8] if depth > 1 else kinds)
    return {"int": lambda: rng.randint(-5, 5), "big": lambda: rng.choice([10**30, -(10**30), 2**63]),
            "float": lambda: rng.uniform(-3, 3), "nan": lambda: float(rng.choice(["nan", "inf", "-inf"])),
            "str": lambda: rng.choice(["", "qv", "tiny", "../x", "a" * 5000, "user"]),
            "uni": lambda: "\u202e\u0000\U0001f600" * rng.randint(1, 3), "bool": lambda: rng.random() < 0.5,
            "none": lambda: None, "list": lambda: [_junk(rng, depth + 1) for _ in range(rng.randint(0, 3))],
            "dict": lambda: {rng.choice(["role", "content", "type", "text", "x"]): _junk(rng, depth + 1)
                             for _ in range(rng.randint(0, 3))}}[kind]()


def test_fuzzed_bodies_never_crash_the_server(server):
    """Valid bodies with one field replaced by junk, and junk bodies: every answer is a JSON 2xx/4xx,
    never a 5xx, and the server keeps serving (bounded: 120 requests, at most 4 new tokens each)."""
    import random
    rng = random.Random(14)
    valid = {"/v1/completions": {"model": "qv", "prompt": PROMPT, "max_tokens": 4},
             "/v1/chat/completions": {"model": "qv", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 4},
             "/v1/classify": {"model": "qv", "input": "x"},
             "/v1/load_lora_adapter": {"lora_name": "fz", "lora_path": "spare/extra"},
             "/v1/unload_lora_adapter": {"lora_name": "fz"}}
    statuses = []
    for i in range(120):
        path = rng.choice(list(valid))
        body = dict(valid[path])
        if i % 4 == 0:
            body = _junk(rng)
        else:
            field = rng.choice(list(body) + ["temperature", "top_p", "stop", "seed", "stream", "n"])
            body[field] = _junk(rng)
            if field == "max_tokens" and isinstance(body[field], int) and not isinstance(body[field], bool):
                body[field] = min(body[field], 4)
        raw = json.dumps(body).encode()
        status, reply = server.request("POST", path, raw=raw)
        statuses.append(status)
        assert status < 500, (path, body, reply)
        assert isinstance(reply, dict) or status == 200, (path, body, reply)
    assert server.alive() and 200 in statuses and 400 in statuses
    server.request("POST", "/v1/unload_lora_adapter", {"lora_name": "fz"})


def test_cli_refuses_an_open_host_without_a_key_before_loading(tmp_path):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "lorakit", "serve", "--model", "smollm2", "--adapters",
                           str(tmp_path), "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--api-key" in done.stderr, done.stderr
