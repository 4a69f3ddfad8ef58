"""Section 7 analyses: effective rank, subspace similarity phi, amplification; `lorakit analyze` smoke."""

import json

import pytest
import torch

from conftest import ALL_TARGETS, randomize_adapters
from lorakit import LoraConfig, LoraError, apply_lora, lora_layers, save_adapter
from lorakit.tools.analysis import (adapter_matrices, amplification, analyze, delta, effective_ranks,
                              subspace_similarity)
from lorakit.cli import main


def orthonormal(n, k, seed):
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))[0]


def test_effective_rank_of_a_constructed_rank_k_matrix():
    k, sigma = 5, torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0])
    dw = orthonormal(40, k, 0) @ torch.diag(sigma.double()) @ orthonormal(30, k, 1).T
    ranks = effective_ranks(torch.linalg.svdvals(dw), tuple(dw.shape))
    assert ranks["numerical"] == k
    assert ranks["entropy"] == pytest.approx(k, rel=1e-9)      # k equal singular values
    assert ranks["energy_90"] == 5                              # 4/5 = 0.8 < 0.9 <= 5/5
    skewed = effective_ranks(torch.tensor([3.0, 1.0, 1.0, 0.0]), (4, 4))
    # energy 9/11 = 0.82, then 10/11 = 0.91
    assert skewed["numerical"] == 3 and skewed["energy_90"] == 2 and 1 < skewed["entropy"] < 3


def test_phi_of_an_adapter_with_itself_is_one_on_the_diagonal():
    a = torch.randn(8, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    phi = subspace_similarity(a, a)
    assert phi.shape == (8, 8)
    torch.testing.assert_close(torch.diagonal(phi), torch.ones(8, dtype=torch.float64))
    assert (phi <= 1 + 1e-12).all() and (phi >= 0).all()
    # a subspace inside a bigger one: phi(i=r1, j=r2) = 1 whatever the rank of the other
    bigger = torch.cat([a, torch.randn(24, 50, dtype=torch.float64)])
    assert subspace_similarity(a, bigger)[-1, -1] == pytest.approx(1.0, abs=1e-9)


def test_phi_of_independent_random_subspaces_is_about_max_i_j_over_n():
    n, r1, r2 = 400, 8, 32
    values = torch.stack([subspace_similarity(torch.randn(r1, n, dtype=torch.float64),
                                              torch.randn(r2, n, dtype=torch.float64))
                          for _ in range(20)]).mean(0)
    i = torch.arange(1, r1 + 1)[:, None].double()
    j = torch.arange(1, r2 + 1)[None, :].double()
    expected = torch.maximum(i, j) / n                          # E||U_i^T U_j||^2 = i j / n
    assert (values[-1, -1] - expected[-1, -1]).abs() < 0.3 * expected[-1, -1]
    assert values.max() < 0.2


def test_amplification_against_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(30, 20, generator=gen, dtype=torch.float64)
    dw = torch.randn(30, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 20, generator=gen,
                                                                              dtype=torch.float64)
    got = amplification(dw, w, r=2)
    u, _, vh = torch.linalg.svd(dw)
    direct = (u[:, :2].T @ w @ vh[:2].T).norm()
    assert got["proj_dW_dirs"] == pytest.approx(direct.item(), rel=1e-10)
    assert got["amplification"] == pytest.approx(dw.norm().item() / direct.item(), rel=1e-10)
    top = torch.linalg.svdvals(w)[:2]
    assert got["proj_W_dirs"] == pytest.approx(top.norm().item(), rel=1e-10)
    # W's own directions hold the most of W any r-dim projection can (Ky Fan)
    assert got["proj_W_dirs"] >= got["proj_dW_dirs"] and got["proj_W_dirs"] >= got["proj_random_dirs"]
    with pytest.raises(LoraError, match="differ in shape"):
        amplification(dw, w.T, r=2)


@pytest.fixture
def saved(tiny, tmp_path):
    apply_lora(tiny, LoraConfig(r=4, alpha=8, target_modules=ALL_TARGETS,
                                fused_slices={"qkv": [True, False, True]}))
    randomize_adapters(tiny, seed=2)
    save_adapter(tiny, tmp_path / "a")
    return tiny, tmp_path / "a"


def test_matrices_read_from_the_file_match_the_layers(saved):
    model, path = saved
    mats = adapter_matrices(path)
    layers = dict(lora_layers(model))
    assert {"layers.0.qkv[0]", "layers.0.qkv[2]", "embed", "conv2d"} <= set(mats)
    for name in ("layers.0.query", "embed", "conv", "layers.1.c_fc"):
        layer = layers[name]
        expected = layer.delta_weight(layer.lora["default"]).double()
        if name in ("embed", "layers.1.c_fc"):
            expected = expected.T                          # stored turned; dW is (out, in)
        torch.testing.assert_close(delta(mats[name]), expected.flatten(1))
    fused = layers["layers.0.qkv"].delta_weight(layers["layers.0.qkv"].lora["default"]).double()
    torch.testing.assert_close(delta(mats["layers.0.qkv[2]"]), fused[32:48])


def test_analyze_with_itself_and_base(saved):
    model, path = saved
    result = analyze(path, path, base=model)
    entry = result["modules"]["layers.0.query"]
    assert entry["r"] == 4 and entry["effective_rank"]["numerical"] == 4
    assert entry["phi"]["phi_1_1"] == pytest.approx(1.0) and entry["phi"]["phi_r_r"] == pytest.approx(1.0)
    assert entry["amplification"]["amplification"] > 0
    assert result["summary"]["query"]["count"] == 2


def test_cli_analyze_smoke(saved, tmp_path, capsys):
    _, path = saved
    out = tmp_path / "analysis"
    assert main(["analyze", str(path), "--other", str(path), "--out", str(out)]) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert data["summary"]["query"]["mean_phi_1_1"] == pytest.approx(1.0)
    assert (out / "singular_values.png").stat().st_size > 1000
    assert (out / "subspace_similarity.png").stat().st_size > 1000
    assert "query" in capsys.readouterr().out
    assert main(["analyze", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_learned_directions_of_a_count_what_left_the_init_spectrum(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    apply_lora(model, LoraConfig(r=8, alpha=8, target_modules=["0", "1"]))
    layer = dict(lora_layers(model))["0"]
    with torch.no_grad():                             # one direction far above the init's edge
        layer.lora["default"].A[0] += 5.0 * torch.ones(256) / 16
    save_adapter(model, tmp_path / "a")
    modules = analyze(tmp_path / "a")["modules"]
    assert modules["0"]["A_init_edge"] == pytest.approx((16 + 8 ** 0.5) / 8)
    assert modules["0"]["A_learned_directions"] == 1
    assert modules["1"]["A_learned_directions"] == 0                  # untouched init
