"""The LoRA family as trainable methods (dora, rslora, pissa, lora-plus, adalora, relora, galore) on a tiny
MLP: parameter counts per each paper's formula, which parameters get gradients, the invariants of each
method (starts at the base, merge == forward, restarts keep the function), and save -> reload on a fresh,
untouched base."""

import copy
import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraError
from lorakit.methods import AdaptSpec, apply_method
from lorakit.methods.hooks import hooks_of
from lorakit.train.loop import make_optimizer, train
from lorakit.train.settings import TrainSettings

from test_train_loop import BlobTask

D_IN, D_H, HEAD = 16, 32, 32 * 2 + 2            # body.0: 16 -> 32, body.2: 32 -> 32, classifier 32 -> 2
R = 4
LORA = R * (D_IN + D_H) + R * (D_H + D_H)        # r (d_in + d_out) per matrix


def build(method: str, **extra) -> nn.Module:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(D_IN, D_H), nn.ReLU(), nn.Linear(D_H, D_H), nn.ReLU())
    model = nn.Sequential()
    model.add_module("body", body)
    model.add_module("classifier", nn.Linear(D_H, 2))
    spec = AdaptSpec(head=["classifier"], lora_targets=["body.0", "body.2"], r=R, alpha=8, extra=extra)
    return apply_method(model, method, spec)


def base() -> nn.Module:
    return build("frozen")


X = torch.randn(8, D_IN, generator=torch.Generator().manual_seed(3))
Y = torch.tensor([0, 1] * 4)
SETTINGS = TrainSettings(lr=1e-2, batch_size=16, max_steps=20, eval_every=10, precision="fp32",
                         device="cpu", warmup_frac=0.1)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(model, tmp_path, settings=SETTINGS):
    task = BlobTask()
    return train(model, task, task.data(128, 1), task.data(64, 2), settings, tmp_path, progress=False)


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


# --- parameter counts (each paper's formula) ---------------------------------------------------------
@pytest.mark.parametrize("method,expected", [
    ("lora", LORA + HEAD), ("rslora", LORA + HEAD), ("pissa", LORA + HEAD), ("lora-plus", LORA + HEAD),
    ("relora", LORA + HEAD),
    ("dora", LORA + 2 * D_H + HEAD),                                         # + d_out magnitude each
    ("adalora", 6 * (D_IN + D_H) + 6 + 6 * (D_H + D_H) + 6 + HEAD),           # r0 = ceil(1.5 r) = 6
    ("galore", D_IN * D_H + D_H + D_H * D_H + D_H + HEAD),                   # every weight trains
])
def test_trainable_parameter_counts(method, expected):
    assert trainable(build(method)) == expected


@pytest.mark.parametrize("method", ["dora", "rslora", "pissa", "lora-plus", "relora", "adalora"])
def test_only_adapter_and_head_get_gradients(method):
    model = build(method)
    nn.functional.cross_entropy(model(X), Y).backward()
    for name, p in model.named_parameters():
        adapter = (name.startswith("classifier.") and "original_module" not in name) or \
            any(k in name for k in (".lora.", "lora_"))
        assert p.requires_grad == adapter, name
        assert (p.grad is not None) == adapter, name


# --- DoRA --------------------------------------------------------------------------------------------
def test_dora_starts_at_base_and_merge_is_exact(tmp_path):
    model = build("dora")
    assert torch.equal(model(X), base()(X))
    randomise(model)
    layer = model.body[0]
    w = layer.weight.detach() + layer.delta_weight(layer.lora["default"])
    expected = layer.lora["default"].magnitude[:, None] * w / w.norm(dim=1, keepdim=True)
    out = model(X).detach()
    lorakit.merge_lora(model)
    assert torch.allclose(layer.weight, expected, atol=1e-6)                  # m (W0 + sBA) / ||.||_c
    assert (model(X) - out).abs().max() < 1e-5
    lorakit.unmerge_lora(model)
    assert (model(X) - out).abs().max() < 1e-5
    lorakit.save_adapter(model, tmp_path)
    assert (lorakit.load_adapter(base(), tmp_path)(X) - out).abs().max() < 1e-6


def test_dora_norm_gets_no_gradient():
    """The column norm is a constant (paper section 4.3): d out / d m = (W0 + sBA) x / n exactly."""
    model = build("dora")
    randomise(model)
    layer, x = model.body[0], X[:1]
    layer(x).sum().backward()
    w = (layer.weight + layer.delta_weight(layer.lora["default"])).detach()
    assert torch.allclose(layer.lora["default"].magnitude.grad, (x @ w.T / w.norm(dim=1))[0], atol=1e-5)


def test_dora_on_an_embedding_learns_one_magnitude_per_dimension():
    """DoRA on nn.Embedding, as PEFT does it (issue 16): one magnitude per embedding dimension, and
    the model equals the base at init."""
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    ids = torch.arange(10).view(2, 5)
    base = model(ids)
    apply_method(model, "dora", AdaptSpec(head=[], lora_targets=["0"], r=2))
    assert model[0].lora["default"].magnitude.shape == (4,)
    assert torch.allclose(model(ids), base, atol=1e-6)


