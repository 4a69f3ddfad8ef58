"""User mistakes, one table: each must raise LoraError, say what is wrong or how to fix it, and change
nothing: a refused call leaves the model exactly as it was.

A case is (id, setup, action, expected substrings). ``setup(model, folder)`` builds the situation
(an adapter on the model, a damaged file on disk); then the model's tensors (bitwise), module types,
requires_grad flags, adapter bookkeeping and every file under ``folder`` are recorded, ``action`` must
raise, and all of it must read the same afterwards.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit
from conftest import TinyNet, randomize_adapters
from lorakit.layers import LoraLayer

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def tiny(**kw) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(**kw).eval()


def cfg(**kw) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(**{"r": 4, "alpha": 8, "target_modules": ["query", "value"], **kw})


# --- setups -----------------------------------------------------------------------------------------
def adapted(model, folder, **kw):
    lorakit.apply_lora(model, cfg(**kw))
    randomize_adapters(model)


def two_adapters_merged(model, folder):
    adapted(model, folder)
    lorakit.add_adapter(model, "other", cfg(target_modules=["query"]))
    lorakit.merge_lora(model)


def nan_in_a_factor(model, folder):
    adapted(model, folder)
    with torch.no_grad():                     # the last layer: earlier ones would merge first
        model.layers[1].value.lora["default"].B[0, 0] = math.nan


def two_adapters_with_heads(model, folder):
    adapted(model, folder, modules_to_save=["classifier"])
    lorakit.add_adapter(model, "other", cfg(modules_to_save=["classifier"]))


def saved(source=None, **kw):
    """Setup: an adapter saved from ``source`` (default: an identical TinyNet) into folder/adapter."""
    def setup(model, folder):
        other = source() if source else tiny()
        adapted(other, folder, **kw)
        lorakit.save_adapter(other, folder / "adapter")
    return setup


def saved_then(edit, **kw):
    """Setup: a good adapter, then ``edit(folder / "adapter")`` damages it."""
    def setup(model, folder):
        saved(**kw)(model, folder)
        edit(folder / "adapter")
    return setup


def config_edit(**changes):
    """Set (or, with value ``...``, delete) fields of adapter_config.json."""
    def edit(adapter):
        data = json.loads((adapter / CONFIG).read_text())
        for key, value in changes.items():
            if value is ...:
                del data[key]
            else:
                data[key] = value
        (adapter / CONFIG).write_text(json.dumps(data))
    return edit


def tensor_edit(change, keep_meta=True):
    """Rewrite adapter_model.safetensors after ``change(tensors)`` (keys without the prefix)."""
    def edit(adapter):
        path = str(adapter / WEIGHTS)
        with safe_open(path, "pt") as handle:
            meta = handle.metadata()
        tensors = {k.removeprefix("base_model.model."): v for k, v in load_file(path).items()}
        change(tensors)
        save_file({"base_model.model." + k: v for k, v in tensors.items()}, path,
                  metadata=meta if keep_meta else {"format": "pt"})
    return edit


def rename(old, new):
    def change(tensors):
        for key in [k for k in tensors if k.startswith(old + ".")]:
            tensors[new + key[len(old):]] = tensors.pop(key)
    return change


def truncate(adapter):
    data = (adapter / WEIGHTS).read_bytes()
    (adapter / WEIGHTS).write_bytes(data[: len(data) // 2])


def scramble_header(adapter):
    data = bytearray((adapter / WEIGHTS).read_bytes())
    data[8:40] = b"\xff\xfe garbage \x00" * 2 + b"\x13" * 8
    (adapter / WEIGHTS).write_bytes(bytes(data))


class _Trap:
    """Unpickling this creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_beside_config(model, folder):
    """A PEFT folder as old versions wrote it: adapter_model.bin (a pickle), no safetensors."""
    saved()(model, folder)
    (folder / "adapter" / WEIGHTS).unlink()
    (folder / "adapter" / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(folder / "UNPICKLED")))


def pickle_file(model, folder):
    (folder / "adapter.pt").write_bytes(pickle.dumps(_Trap(folder / "UNPICKLED")))


