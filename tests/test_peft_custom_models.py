"""PEFT's own LoRA test cases, both ways and merged (issue 16, items 10 and 11).

The LoRA entries of ``TEST_CASES`` in PEFT's ``tests/test_custom_models.py`` (huggingface/peft at
5d602fd, 2026-08-21), retyped with PEFT's models and PEFT's test input ``X = arange(90).view(9, 10)``:

    PEFT -> lorakit:  get_peft_model, randomise every trainable tensor, save_pretrained
                      -> lorakit.load_adapter(fresh base): the outputs must agree
    lorakit -> PEFT:  LoraConfig.from_peft(the same kwargs) -> apply_lora, randomise, save_adapter
                      -> PeftModel.from_pretrained(fresh base): the outputs must agree
    merged:           lorakit.merge_and_unload == PEFT's merge_and_unload, where PEFT can merge

A case lorakit does not implement must be refused with a message naming the option (never a misleading
one), and the refused load or apply must leave the model exactly as it was: a good adapter still loads.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import lorakit  # noqa: E402

TOL = 1e-5


# --- PEFT's models (tests/test_custom_models.py), unchanged --------------------------------------
class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.float())))))


class ModelEmbConv1D(nn.Module):
    def __init__(self, emb_size=100):
        super().__init__()
        self.emb = nn.Embedding(emb_size, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(X))))))


class _ConvModel(nn.Module):
    """PEFT's ModelConv1D / ModelConv2D / ModelConv3D: conv -> relu -> flatten -> lin0 -> log-softmax."""

    def __init__(self, conv, shape, lin_in):
        super().__init__()
        self.conv_name = f"conv{len(shape) - 1}d"
        setattr(self, self.conv_name, conv)
        self.shape = shape
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(lin_in, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = X.float()
        if len(self.shape) == 4 and X.dim() == 2:          # ModelConv3D: 2D image -> 3D volume
            X = torch.stack([X] * 3, dim=-1)
        X = X.reshape(-1, *self.shape)
        return self.sm(self.lin0(self.flat(self.relu(getattr(self, self.conv_name)(X)))))


class ModelConv2DGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(16, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = self.lin0(X.float().flatten()).reshape(2, 16, 3, 3)
        return self.sm(self.lin1(self.flat(self.relu(self.conv2d(X)))))


class ModelConv2DGroups2(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(12800, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = torch.arange(9 * 16 * 20 * 20).view([9, 16, 20, 20]).float()   # PEFT ignores X here
        return self.sm(self.lin0(self.flat(self.relu(self.conv2d(X)))))


class ModelMha(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = X.float()
        X, _ = self.mha(X, X, X)
        return self.sm(self.lin0(X))


class _LinearUsingParameter(nn.Module):
    def __init__(self, in_features, out_features, bias=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x):
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = _LinearUsingParameter(10, 20, bias=True)
        self.relu = nn.ReLU()
        self.lin1 = _LinearUsingParameter(20, 2, bias=True)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin1(self.relu(self.lin0(X.float()))))


MODELS = {
    "MLP": MLP, "EmbConv1D": ModelEmbConv1D,
    "Conv1d": lambda: _ConvModel(nn.Conv1d(1, 1, 2), (1, 10), 9),
    "Conv2d": lambda: _ConvModel(nn.Conv2d(5, 10, 3), (5, 3, 3), 10),
    "Conv3d": lambda: _ConvModel(nn.Conv3d(5, 10, 3), (5, 3, 3, 3), 10),
    "Conv2dGroups": ModelConv2DGroups, "Conv2dGroups2": ModelConv2DGroups2, "MHA": ModelMha,
    "MlpUsingParameters": MlpUsingParameters,
}


def build(model_id: str) -> nn.Module:
    torch.manual_seed(0)                      # PEFT's MockTransformerWrapper.from_pretrained does this
    return MODELS[model_id]().eval()


def inputs() -> torch.Tensor:
    return torch.arange(90).view(9, 10)


# --- PEFT's LoRA TEST_CASES; the last field says what lorakit does with each -----------------------
# "exact": both directions agree; ("refused", text): refused naming the option, model unchanged;
# ("peft-only", text): PEFT's file loads exactly, a new adapter with the option is refused by name.
VELORA = dict(num_groups=2)
CASES = [
    ("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}, "exact"),
    ("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}, "exact"),
    ("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}, "exact"),
    ("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}, "exact"),
    ("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}, "exact"),
    ("Vanilla MLP 6 LoRA", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1},
     "exact"),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}, "exact"),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True},
     "exact"),
    ("Vanilla MLP 1 LoRA with KaSA", "MLP", {"target_modules": ["lin0"], "kasa_config": "KasaConfig",
                                             "r": 4}, ("refused", "kasa_config")),
    ("Vanilla MLP 1 LoRA with MiCA", "MLP", {"target_modules": ["lin0"], "init_lora_weights": "mica",
                                             "r": 4}, ("peft-only", "init_lora_weights='mica'")),
    ("Vanilla MLP 9 LoRA with DoRA", "MLP", {"target_modules": "lin1", "use_dora": True,
                                             "lora_alpha": 32}, "exact"),
    ("Vanilla MLP 10 LoRA with VeLoRA random", "MLP",
     {"target_modules": ["lin0"], "velora_config": dict(VELORA, init_type="random")}, "exact"),
    ("Vanilla MLP 11 LoRA with VeLoRA batch_average", "MLP",
     {"target_modules": ["lin0", "lin1"], "velora_config": dict(VELORA, init_type="batch_average")},
     "exact"),
    ("Vanilla MLP 12 LoRA with VeLoRA batch_average_once", "MLP",
     {"target_modules": ["lin0"], "velora_config": dict(VELORA, init_type="batch_average_once")},
     "exact"),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}, "exact"),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}, "exact"),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"]},
     "exact"),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", {"target_modules": ["conv1d"],
                                                             "use_dora": True}, "exact"),
    ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", {"target_modules": ["emb"],
                                                             "use_dora": True}, "exact"),
    ("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"],
                                                             "use_dora": True}, "exact"),
    ("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D",
     {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}},
     ("refused", "trainable_token_indices")),
    ("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}, "exact"),
    ("Conv1d LoRA with DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}, "exact"),
    ("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}, "exact"),
    ("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}, "exact"),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}, "exact"),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True},
     "exact"),
    ("Conv2d Groups LoRA", "Conv2dGroups", {"target_modules": ["conv2d"]}, "exact"),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", {"target_modules": ["conv2d"]}, "exact"),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", {"target_modules": ["conv2d"], "use_dora": True},
     "exact"),
    ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", {"target_modules": ["conv2d"],
                                                        "use_dora": True}, "exact"),
    ("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}, "exact"),
    ("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}, "exact"),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}, "exact"),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"], "use_dora": True},
     "exact"),
    ("Vanilla MLP 1 LoRA with lora_b bias", "MLP", {"target_modules": ["lin0", "lin1"],
                                                    "lora_bias": True, "lora_alpha": 32}, "exact"),
    ("Conv2d 1 LoRA with lora_b bias", "Conv2d", {"target_modules": ["conv2d"], "lora_bias": True,
                                                  "lora_alpha": 32}, "exact"),
    ("Conv3d 1 LoRA with lora_b bias", "Conv3d", {"target_modules": ["conv3d"], "lora_bias": True,
                                                  "lora_alpha": 32}, "exact"),
    ("MHA 1 LoRA", "MHA", {"target_modules": ["mha"]}, ("refused", "MultiheadAttention")),
    ("MHA 2 LoRA", "MHA", {"target_modules": ["mha", "lin0"]}, ("refused", "MultiheadAttention")),
    ("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", {"target_parameters": ["lin0.weight"]},
     ("refused", "target_parameters")),
    ("MLP 2 using nn.Parameter LoRA", "MLP", {"target_modules": ["lin0"],
                                              "target_parameters": ["lin1.weight"]},
     ("refused", "target_parameters")),
    ("Vanilla MLP 1 LoRA with Monteclora", "MLP", {"target_modules": ["lin0"],
                                                   "monteclora_config": "MontecloraConfig"},
     ("refused", "monteclora_config")),
]
PARAMS = [pytest.param(model_id, kwargs, expect, id=name) for name, model_id, kwargs, expect in CASES]