# --- rsLoRA, LoRA+ -----------------------------------------------------------------------------------
def test_rslora_scale():
    assert build("rslora").body[0].lora["default"].scale == pytest.approx(8 / math.sqrt(R))
    assert build("lora").body[0].lora["default"].scale == pytest.approx(8 / R)


def test_lora_plus_b_factors_get_ratio_times_lr():
    settings = TrainSettings(lr=1e-3, head_lr=1e-2, precision="fp32", device="cpu")
    for ratio in (16.0, 4.0):
        model = build("lora-plus", **({} if ratio == 16 else {"lora_plus_ratio": ratio}))
        optimizer, _ = make_optimizer(model, settings)
        lr_of = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}
        for layer in (model.body[0], model.body[2]):
            assert lr_of[id(layer.lora["default"].A)] == pytest.approx(1e-3)
            assert lr_of[id(layer.lora["default"].B)] == pytest.approx(1e-3 * ratio)
        assert lr_of[id(model.classifier.modules_to_save["default"].weight)] == pytest.approx(1e-2)
    with pytest.raises(LoraError, match="lora_plus_ratio"):
        build("lora-plus", lora_plus_ratio=0)


# --- PiSSA -------------------------------------------------------------------------------------------
def test_pissa_residual_plus_adapter_is_base_and_reloads_on_untouched_base(tmp_path):
    model, original = build("pissa"), base()
    layer = model.body[0]
    assert (model(X) - original(X)).abs().max() < 1e-5
    # the adapter holds the principal part: s B A is the best rank-r approximation of W0
    u, s, vh = torch.linalg.svd(original.body[0].weight.detach())
    best = (u[:, :R] * s[:R]) @ vh[:R]
    assert torch.allclose(layer.delta_weight(layer.lora["default"]), best, atol=1e-5)
    assert not torch.allclose(layer.weight, original.body[0].weight)           # the base is the residual
    run(model, tmp_path / "run")
    model.eval()
    out = model(X).detach()
    lorakit.save_adapter(model, tmp_path / "adapter")
    reloaded = lorakit.load_adapter(base(), tmp_path / "adapter")
    assert reloaded.body[0].lora["default"].r == 2 * R                        # [B, -B0] [A; A0]
    assert (reloaded(X) - out).abs().max() < 1e-5
    assert (lorakit.merge_and_unload(reloaded)(X) - out).abs().max() < 1e-5


# --- ReLoRA ------------------------------------------------------------------------------------------
def test_relora_restart_keeps_function_and_resets_optimizer():
    model = build("relora", relora_every=3)
    settings = TrainSettings(lr=1e-2, max_steps=10, precision="fp32", device="cpu")
    optimizer, _ = make_optimizer(model, settings)
    hooks = hooks_of(model)
    for step in range(2):
        nn.functional.cross_entropy(model(X), Y).backward()
        optimizer.step(), optimizer.zero_grad()
    delta = model.body[0].lora["default"]
    assert delta.A in optimizer.state and delta.B.abs().sum() > 0
    nn.functional.cross_entropy(model(X), Y).backward()
    optimizer.step()
    before = model(X).detach()
    hooks.after_step(2, model, optimizer)                                     # step 3: a restart
    assert (model(X) - before).abs().max() < 1e-6
    assert torch.equal(delta.B, torch.zeros_like(delta.B))
    assert delta.A not in optimizer.state and delta.B not in optimizer.state
    assert model.classifier.modules_to_save["default"].weight in optimizer.state  # the head keeps its state
    assert hooks.restarts == 1 and delta.offset_A.shape == (R, D_IN)
    # jagged schedule: 0 right at each restart, then a linear ramp over relora_warmup (5) steps
    assert [hooks.lr_factor(s, 0.5) for s in (0, 2, 3, 4, 5, 6)] == [0.5, 0.5, 0.0, 0.1, 0.2, 0.0]


def test_relora_saves_all_merges_against_the_untouched_base(tmp_path):
    model = build("relora", relora_every=5)
    result = run(model, tmp_path / "run")
    assert hooks_of(model).restarts == 3 and result["steps"] == 20             # after 5, 10, 15
    model.eval()
    out = model(X).detach()
    assert (out - base()(X)).abs().max() > 1e-3
    lorakit.save_adapter(model, tmp_path / "adapter")
    reloaded = lorakit.load_adapter(base(), tmp_path / "adapter")
    assert reloaded.body[0].lora["default"].r == 4 * R                        # current + 3 merged
    assert (reloaded(X) - out).abs().max() < 1e-5


def test_relora_resume_reapplies_merges(tmp_path):
    """Interrupted after step 11 (restarts at 5 and 10 done), resumed: same model as one straight run."""
    full = build("relora", relora_every=5)
    run(full, tmp_path / "a")
    task = BlobTask(interrupt_at=13)                       # 10 train calls, 1 eval, then steps 11, 12
    first = build("relora", relora_every=5)
    result = train(first, task, task.data(128, 1), task.data(64, 2), SETTINGS, tmp_path / "b",
                   progress=False)
    assert result["interrupted"] and result["steps"] == 11
    resumed = build("relora", relora_every=5)
    train(resumed, BlobTask(), BlobTask().data(128, 1), BlobTask().data(64, 2), SETTINGS, tmp_path / "b",
          resume=True, progress=False)
    assert hooks_of(resumed).restarts == 3
    assert (resumed.eval()(X) - full.eval()(X)).abs().max() < 1e-5