def head_for_score(adapter):
    """The config names a "score" head (as PEFT's SEQ_CLS does) and the file really holds its weights,
    though this model has no such module."""
    config_edit(modules_to_save=["classifier", "score"])(adapter)
    tensor_edit(lambda t: t.update({"score.weight": torch.zeros(3, 32)}))(adapter)


def link_out(adapter, name):
    """Move ``name`` out of the adapter folder and leave a symlink to it in its place."""
    outside = adapter.parent / f"outside-{name}"
    (adapter / name).rename(outside)
    (adapter / name).symlink_to(outside)


def failing_load():
    """load_adapter whose last step fails after the adapter was injected: the model must come back."""
    def action(model, folder):
        from unittest import mock

        def boom(*args, **kwargs):
            raise lorakit.LoraError("injected failure")
        with mock.patch("lorakit.io.load.set_trainable", side_effect=boom):
            return lorakit.load_adapter(model, folder / "adapter", trainable=True)
    return action


def only_config(model, folder):
    saved()(model, folder)
    (folder / "adapter" / WEIGHTS).unlink()


# --- actions ----------------------------------------------------------------------------------------
def apply(**kw):
    return lambda model, folder: lorakit.apply_lora(model, cfg(**kw))


def load(name="adapter", **kw):
    return lambda model, folder: lorakit.load_adapter(model, folder / name, **kw)


def call(fn, *args, **kw):
    return lambda model, folder: fn(model, *args, **kw)


