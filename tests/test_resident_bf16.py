"""The frozen base resident in bf16 (train/precision.py): same products as autocast, originals restored."""

import torch
from torch import nn

import lorakit
from lorakit.train.precision import castable_frozen_params, frozen_in_dtype


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight          # tied, as in SmolLM2

    def forward(self, ids):
        return self.head(self.norm(self.body(self.emb(ids))))


def _model():
    torch.manual_seed(0)
    model = Tiny()
    lorakit.apply_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["body.0", "body.2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(std=0.1)
    return model


def _loss_and_grads(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
    loss = out.float().square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_bit_identical_to_autocast_and_restored():
    model = _model()
    ids = torch.randint(0, 50, (4, 7))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, grads = _loss_and_grads(model, ids)
    with frozen_in_dtype(model) as count:
        assert count == 4                             # two LoRA-wrapped linears: weight + bias each
        assert model.body[0].weight.dtype == torch.bfloat16
        assert model.body[0].lora["default"].A.dtype == torch.float32      # factors stay fp32
        assert model.emb.weight.dtype == torch.float32     # tied to the head: autocast never casts it
        assert model.norm.weight.dtype == torch.float32
        loss2, grads2 = _loss_and_grads(model, ids)
    assert torch.equal(loss, loss2)
    assert grads.keys() == grads2.keys() and all(torch.equal(grads[k], grads2[k]) for k in grads)
    for n, p in model.named_parameters():
        assert p.dtype == before[n].dtype and torch.equal(p, before[n]), n


def test_trainable_weights_are_never_cast():
    model = _model()
    model.body[0].weight.requires_grad_(True)
    assert all(p is not model.body[0].weight for p in castable_frozen_params(model))


def test_eager_path_gives_the_same_products():
    model = _model()
    ids = torch.randint(0, 50, (3, 5))
    with lorakit.layers.use_fused(False):
        loss, grads = _loss_and_grads(model, ids)
        with frozen_in_dtype(model):
            loss2, grads2 = _loss_and_grads(model, ids)
    assert torch.equal(loss, loss2) and all(torch.equal(grads[k], grads2[k]) for k in grads)


def test_default_path_rule_picks_eager_only_for_few_rows_in_low_precision():
    """layers/lora_function.py: under bf16 a training step with fewer than 512 rows goes eager by
    default (measured slower fused); fp32, inference, dropout, and use_fused(True) stay fused."""
    from lorakit.layers.lora_function import FUSED_MIN_ROWS_LOW_PRECISION as ROWS
    model = _model()
    layer = model.body[0]
    small, large = torch.randn(ROWS - 1, 16), torch.randn(2, ROWS // 2, 16)
    assert layer.takes_fused_path(small) and layer.takes_fused_path(large)          # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.takes_fused_path(small) and layer.takes_fused_path(large)
        with torch.no_grad():
            assert layer.takes_fused_path(small)
        with lorakit.layers.use_fused(True):
            assert layer.takes_fused_path(small)
        with lorakit.layers.use_fused(False):
            assert not layer.takes_fused_path(large)
    dropped = lorakit.apply_lora(Tiny(), lorakit.LoraConfig(r=4, alpha=8, target_modules=["body.0"],
                                                            dropout=0.1)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dropped.body[0].takes_fused_path(small)