# --- AdaLoRA -----------------------------------------------------------------------------------------
def test_adalora_masks_rank_down_to_budget(tmp_path):
    model = build("adalora", adalora_tinit=2, adalora_tfinal=5)
    hooks = hooks_of(model)
    run(model, tmp_path, SETTINGS.replace(max_steps=20))
    layers = [model.body[0], model.body[2]]
    kept = [int(l.rank_mask.sum()) for l in layers]
    assert sum(kept) == hooks.target_bgt == 2 * R and hooks.init_bgt == 12
    for layer in layers:                                                      # masked E entries are 0
        assert torch.all(layer.lora_E[~layer.rank_mask] == 0)
        assert torch.all(layer.lora_E[layer.rank_mask] != 0)


def test_adalora_budget_schedule_and_orth_regulariser():
    model = build("adalora", adalora_total_step=100, adalora_tinit=10, adalora_tfinal=20,
                  adalora_delta_t=5)
    hooks = hooks_of(model)
    assert hooks.budget(10) == (12, False)
    assert hooks.budget(15) == (int(4 * (1 - 5 / 70) ** 3 + 8), True)
    assert hooks.budget(81) == (8, True)
    a = model.body[0].lora_A
    hooks.after_backward(0, model)                                            # only the regulariser
    with torch.no_grad():
        cov = a @ a.T
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert torch.linalg.norm(cov - torch.eye(len(cov))) > 0.5                # A starts far from orthogonal


def test_adalora_saves_pruned_and_reloads(tmp_path):
    model = build("adalora", adalora_tinit=2, adalora_tfinal=5)
    run(model, tmp_path / "run")
    model.eval()
    out = model(X).detach()
    folder = model.method_io.save(model, tmp_path / "adapter")
    reloaded = model.method_io.load(base(), folder)
    assert sum(l.lora_A.shape[0] for l in (reloaded.body[0], reloaded.body[2])) == 2 * R
    assert (reloaded(X) - out).abs().max() < 1e-6
    assert (model.method_io.merge(reloaded)(X) - out).abs().max() < 1e-5
    state = hooks_of(model).state_dict()
    torch.save(state, tmp_path / "hooks.pt")
    hooks_of(build("adalora")).load_state_dict(torch.load(tmp_path / "hooks.pt", weights_only=True))


# --- GaLore ------------------------------------------------------------------------------------------
def galore_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 64))
    x = torch.randn(128, 64)
    target = x @ (torch.randn(64, 4) @ torch.randn(4, 64)) / 8
    return model, x, target


def galore_optimizer(model, rank=4, gap=10):
    from lorakit.methods.galore import GaLoreAdamW
    projected = [model[0].weight, model[2].weight]
    rest = [p for p in model.parameters() if all(p is not q for q in projected)]
    return GaLoreAdamW([{"params": projected, "rank": rank}, {"params": rest, "rank": None}], lr=1e-2,
                       update_proj_gap=gap, scale=1.0)


def test_galore_reduces_loss_with_smaller_state(tmp_path):
    from lorakit.methods.galore import optimizer_state_numel
    model, x, target = galore_problem()
    optimizer = galore_optimizer(model)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step(), optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # W (48, 64): P (48, 4), moments (4, 64) x 2; W (64, 48): Q (48, 4), moments (64, 4) x 2; biases 2x
    galore = optimizer_state_numel(optimizer)
    assert galore == (48 * 4 + 2 * 4 * 64) * 2 + 2 * (48 + 64)
    adam = torch.optim.AdamW(model.parameters())
    nn.functional.mse_loss(model(x), target).backward()
    adam.step()
    assert optimizer_state_numel(adam) == 2 * sum(p.numel() for p in model.parameters()) > 3 * galore


def test_galore_state_dict_round_trip():
    model, x, target = galore_problem()
    optimizer = galore_optimizer(model, gap=3)
    for _ in range(4):
        nn.functional.mse_loss(model(x), target).backward()
        optimizer.step(), optimizer.zero_grad()
    twin = galore_problem()[0]
    twin.load_state_dict(model.state_dict())
    twin_opt = galore_optimizer(twin, gap=3)
    twin_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))     # as from a checkpoint file
    for m, opt in ((model, optimizer), (twin, twin_opt)):
        for _ in range(3):
            nn.functional.mse_loss(m(x), target).backward()
            opt.step(), opt.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_galore_method_trains_all_weights(tmp_path):
    model = build("galore", galore_update_proj_gap=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = run(model, tmp_path)
    optimizer, _ = make_optimizer(model, SETTINGS)
    ranks = {g["rank"] for g in optimizer.param_groups}
    assert ranks == {R, None}
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert result["best"]["val_accuracy"] > 0.8
