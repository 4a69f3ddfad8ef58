"""The serving core in process (no HTTP): the running batch's cache edits, greedy tokens alone ==
in a mixed continuous batch, the adapter cache (LRU, load checks, serve parity)."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("prometheus_client")

import lorakit  # noqa: E402
from finetune_helpers import tiny_llama  # noqa: E402
from lorakit.errors import LoraError  # noqa: E402
from lorakit.generate.decode import decode  # noqa: E402
from lorakit.generate.sampling import Sampling  # noqa: E402
from lorakit.io.fingerprint import FINGERPRINT_KEY, compare, fingerprint, probe_output  # noqa: E402
from lorakit.io.names import META_KEY, WEIGHTS_NAME  # noqa: E402
from lorakit.models import load  # noqa: E402
from lorakit.serve.batch import RunningBatch  # noqa: E402
from lorakit.serve.scheduler import GenRequest  # noqa: E402
from lorakit.serve.server import build_server  # noqa: E402
from lorakit.serve.settings import ServeSettings  # noqa: E402
from serve_helpers import base_dir, make_adapter  # noqa: E402

PROMPTS = [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13, 14, 15, 16], [1, 20], [1, 3, 4, 8, 30, 31],
           [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [1, 33, 2, 33]]
WAIT_S = 60


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The tiny Llama folder and three adapters of different targets and ranks."""
    root = tmp_path_factory.mktemp("serve")
    base = base_dir(root)
    folder = root / "adapters"
    make_adapter(base, folder / "qv", seed=1, targets="qv", r=4)
    make_adapter(base, folder / "mlp", seed=2, targets="mlp", r=8)
    make_adapter(base, folder / "runs" / "all" / "adapter", seed=3, targets="all", r=2)
    return base, folder


def _server(library, **kw):
    base, folder = library
    return build_server(ServeSettings(model=str(base), adapters=[folder], **kw),
                        load(base, task="causal-lm"))