CASES = [
    # --- config values: refused when the LoraConfig is made ---------------------------------------
    ("r-zero", None, apply(r=0), ["r=0", "positive integer"]),
    ("r-negative", None, apply(r=-2), ["r=-2"]),
    ("r-float", None, apply(r=4.0), ["r=4.0", "integer"]),
    ("r-string", None, apply(r="8"), ["r='8'"]),
    ("r-bool", None, apply(r=True), ["r=True"]),
    ("alpha-zero", None, apply(alpha=0), ["alpha=0", "positive finite"]),
    ("alpha-nan", None, apply(alpha=math.nan), ["alpha=nan"]),
    ("alpha-inf", None, apply(alpha=math.inf), ["alpha=inf"]),
    ("dropout-negative", None, apply(dropout=-0.1), ["dropout=-0.1", "[0, 1)"]),
    ("dropout-one", None, apply(dropout=1.0), ["dropout=1.0", "[0, 1)"]),
    ("bias-unknown", None, apply(bias="lora"), ["bias='lora'", "'lora_only'"]),
    ("init-unknown", None, apply(init="xavier"), ["init='xavier'", "'gaussian'"]),
    ("targets-empty-list", None, apply(target_modules=[]), ["target_modules is empty", "all-linear"]),
    ("targets-none-unknown-architecture", None, apply(target_modules=None),
     ["target_modules=None", "model_type is None", "'all-linear'"]),
    ("targets-bad-regex", None, apply(target_modules="layers\\.(query"), ["not a valid regex",
                                                                         "list of suffixes"]),
    ("targets-empty-string-in-list", None, apply(target_modules=["query", ""]), ["non-empty strings"]),
    ("rank-pattern-zero", None, apply(rank_pattern={"query": 0}), ["rank_pattern['query']=0"]),
    ("alpha-pattern-negative", None, apply(alpha_pattern={"value": -1}), ["alpha_pattern['value']=-1"]),
    ("fused-slices-all-false", None, apply(target_modules=["qkv"], fused_slices={"qkv": [False] * 3}),
     ["fused_slices['qkv']", "at least one True"]),
    ("fused-slices-uneven", None, apply(target_modules=["qkv"], fused_slices={"qkv": [True] * 5}),
     ["out_features=48", "does not divide evenly"]),
    ("layers-to-transform-negative", None, apply(layers_to_transform=[-1]), ["layers_to_transform=[-1]"]),
    ("config-unknown-field", None, call(lambda m: lorakit.LoraConfig.from_dict({"rank": 8})),
     ["['rank']", "known fields"]),
    ("config-not-a-loraconfig", None, call(lorakit.apply_lora, {"r": 8, "target_modules": ["query"]}),
     ["lorakit.LoraConfig", "builtins.dict"]),
    # --- targeting -------------------------------------------------------------------------------
    ("target-typo", None, apply(target_modules=["qeury"]), ["'qeury'", "did you mean ['query'"]),
    ("one-of-two-targets-typo", None, apply(target_modules=["query", "vlaue"]),
     ["['vlaue']", "did you mean ['value'"]),
    ("target-regex-matches-nothing", None, apply(target_modules=r"layers\.\d\.qkvo"),
     ["matched no module"]),
    ("target-layernorm", None, apply(target_modules=["norm"]), ["'layers.0.norm'", "LayerNorm",
                                                                "nn.Linear"]),
    ("target-container", None, apply(target_modules=["layers.0"]), ["is Block", "'layers.0.query'"]),
    ("layers-to-transform-removes-all", None, apply(layers_to_transform=[7]), ["removed them all"]),
    ("modules-to-save-typo", None, apply(modules_to_save=["clasifier"]), ["'clasifier'", "classifier"]),
    ("adapter-name-with-dot", None, call(lorakit.apply_lora, cfg(), adapter_name="task.a"),
     ["'task.a'", "without dots"]),
    # --- several adapters ------------------------------------------------------------------------
    ("duplicate-adapter-name", adapted, apply(), ["'default' already exists", "delete_adapter"]),
    ("duplicate-via-add-adapter", adapted, call(lorakit.add_adapter, "default", cfg()),
     ["'default' already exists"]),
    ("set-adapter-unknown", adapted, call(lorakit.set_adapter, "other"),
     ["no adapter named 'other'", "['default']"]),
    ("set-adapter-on-bare-model", None, call(lorakit.set_adapter, "default"),
     ["no LoRA adapters", "apply_lora"]),
    ("delete-adapter-unknown", adapted, call(lorakit.delete_adapter, "dflt"), ["'dflt'", "['default']"]),
    ("two-active-heads", two_adapters_with_heads, call(lorakit.set_adapter, ["default", "other"]),
     ["modules_to_save", "only one of them"]),
    ("merged-then-set-adapter", two_adapters_merged, call(lorakit.set_adapter, "other"),
     ["merged", "unmerge_lora(model)"]),
    ("merged-then-delete-adapter", two_adapters_merged, call(lorakit.delete_adapter, "default"),
     ["'default' is merged", "unmerge_lora(model)"]),
    ("merge-with-nan", nan_in_a_factor, call(lorakit.merge_lora),
     ["NaN", "'layers.1.value'", "nothing was changed"]),
    ("save-bare-model", None, call(lorakit.save_adapter, "never-written"), ["no LoRA adapters"]),
    ("save-unknown-adapter", adapted, call(lorakit.save_adapter, "never-written", adapter_name="x"),
     ["no adapter named 'x'"]),
    # --- loading: paths and files ----------------------------------------------------------------
    ("load-missing-dir", None, load("nowhere"), ["nowhere", "does not exist"]),
    ("load-dir-without-safetensors", only_config, load(), [f"has no {WEIGHTS}", CONFIG]),
    ("load-pickle-bin", pickle_beside_config, load(), ["adapter_model.bin", "never unpickles",
                                                       "safetensors"]),
    ("load-pt-path", pickle_file, load("adapter.pt"), ["adapter.pt", "is a pickle file"]),
    ("load-missing-config", saved_then(lambda a: (a / CONFIG).unlink()), load(),
     [f"has no {CONFIG}", "save_pretrained"]),
    ("load-malformed-json", saved_then(lambda a: (a / CONFIG).write_text('{"r": 4,')), load(),
     ["not valid JSON"]),
    ("load-json-not-object", saved_then(lambda a: (a / CONFIG).write_text("[4, 8]")), load(),
     ["JSON object", "list"]),
    ("load-peft-type-ia3", saved_then(config_edit(peft_type="IA3")), load(), ["peft_type='IA3'", "LORA"]),
    ("load-config-missing-r", saved_then(config_edit(r=...)), load(), ["lacks 'r'"]),
    ("load-config-r-string", saved_then(config_edit(r="4")), load(), ["r='4'"]),
    ("load-use-dora", saved_then(config_edit(use_dora=True)), load(), ["DoRA", "use_dora"]),
    ("load-layer-replication", saved_then(config_edit(layer_replication=[[0, 2], [1, 2]])), load(),
     ["layer_replication", "silently"]),
    ("load-lora-bias", saved_then(config_edit(lora_bias=True)), load(), ["lora_bias"]),
    ("load-pissa-init", saved_then(config_edit(init_lora_weights="pissa")), load(),
     ["init_lora_weights='pissa'", "convert"]),
    ("load-truncated-safetensors", saved_then(truncate), load(), [WEIGHTS, "corrupt or truncated"]),
    ("load-corrupt-bytes", saved_then(scramble_header), load(), [WEIGHTS, "corrupt or truncated"]),
    # --- loading: contents vs this model ---------------------------------------------------------
    ("load-missing-lora-B", saved_then(tensor_edit(lambda t: t.pop("layers.0.value.lora_B.weight"))),
     load(), ["layers.0.value.lora_B is missing"]),
    ("load-unexpected-key",
     saved_then(tensor_edit(lambda t: t.update({"layers.0.mystery.weight": torch.ones(2)}))), load(),
     ["unexpected key 'base_model.model.layers.0.mystery.weight'"]),
    ("load-no-lora-keys", saved_then(tensor_edit(lambda t: t.clear())), load(), ["no LoRA weights"]),
    ("load-wider-base", saved(source=lambda: tiny(d=32)), load(),
     ["'layers.0.query'", "(32, 32)", "(16, 16)", "Nothing was changed"]),
    ("load-wider-base-no-metadata", saved_then(tensor_edit(lambda t: None, keep_meta=False),
                                               source=lambda: tiny(d=32)), load(),
     ["'layers.0.query'", "A(4, 32) B(32, 4)", "in_features=16", "A(4, 16) B(16, 4)"]),
    ("load-rank-of-A-and-B-disagree",
     saved_then(tensor_edit(lambda t: t.update({"layers.0.query.lora_B.weight": torch.ones(16, 2)}))),
     load(), ["'layers.0.query'", "B(16, 2)"]),
    ("load-module-model-lacks", saved_then(tensor_edit(rename("layers.1.query", "layers.5.query"))),
     load(), ["'layers.5.query'", "does not have"]),
    ("load-target-is-layernorm-here", saved_then(tensor_edit(rename("layers.0.query", "layers.0.norm"))),
     load(), ["'layers.0.norm'", "LayerNorm"]),
    ("load-bias-shape", saved_then(tensor_edit(lambda t: t.update(
        {"layers.0.query.base_layer.bias": torch.ones(5)})), bias="lora_only"), load(),
     ["'layers.0.query'", "(5,)", "(16,)"]),
    ("load-head-missing-from-file",
     saved_then(tensor_edit(lambda t: [t.pop(k) for k in ("classifier.weight", "classifier.bias")]),
                modules_to_save=["classifier"]), load(), ["modules_to_save weights missing",
                                                          "classifier.weight"]),
    ("load-head-other-shape", saved(source=lambda: tiny(classes=5), modules_to_save=["classifier"]),
     load(), ["'classifier.bias'", "(5,)", "(3,)", "another base model"]),
    ("load-head-model-lacks", saved_then(head_for_score, modules_to_save=["classifier"]), load(),
     ["unexpected key 'base_model.model.score.weight'"]),
    ("load-name-taken", lambda m, f: (adapted(m, f), saved()(m, f)), load(),
     ["already has an adapter named 'default'"]),
    # --- loading: files PEFT would refuse or that can only compute garbage (issue 16) -------------
    ("load-r-huge", saved_then(config_edit(r=10**9)), load(),
     ["rank 1000000000", "factors have rank 4", "inconsistent"]),
    ("load-r-smaller-than-tensors", saved_then(config_edit(r=2)), load(),
     ["'layers.0.query' rank 2", "factors have rank 4"]),
    ("load-rank-pattern-disagrees", saved_then(config_edit(rank_pattern={"layers.1.value": 8})), load(),
     ["'layers.1.value' rank 8", "rank_pattern"]),
    ("load-nan-factor", saved_then(tensor_edit(lambda t: t["layers.0.query.lora_A.weight"]
                                               .__setitem__((0, 0), math.nan))), load(),
     ["layers.0.query.lora_A.weight", "1 NaN/inf"]),
    ("load-inf-in-head", saved_then(tensor_edit(lambda t: t["classifier.weight"].__setitem__(
        (1, 1), math.inf)), modules_to_save=["classifier"]), load(), ["classifier.weight", "NaN/inf"]),
    ("load-integer-factor", saved_then(tensor_edit(lambda t: t.update(
        {"layers.0.query.lora_B.weight": torch.ones(16, 4, dtype=torch.int32)}))), load(),
     ["dtype torch.int32", "floating point"]),
    ("load-weights-symlink-out", saved_then(lambda a: link_out(a, WEIGHTS)), load(),
     ["symlink", "outside the adapter folder"]),
    ("load-config-symlink-out", saved_then(lambda a: link_out(a, CONFIG)), load(),
     ["symlink", "outside the adapter folder"]),
    ("load-dora-without-magnitudes", saved_then(config_edit(use_dora=True)), load(),
     ["use_dora=True", "lacks DoRA's lora_magnitude_vector"]),
    ("load-kasa", saved_then(config_edit(kasa_config={"r": 4})), load(), ["kasa_config", "KaSA"]),
    ("load-unknown-peft-option", saved_then(config_edit(use_hyperbolic=True)), load(),
     ["use_hyperbolic", "does not know"]),
    ("load-failure-after-inject", saved(), failing_load(), ["injected failure"]),
    ("apply-lora-bias-on-embedding", None, apply(target_modules=["embed"], lora_bias=True),
     ["lora_bias=True", "'embed (embedding)'"]),
    ("merge-lora-bias-without-base-bias", lambda m, f: adapted(m, f, target_modules=["value"],
                                                                lora_bias=True),
     call(lorakit.merge_lora), ["has no bias to fold lora_bias into"]),
    ("unsupported-peft-option", None, call(lambda m: lorakit.LoraConfig.from_peft(
        {"target_modules": ["query"], "layer_replication": [[0, 1]]})), ["layer_replication"]),
]