def peft_kwargs(kwargs: dict) -> dict:
    """The case's kwargs with PEFT's config objects built (kept as names / dicts in the table)."""
    out = dict(kwargs)
    if out.get("kasa_config") == "KasaConfig":
        out["kasa_config"] = peft.KasaConfig()
    if out.get("monteclora_config") == "MontecloraConfig":
        out["monteclora_config"] = peft.MontecloraConfig(num_samples=2)
    if isinstance(out.get("velora_config"), dict):
        out["velora_config"] = peft.VeloraConfig(**out["velora_config"])
    return out


def randomise(model: nn.Module, seed: int = 0) -> None:
    """Every trainable tensor non-trivial: factors and heads N(0, 0.3^2), DoRA magnitudes m (1 + 0.3 N)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                noise = 0.3 * torch.randn(p.shape, generator=g)
                p.copy_(p * (1 + noise) if "magnitude" in name else noise)


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs())


def assert_close(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    scale = max(1.0, want.abs().max().item())
    assert (want - base).abs().max().item() > 1e-3 * scale, "the adapter barely moves the output"
    assert (got - want).abs().max().item() <= TOL * scale


def snapshot(model: nn.Module) -> dict:
    return {"tensors": {k: v.clone() for k, v in model.state_dict().items()},
            "modules": [(n, type(m)) for n, m in model.named_modules()],
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "lorakit": copy.deepcopy(model.__dict__.get("_lorakit"))}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"] and after["requires_grad"] == before["requires_grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())
    assert (after["lorakit"] is None) == (before["lorakit"] is None)


def plain_adapter_loads(model_id: str, model: nn.Module, folder) -> None:
    """After a refusal the model takes a good adapter: nothing half-made is left behind."""
    other = lorakit.apply_lora(build(model_id), lorakit.LoraConfig(r=2, target_modules=["lin0"]))
    lorakit.save_adapter(other, folder)
    lorakit.load_adapter(model, folder)
    assert [n for n, _ in lorakit.lora_layers(model)] == ["lin0"]


@pytest.mark.parametrize("model_id, kwargs, expect", PARAMS)
def test_peft_adapter_loads_in_lorakit(model_id, kwargs, expect, tmp_path):
    base = run(build(model_id))
    theirs = peft.get_peft_model(build(model_id), peft.LoraConfig(**peft_kwargs(kwargs)))
    randomise(theirs)
    theirs.eval()
    want = run(theirs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    model = build(model_id)
    if expect == "exact" or expect[0] == "peft-only":
        lorakit.load_adapter(model, tmp_path / "peft")
        assert_close(run(model), want, base)
        return
    before = snapshot(model)
    with pytest.raises(lorakit.LoraError, match=expect[1]):
        lorakit.load_adapter(model, tmp_path / "peft")
    assert_unchanged(model, before)
    if model_id in ("MLP", "MHA"):
        plain_adapter_loads(model_id, model, tmp_path / "plain")


@pytest.mark.parametrize("model_id, kwargs, expect", PARAMS)
def test_lorakit_adapter_loads_in_peft(model_id, kwargs, expect, tmp_path):
    base = run(build(model_id))
    model = build(model_id)
    if expect != "exact":
        before = snapshot(model)
        with pytest.raises(lorakit.LoraError, match=expect[1]):
            lorakit.apply_lora(model, lorakit.LoraConfig.from_peft(peft_kwargs(kwargs)))
        assert_unchanged(model, before)
        return
    with pytest.warns(UserWarning, match="VeLoRA") if "velora_config" in kwargs else _nothing():
        cfg = lorakit.LoraConfig.from_peft(peft_kwargs(kwargs))
    lorakit.apply_lora(model, cfg)
    randomise(model)
    ours = run(model)
    lorakit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(model_id), str(tmp_path)).eval()
    assert_close(ours, run(theirs), base)
    assert sorted(lorakit.lora_state_dict(model)) == sorted(peft.get_peft_model_state_dict(theirs))


@pytest.mark.parametrize("model_id, kwargs, expect", [p for p in PARAMS if p.values[2] == "exact"])
def test_merged_matches_peft_merge(model_id, kwargs, expect, tmp_path):
    cfg = lorakit.LoraConfig.from_dict({k: v for k, v in kwargs.items() if k != "velora_config"})
    model = lorakit.apply_lora(build(model_id), cfg)
    randomise(model)
    lorakit.save_adapter(model, tmp_path)
    unmerged = run(model)
    if model_id.startswith("Conv2dGroups"):              # PEFT cannot merge these either
        before = snapshot(model)
        with pytest.raises(lorakit.LoraError, match="groups="):
            lorakit.merge_lora(model)
        assert_unchanged(model, before)
        return
    ours = lorakit.merge_and_unload(model)
    theirs = peft.PeftModel.from_pretrained(build(model_id), str(tmp_path)).merge_and_unload().eval()
    assert not lorakit.lora_layers(ours)
    assert (run(ours) - unmerged).abs().max().item() <= 1e-4 * max(1.0, unmerged.abs().max().item())
    mine, peft_sd = ours.state_dict(), theirs.state_dict()
    assert sorted(mine) == sorted(peft_sd)
    for key, value in peft_sd.items():
        assert (mine[key] - value).abs().max().item() <= 1e-5 * max(1.0, value.abs().max().item()), key


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_table_covers_peft_lora_cases():
    """43 LoRA entries in PEFT's TEST_CASES at the commit above; every one is here, each decided."""
    assert len(CASES) == 43 and len({c[0] for c in CASES}) == 43
    assert sum(c[3] == "exact" for c in CASES) == 35


def test_multihead_attention_out_proj_is_refused_not_a_silent_no_op():
    """nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward without calling
    out_proj, so LoRA on out_proj would change nothing: refused by name; 'all-linear' leaves it out."""
    model = build("MHA")
    with pytest.raises(lorakit.LoraError, match="inside the nn.MultiheadAttention 'mha'"):
        lorakit.apply_lora(model, lorakit.LoraConfig(target_modules=["out_proj"]))
    with pytest.warns(UserWarning, match="leaves out"):
        lorakit.apply_lora(model, lorakit.LoraConfig(target_modules="all-linear"))
    assert [n for n, _ in lorakit.lora_layers(model)] == ["lin0"]


def test_grouped_conv_rank_must_divide_groups_and_changes_nothing():
    model = build("Conv2dGroups")
    before = snapshot(model)
    with pytest.raises(lorakit.LoraError, match="divisible by groups=8.*r=3"):
        lorakit.apply_lora(model, lorakit.LoraConfig(r=3, target_modules=["conv2d"]))
    assert_unchanged(model, before)