class Collector:
    """A request's events, and a flag when it ended."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event[0] in ("end", "error"):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e[1] for e in self.events if e[0] == "text")


def _request(prompt, adapter, max_tokens=12, **sampling) -> tuple[GenRequest, Collector]:
    sink = Collector()
    return GenRequest(prompt, adapter, max_tokens, Sampling(max_new_tokens=max_tokens, **sampling),
                      sink), sink


def _run(server, jobs, stagger_s=0.0) -> list[str]:
    """Submit (prompt, adapter) jobs (optionally one every ``stagger_s``), return each text."""
    sinks = []
    for prompt, adapter in jobs:
        req, sink = _request(prompt, adapter)
        server.scheduler.submit(req)
        sinks.append(sink)
        time.sleep(stagger_s)
    for sink in sinks:
        assert sink.done.wait(WAIT_S), "request did not finish"
        assert sink.events[-1][0] == "end", sink.events[-1]
    return [s.text for s in sinks]


def test_running_batch_join_and_leave_equal_recomputed_logits():
    """Rows that joined at different times and survived others leaving have the logits a fresh
    forward of their whole sequence gives: the cache edits lose nothing and mix no rows."""
    model = tiny_llama(vocab=64, seed=5)
    batch = RunningBatch()
    with torch.no_grad():
        batch.join(model, ["a", "b"], PROMPTS[:2], pad_id=2)
        seqs = {r: list(p) for r, p in zip("ab", PROMPTS[:2])}
        for step in range(6):
            chosen = batch.state.logits.argmax(-1)
            for row, token in zip(batch.rows, chosen.tolist()):
                seqs[row].append(token)
            if step == 2:
                batch.keep([False, True, True, True])       # "a" leaves; padding trimmed
                chosen = chosen[1:]
            batch.step(model, chosen)
            if step == 1:
                batch.join(model, ["c", "d"], PROMPTS[4:6], pad_id=2)   # longer and shorter prompts
                seqs.update({"c": list(PROMPTS[4]), "d": list(PROMPTS[5])})
        assert batch.rows == ["b", "c", "d"]
        assert batch.state.mask.any(0).all()                # no column is padding in every row
        for i, row in enumerate(batch.rows):
            fresh = model(torch.tensor([seqs[row]])).logits[0, -1]
            torch.testing.assert_close(batch.state.logits[i], fresh, atol=1e-4, rtol=1e-4)


def test_greedy_tokens_alone_equal_mixed_continuous_batch(library):
    """The same greedy request gives the same tokens served alone, or in a batch that mixes adapters
    (and the base), where requests of different lengths join and leave mid-decoding; and both equal
    plain KV-cached decoding with that adapter active (no mixed path at all)."""
    jobs = [(PROMPTS[i], name) for i, name in enumerate(["qv", "mlp", None, "runs/all", "qv", "mlp"])]
    server = _server(library)
    server.scheduler.start()
    try:
        alone = [_run(server, [job])[0] for job in jobs]
        together = _run(server, jobs)
        staggered = _run(server, jobs[::-1], stagger_s=0.05)[::-1]
        assert server.metrics.batch_sizes._sum.get() > 0
    finally:
        server.scheduler.stop()
    assert together == alone
    assert staggered == alone
    assert len(set(alone)) >= 5                          # the adapters really answer differently
    base, folder = library
    model, tok = load(base, task="causal-lm")
    for (prompt, name), text in zip(jobs, alone):
        if name is not None:
            path = folder / name / "adapter" if name == "runs/all" else folder / name
            lorakit.load_adapter(model, path, name)
            lorakit.set_adapter(model, name)
        ids = decode(model, [prompt], Sampling(max_new_tokens=12), {2}, pad_id=2)[0]
        if name is not None:
            lorakit.delete_adapter(model, name)
        assert tok.decode(ids, skip_special_tokens=True) == text, name


def test_lru_keeps_at_most_max_loaded_and_reloads_on_demand(library):
    server = _server(library, max_loaded=2)
    server.scheduler.start()
    try:
        first = _run(server, [(PROMPTS[0], "qv")])
        _run(server, [(PROMPTS[1], "mlp"), (PROMPTS[2], "runs/all")])   # qv is evicted
        assert len(server.adapters.resident) == 2 and "qv" not in server.adapters.resident
        assert server.metrics.adapter_evictions._value.get() >= 1
        again = _run(server, [(PROMPTS[0], "qv")])                    # loaded again, same answer
        assert again == first
        assert list(server.adapters.resident)[-1] == "qv"
        # four requests over three adapters with two slots: every one is answered (they wait)
        texts = _run(server, [(PROMPTS[i], n) for i, n in enumerate(["qv", "mlp", "runs/all", "qv"])])
        assert all(texts)
    finally:
        server.scheduler.stop()


def test_sampled_requests_are_seeded_and_max_tokens_and_stop_strings_end_them(library):
    server = _server(library)
    server.scheduler.start()
    try:
        runs = []
        for _ in range(2):
            req, sink = _request(PROMPTS[1], "qv", max_tokens=10, temperature=1.0, seed=11)
            server.scheduler.submit(req)
            assert sink.done.wait(WAIT_S)
            runs.append(sink)
        assert runs[0].text == runs[1].text and runs[0].events[-1][1] == "length"
        assert runs[0].events[-1][3] == 10                              # completion tokens
        full = runs[0].text
        stop = full.split()[2]
        req, sink = _request(PROMPTS[1], "qv", max_tokens=10, temperature=1.0, seed=11)
        req.stop = [stop]
        server.scheduler.submit(req)
        assert sink.done.wait(WAIT_S)
        assert sink.events[-1][1] == "stop" and stop not in sink.text
        assert full.startswith(sink.text)
    finally:
        server.scheduler.stop()


def test_cancelled_request_leaves_the_batch(library):
    server = _server(library)
    server.scheduler.start()
    try:
        req, sink = _request(PROMPTS[0], "qv", max_tokens=200)
        server.scheduler.submit(req)
        deadline = time.monotonic() + WAIT_S
        while not sink.events and time.monotonic() < deadline:
            time.sleep(0.01)
        req.cancelled = True
        server.scheduler.wake()
        while server.scheduler.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.scheduler.active == 0
        assert server.adapters.entries["qv"].pins == 0
        assert len([e for e in sink.events if e[0] == "text"]) < 150
    finally:
        server.scheduler.stop()


# --- load checks and serve parity -------------------------------------------------------------
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder, tensors_fn=None, meta_fn=None):
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = folder / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    record = json.loads(meta[META_KEY])
    if tensors_fn:
        tensors_fn(tensors)
    if meta_fn:
        meta_fn(record)
    save_file(tensors, str(path), metadata={**meta, META_KEY: json.dumps(record)})


def test_load_checks_refuse_damaged_adapters_and_keep_the_others(library, tmp_path):
    base, folder = library
    bad = tmp_path / "lib"
    _copy(folder / "qv", bad / "good")
    _rewrite(_copy(folder / "qv", bad / "nan"),
             lambda t: t.__setitem__(next(k for k in t if "lora_B" in k),
                                     torch.full_like(t[next(k for k in t if "lora_B" in k)], float("nan"))))
    # same shapes, other numbers, fingerprint not updated: loads, but would not serve as it trained
    _rewrite(_copy(folder / "qv", bad / "drifted"),
             lambda t: [v.mul_(1.5) for k, v in t.items() if "lora_B" in k])
    # a fingerprint recorded on another base (same shapes, other weights)
    _rewrite(_copy(folder / "qv", bad / "otherbase"),
             meta_fn=lambda r: r[FINGERPRINT_KEY].update(
                 base=[[v + 1.0 for v in row] for row in r[FINGERPRINT_KEY]["base"]],
                 adapted=[[v + 1.0 for v in row] for row in r[FINGERPRINT_KEY]["adapted"]]))
    (bad / "pickled").mkdir()
    (bad / "pickled" / "adapter_config.json").write_text((folder / "qv" / "adapter_config.json").read_text())
    torch.save({"x": torch.zeros(1)}, bad / "pickled" / "adapter_model.bin")
    (bad / "garbage").mkdir()
    (bad / "garbage" / "adapter_config.json").write_text((folder / "qv" / "adapter_config.json").read_text())
    (bad / "garbage" / WEIGHTS_NAME).write_bytes(b"\x00" * 64)
    server = build_server(ServeSettings(model=str(base), adapters=[bad]), load(base, task="causal-lm"))
    cache = server.adapters
    assert cache.ensure_resident("good").parity.startswith("checked")
    expect = {"nan": "NaN", "drifted": "base model matches", "otherbase": "bare base model differs",
              "pickled": "pickle", "garbage": "corrupt"}
    for name, words in expect.items():
        with pytest.raises(LoraError, match=words):
            cache.ensure_resident(name)
        assert cache.entries[name].key is None
    assert list(cache.resident) == ["good"]
    # the model still serves the good adapter exactly as before
    with lorakit.mixed_adapters(server.model, [cache.entries["good"].key]):
        out = probe_output(server.model)
    record = json.loads(__import__("safetensors").safe_open(str(bad / "good" / WEIGHTS_NAME), "pt")
                        .metadata()[META_KEY])[FINGERPRINT_KEY]
    assert compare(record, out).ok


def test_fingerprint_is_recorded_and_detects_a_dropped_adapter(library):
    base, folder = library
    model, _ = load(base, task="causal-lm")
    lorakit.load_adapter(model, folder / "mlp")
    record = fingerprint(model)
    assert record["shape"] == [8, 64] and 8 < len(record["columns"]) <= 16
    lorakit.set_adapter(model, "default")
    assert compare(record, probe_output(model)).ok
    with lorakit.disable_adapter(model):                    # served without the adapter
        check = compare(record, probe_output(model), probe_output(model))
    assert not check.ok and "base model matches" in check.message


def test_settings_refuse_an_open_host_without_a_key(tmp_path):
    with pytest.raises(LoraError, match="--api-key"):
        ServeSettings(model="m", adapters=[tmp_path], host="0.0.0.0")
    with pytest.raises(LoraError, match="at least 8"):
        ServeSettings(model="m", adapters=[tmp_path], host="0.0.0.0", api_key="short")
    assert ServeSettings(model="m", adapters=[tmp_path], host="0.0.0.0", api_key="k" * 16).api_key
    with pytest.raises(LoraError, match="no such folder"):
        ServeSettings(model="m", adapters=[tmp_path / "missing"])


def test_adapter_paths_stay_inside_the_served_folders(library, tmp_path):
    from lorakit.serve.security import adapter_path, discover, key_matches
    _, folder = library
    root = tmp_path / "served"
    root.mkdir()
    shutil.copytree(folder / "qv", root / "ok")
    (root / "escape").symlink_to((folder / "mlp").resolve())        # a symlink leading out
    (root / ".tmp-half").mkdir()                                      # an unfinished atomic write
    (root / ".tmp-half" / "adapter_config.json").write_text("{}")
    assert set(discover([root])) == {"ok"}
    assert adapter_path("ok", [root]) == root / "ok"
    assert adapter_path(str(root / "ok"), [root]).resolve() == (root / "ok").resolve()
    for path, words in [("../x", "'..'"), ("escape", "no such adapter folder"),
                        (str(folder / "mlp"), "outside"), ("ok/adapter_model.pt", "pickle"),
                        ("", "non-empty"), ("ok\x00", "non-empty")]:
        with pytest.raises(LoraError, match=words):
            adapter_path(path, [root])
    assert key_matches("Bearer secret-key", "secret-key") and not key_matches("Bearer secret-kez", "secret-key")
    assert not key_matches(None, "secret-key") and key_matches(None, None)


def test_a_request_for_a_busy_adapter_slot_is_not_starved(library):
    """max_loaded=1: clients keep the resident adapter busy in a closed loop; a request for another
    adapter waits, then the busy adapter drains (PATIENCE_STEPS) and it is served."""
    from lorakit.serve.scheduler import PATIENCE_STEPS
    server = _server(library, max_loaded=1)
    server.scheduler.start()
    stop, served = threading.Event(), [0]

    def client(tokens):
        while not stop.is_set():
            req, sink = _request(PROMPTS[0], "qv", max_tokens=tokens)
            server.scheduler.submit(req)
            assert sink.done.wait(WAIT_S)
            served[0] += 1

    # different lengths, so the busy adapter is (almost) never idle between two of its requests
    threads = [threading.Thread(target=client, args=(n,)) for n in (5, 6, 7, 9)]
    try:
        for t in threads:
            t.start()
        while served[0] < 3:
            time.sleep(0.01)
        start = server.scheduler.steps
        req, sink = _request(PROMPTS[1], "mlp", max_tokens=4)
        server.scheduler.submit(req)
        assert sink.done.wait(WAIT_S) and sink.events[-1][0] == "end"
        waited = server.scheduler.steps - start
        assert waited <= PATIENCE_STEPS + 9 + 8, waited
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT_S)
        server.scheduler.stop()
    assert served[0] > 6                                   # the busy adapter kept being served too


def test_cached_row_stacks_follow_in_place_changes_and_replaced_adapters():
    """Serving reuses each layer's stacked factors between steps; a factor edited in place, or an
    adapter deleted and added again under the same name, must be seen at the next forward."""
    model = tiny_llama(vocab=64, seed=6)
    cfg = lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    lorakit.apply_lora(model, cfg, adapter_name="a")
    lorakit.add_adapter(model, "b", cfg)
    ids = torch.tensor([PROMPTS[0], PROMPTS[0]])

    def mixed():
        with torch.no_grad(), lorakit.mixed_adapters(model, ["a", "b"]):
            return model(ids).logits

    first = mixed()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora.b.B" in n:
                p.add_(0.5)
    second = mixed()
    assert torch.equal(first[0], second[0]) and not torch.allclose(first[1], second[1])
    lorakit.set_adapter(model, "b")
    with torch.no_grad():
        alone = model(ids[1:]).logits
    torch.testing.assert_close(second[1], alone[0], atol=1e-5, rtol=1e-5)
    lorakit.delete_adapter(model, "b")
    lorakit.add_adapter(model, "b", cfg)
    third = mixed()                                       # fresh "b": B = 0, the base again
    with torch.no_grad(), lorakit.disable_adapter(model):
        base = model(ids[1:]).logits
    torch.testing.assert_close(third[1], base[0], atol=1e-5, rtol=1e-5)