# --- training runs: names, data, output folder (all refused before any file is written) -----------
def train_run(task="mnist-lowrank", method="lora-r4", data=None, out="run", **kw):
    def action(model, folder):
        from lorakit.experiments.run import run_training
        data_dir = None if data is None else str(folder / data)
        return run_training(task, method, folder / out, data_dir=data_dir, progress=False,
                            overrides={"max_steps": 1, "device": "cpu"}, **kw)
    return action


def idx_data(pixels_per_image=784, n=20, labels=True):
    """Setup: an MNIST idx folder, possibly of the wrong shape."""
    def setup(model, folder):
        from tiny_mnist import write_idx
        data = write_idx(folder / "idx", n=n)
        if pixels_per_image != 784:
            raw = (data / "train-images-idx3-ubyte").read_bytes()
            (data / "train-images-idx3-ubyte").write_bytes(raw[:16 + n * pixels_per_image])
        if not labels:
            (data / "train-labels-idx1-ubyte").unlink()
    return setup


def out_is_a_file(model, folder):
    (folder / "taken").write_text("a file where the output folder should go")


def train_tiny(out="run"):
    """train() of a LoRA TinyNet (a deep copy: the table's model stays as it was)."""
    def action(model, folder):
        from lorakit.train.data import TensorData
        from lorakit.train.loop import train
        from lorakit.train.settings import TrainSettings

        class Task:
            name, metric = "ids", "val_accuracy"

            def forward(self, m, batch):
                return m(batch["ids"])
        ids = torch.randint(0, 20, (32, 7), generator=torch.Generator().manual_seed(0))
        data = TensorData({"ids": ids, "labels": ids[:, 0] % 3})
        net = lorakit.apply_lora(copy.deepcopy(model), cfg())
        return train(net, Task(), data, data, TrainSettings(max_steps=1, device="cpu", batch_size=8),
                     folder / out, progress=False)
    return action


