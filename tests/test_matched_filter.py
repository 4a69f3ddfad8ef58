"""The gw task's optimal detector (tasks/gw_matched_filter.py): noise normalisation, recovery of a loud
injection with its exact template, and detection on a small simulated set; the strain replay it reads."""

import numpy as np
import pytest
import torch

pytest.importorskip("lalsimulation")
from sklearn.metrics import roc_auc_score  # noqa: E402

from lorakit.errors import LoraError  # noqa: E402
from lorakit.tasks import gw_data as g  # noqa: E402
from lorakit.tasks import gw_matched_filter as mf  # noqa: E402


@pytest.fixture(scope="module")
def psd():
    return g.design_psd()


def test_grid_is_the_78_template_zero_spin_bank():
    bank = mf.template_grid()
    assert bank.shape == (78, 4) and (bank[:, 0] >= bank[:, 1]).all() and (bank[:, 2:] == 0).all()
    assert bank[:, :2].min() == pytest.approx(10) and bank[:, :2].max() == pytest.approx(50)
    assert len(mf.template_grid(spins=(-0.4, 0, 0.4))) == 3 * 78


def test_noise_snr_squared_averages_two_per_template(psd):
    rng = np.random.default_rng(0)
    noise = np.stack([g.coloured_noise(rng, psd) for _ in range(12)])
    z2 = mf.snr_series(mf.whitened_data(noise, psd), mf.whitened_templates(mf.template_grid()[::13], psd))
    assert z2.shape == (12, 6, 3, g.N)
    assert z2.mean().item() == pytest.approx(2.0, abs=0.1)       # two unit-variance phases


def test_exact_template_recovers_a_loud_injection(psd):
    rng = np.random.default_rng(5)
    source = {**g.draw_bbh(rng), "m1": 35.0, "m2": 20.0, "s1z": 0.3, "s2z": -0.2}
    h = g.bbh_strain(rng, source)
    h *= 20.0 / np.linalg.norm(g.optimal_snr(h, psd))           # network SNR 20
    clean = mf.matched_filter_scores(h[None], psd, np.array([[35.0, 20.0, 0.3, -0.2]]), progress=False)
    # without noise the statistic is the optimal SNR^2 (the window costs a few %)
    assert np.sqrt(clean["scores"][0]) == pytest.approx(20.0, rel=0.08)
    noisy = h + np.stack([g.coloured_noise(rng, psd)])[0]
    bank = mf.template_grid()
    found = mf.matched_filter_scores(noisy[None], psd, bank, progress=False)
    assert np.sqrt(found["scores"][0]) > 17                       # far above noise (~4.5 for 78 templates)
    m1, m2 = bank[found["template"][0], :2]
    assert abs((m1 * m2) ** 0.6 / (m1 + m2) ** 0.2 - 22.9) < 6     # chirp mass near the source's 22.9


def test_detects_on_a_small_simulated_set_and_replays_the_cached_samples(psd, tmp_path):
    n = 48
    data = g.strain_samples(n, 7, range(n))
    cached = g.make_gw_dataset(n, seed=7, cache_dir=tmp_path, progress=False)
    assert np.array_equal(data["labels"], cached["labels"].numpy())
    np.testing.assert_allclose(data["snr"], cached["snr"].numpy(), rtol=1e-6)
    assert torch.equal(g.log_mel(g.whiten(data["strain"][:3], psd)), cached["features"][:3])
    scores = mf.matched_filter_scores(data["strain"], psd, mf.template_grid(), progress=False)["scores"]
    assert roc_auc_score(data["labels"], scores) > 0.8              # chance is 0.5; ~0.94 on 1,000


def test_bad_inputs_are_refused(psd):
    with pytest.raises(LoraError, match="expected"):
        mf.matched_filter_scores(np.zeros((2, 4096)), psd, mf.template_grid(), progress=False)
    with pytest.raises(LoraError, match="empty"):
        mf.matched_filter_scores(np.zeros((1, 3, 4096)), psd, np.zeros((0, 4)), progress=False)
