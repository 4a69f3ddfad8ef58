"""PEFT parity for the LoRA-family files, both ways, on tiny random BERT, Llama and GPT-2 (no downloads):

    DoRA     lorakit (dora method / to_dora) -> save_adapter -> PeftModel.from_pretrained, and PEFT
             LoraConfig(use_dora=True) -> save_pretrained -> lorakit.load_adapter
    AdaLoRA  lorakit adalora (with a pruned rank pattern) -> method_io.save -> PeftModel.from_pretrained,
             and PEFT AdaLoRA pruned by its own RankAllocator -> save_pretrained -> load_adalora

Outputs must agree to max |diff| < 1e-5 in fp32 after every trainable tensor is randomised (B = 0 or
E = 0 at init would make any two adapters agree). ``pytest tests/test_peft_parity_family.py -s`` prints
the measured differences.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import lorakit  # noqa: E402
from lorakit.methods import AdaptSpec, apply_method  # noqa: E402
from lorakit.methods.adalora import load_adalora, svd_layers  # noqa: E402
from test_peft_parity import build, forward, randomise_trainable  # noqa: E402

TOL = 1e-5
TARGETS = {"bert": ["query", "value", "dense"], "llama": ["q_proj", "v_proj", "down_proj"],
           "gpt2": ["c_attn", "c_fc"]}


def check(name: str, ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor) -> None:
    diff, effect = (ours - theirs).abs().max().item(), (ours - base).abs().max().item()
    print(f"\nPEFT parity {name:<32} max|diff| = {diff:.2e}   (adapter moves outputs by {effect:.2e})")
    assert effect > 1e-3, "the adapter barely changes the output; the comparison would prove nothing"
    assert diff < TOL


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_dora_lorakit_to_peft(arch, tmp_path):
    base = forward(build(arch))
    model = apply_method(build(arch), "dora", AdaptSpec(head=[], lora_targets=TARGETS[arch], r=4, alpha=8))
    assert torch.equal(forward(model.eval()), base)                  # DoRA starts at the base
    names = randomise_trainable(model)
    assert any(n.endswith(".magnitude") for n in names)
    model.eval()
    lorakit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    check(f"dora {arch} lorakit->PEFT", forward(model), forward(theirs), base)
    theirs_sd = peft.get_peft_model_state_dict(theirs)
    ours_sd = lorakit.lora_state_dict(model)
    assert sorted(theirs_sd) == sorted(ours_sd)
    assert all(torch.equal(theirs_sd[k], ours_sd[k]) for k in ours_sd)


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_dora_peft_to_lorakit(arch, tmp_path):
    base = forward(build(arch))
    theirs = peft.get_peft_model(build(arch), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[arch], use_dora=True, fan_in_fan_out=arch == "gpt2"))
    randomise_trainable(theirs)
    theirs.eval().save_pretrained(str(tmp_path))
    ours = lorakit.load_adapter(build(arch), tmp_path).eval()
    check(f"dora {arch} PEFT->lorakit", forward(ours), forward(theirs), base)
    merged = forward(lorakit.merge_and_unload(ours))
    assert (merged - forward(theirs)).abs().max() < TOL


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_adalora_lorakit_to_peft(arch, tmp_path):
    base = forward(build(arch))
    model = apply_method(build(arch), "adalora", AdaptSpec(
        head=[], lora_targets=TARGETS[arch], r=2, alpha=8, extra={"adalora_init_r": 4}))
    randomise_trainable(model)
    layers = svd_layers(model)
    layers[0][1].rank_mask = torch.tensor([True, False, True, False])    # a pruned rank pattern
    layers[1][1].rank_mask = torch.tensor([False, False, False, True])
    model.train_hooks.apply_masks()
    model.eval()
    folder = model.method_io.save(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(arch), str(folder)).eval()
    assert theirs.peft_config["default"].peft_type == peft.PeftType.ADALORA
    check(f"adalora {arch} lorakit->PEFT", forward(model), forward(theirs), base)
    name = layers[0][0]
    assert theirs.base_model.model.get_submodule(name).lora_A["default"].shape[0] == 2


def test_adalora_peft_to_lorakit(tmp_path):
    """PEFT trains a few steps and prunes with its own RankAllocator; its file loads in lorakit."""
    arch = "bert"
    base = forward(build(arch))
    cfg = peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=TARGETS[arch],
                             total_step=10, tinit=1, tfinal=2, deltaT=1)
    theirs = peft.get_peft_model(build(arch), cfg)
    randomise_trainable(theirs)
    optimizer = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    for step in range(10):
        out = theirs(input_ids=ids)             # the pooler's dense is a target too: use its output
        (out.last_hidden_state.square().mean() + out.pooler_output.square().mean()).backward()
        optimizer.step()
        theirs.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    theirs.eval().save_pretrained(str(tmp_path))
    pattern = theirs.peft_config["default"].rank_pattern
    assert pattern and sum(sum(v) for v in pattern.values()) == 2 * len(pattern)
    ours = load_adalora(build(arch), tmp_path).eval()
    check("adalora bert PEFT->lorakit", forward(ours), forward(theirs), base)