def disk_nearly_full(action):
    def patched(model, folder):
        import shutil
        from unittest import mock
        with mock.patch("lorakit.train.checkpoint.shutil.disk_usage",
                        return_value=shutil._ntuple_diskusage(10**9, 10**9 - 100, 100)):
            return action(model, folder)
    return patched


def read_only_disk(action):
    def patched(model, folder):
        from unittest import mock
        error = OSError(30, "Read-only file system")
        with mock.patch("lorakit.train.checkpoint.tempfile.mkstemp", side_effect=error):
            return action(model, folder)
    return patched


def symlink_out(model, folder):
    (folder / "run").mkdir()
    (folder / "elsewhere").mkdir()
    (folder / "run" / "adapter").symlink_to(folder / "elsewhere")


def path_in(name):
    return lambda model, folder: lorakit.io.inside(folder / "run", name)


CASES += [
    ("cli-unknown-task", None, train_run(task="mnist"), ["unknown task 'mnist'", "mnist-lowrank"]),
    ("cli-unknown-method", idx_data(), train_run(method="lora-4", data="idx"),
     ["unknown mnist-lowrank method 'lora-4'", "lora-rR"]),
    ("cli-unknown-model", None, call(lambda m: __import__("lorakit.models", fromlist=["load"]).load(
        "minilm-l12")), ["unknown model 'minilm-l12'", "local Hugging Face model directory"]),
    ("cli-unknown-lora-method", None, call(lambda m: __import__(
        "lorakit.methods", fromlist=["method_function"]).method_function("loraa")),
     ["unknown method 'loraa'", "available"]),
    ("data-wrong-image-size", idx_data(pixels_per_image=700), train_run(data="idx"),
     ["expected 784 each"]),
    ("data-missing-labels", idx_data(labels=False), train_run(data="idx"),
     ["lacks train-labels-idx1-ubyte", "--data-dir"]),
    ("out-is-a-file", out_is_a_file, train_run(out="taken/run"), ["is a file, not a folder", "--out"]),
    ("out-read-only", None, read_only_disk(train_tiny()), ["cannot write in", "permissions"]),
    ("out-disk-full", None, disk_nearly_full(train_tiny()), ["MiB free", "checkpoints need about",
                                                             "free some space"]),
    ("path-dotdot", None, path_in("../adapter"), ["outside the output folder", "no '..'"]),
    ("path-absolute", None, path_in("/tmp/adapter"), ["outside the output folder", "no absolute path"]),
    ("path-symlink-escape", symlink_out, path_in("adapter"), ["outside the output folder", "symlink"]),
]


# --- the check --------------------------------------------------------------------------------------
def snapshot(model, folder) -> dict:
    """Everything a refused call must leave alone, compared bitwise (NaN-safe, unlike torch.equal)."""
    state = model.__dict__.get("_lorakit")
    return {
        "tensors": {k: (v.dtype, tuple(v.shape), v.detach().contiguous().numpy().tobytes())
                    for k, v in model.state_dict().items()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "adapters": None if state is None else copy.deepcopy(state.__dict__),
        "layers": {n: (list(m.active_adapters), list(m.merged_adapters)) for n, m in model.named_modules()
                   if isinstance(m, LoraLayer)},
        "files": {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in sorted(folder.rglob("*")) if p.is_file()},
    }


@pytest.mark.parametrize("setup, action, expected", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_refused_with_helpful_message_and_nothing_changed(setup, action, expected, tmp_path):
    model = tiny()
    if setup is not None:
        setup(model, tmp_path)
    before = snapshot(model, tmp_path)

    with pytest.raises(lorakit.LoraError) as err:
        action(model, tmp_path)

    message = str(err.value)
    for part in expected:
        assert part in message, f"{part!r} not in the message: {message}"
    after = snapshot(model, tmp_path)
    for aspect in before:
        assert after[aspect] == before[aspect], f"{aspect} changed by a refused call"
    assert not (tmp_path / "UNPICKLED").exists(), "a pickle was unpickled"


def test_snapshot_sees_changes(tmp_path):
    """The table proves nothing if the snapshot were blind: a call that succeeds must show up in it."""
    model = tiny()
    saved()(model, tmp_path)
    before = snapshot(model, tmp_path)
    lorakit.load_adapter(model, tmp_path / "adapter")
    truncate(tmp_path / "adapter")
    after = snapshot(model, tmp_path)
    assert all(after[aspect] != before[aspect] for aspect in before)


def test_table_is_big_and_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)


def test_pickle_trap_is_live(tmp_path):
    """The pickle cases prove something only if unpickling the payload really leaves the marker."""
    pickle.loads(pickle.dumps(_Trap(tmp_path / "marker")))
    assert (tmp_path / "marker").exists()


def test_loraerror_is_a_valueerror():
    assert issubclass(lorakit.LoraError, ValueError)
