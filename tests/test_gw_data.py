"""Synthetic G2Net-like data (lalsuite) and the G2Net loader: shapes, balance, determinism, cache, physics."""

import numpy as np
import pytest
import torch

pytest.importorskip("lalsimulation")
pytest.importorskip("tqdm")
from lorakit.errors import LoraError  # noqa: E402
from lorakit.tasks import gw_data as gw  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return gw.make_gw_dataset(16, seed=0, progress=False)


def test_shapes_balance_and_snr(data):
    assert data["features"].shape == (16, 3, 80, 128) and data["features"].dtype == torch.float32
    assert data["labels"].tolist().count(1) == 8
    snr, signal = data["snr"], data["labels"] == 1
    assert (snr[~signal] == 0).all() and ((snr[signal] >= 4) & (snr[signal] <= 16)).all()
    assert torch.isfinite(data["features"]).all() and data["features"].abs().max() < 3   # Whisper-like range


def test_same_seed_same_data_other_seed_differs(data):
    again = gw.make_gw_dataset(16, seed=0, progress=False)
    assert all(torch.equal(data[k], again[k]) for k in data)
    assert not torch.equal(data["features"], gw.make_gw_dataset(16, seed=1, progress=False)["features"])


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    first = gw.make_gw_dataset(4, seed=3, cache_dir=tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["gw_v2_n4_seed3_snr4-16.npz"]

    def refuse(*args):
        raise AssertionError("regenerated although the cache exists")

    monkeypatch.setattr(gw, "coloured_noise", refuse)
    second = gw.make_gw_dataset(4, seed=3, cache_dir=tmp_path, progress=False)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_loud_signals_carry_more_in_band_power_than_noise():
    data = gw.make_gw_dataset(16, seed=0, snr_range=(20, 20), progress=False)
    power = 10 ** (4 * data["features"].numpy())                  # undo features = log10(P) / 4
    band = power[:, :, 5:60, :].mean(axis=2).sum(axis=1)          # mels ~25-350 Hz, summed over detectors
    peak = np.array([np.convolve(b, np.ones(4) / 4, "valid").max() for b in band])   # loudest 62 ms
    y = data["labels"].numpy()
    # Measured: every signal above 12.6, every noise sample below 9.7 (noise mean 8.5, std 0.5).
    assert peak[y == 1].min() > peak[y == 0].max()


def test_snr_matches_whitened_signal_energy():
    """rho^2 = 4 df sum |h~|^2 / S should equal the energy of the whitened signal (Parseval)."""
    psd = gw.design_psd()
    h = gw.bbh_strain(np.random.default_rng(0))
    rho = gw.optimal_snr(h, psd)
    energy = (gw.whiten(h, psd) ** 2).sum(axis=1) * gw.IN_BAND.mean() * np.mean(gw.WINDOW ** 2)
    np.testing.assert_allclose(energy, rho ** 2, rtol=0.02)
    noise = gw.whiten(gw.coloured_noise(np.random.default_rng(1), psd), psd)
    assert np.all(np.abs(noise.std(axis=1) - 1) < 0.1)


def _g2net_dir(root, arrays):
    lines = ["id,target"]
    for name, x, y in arrays:
        f = root / "train" / name[0] / name[1] / name[2] / f"{name}.npy"
        f.parent.mkdir(parents=True, exist_ok=True)
        np.save(f, x)
        lines.append(f"{name},{y}")
    (root / "training_labels.csv").write_text("\n".join(lines) + "\n")


def test_load_g2net_layout_and_bad_shape(tmp_path):
    psd, rng = gw.design_psd(), np.random.default_rng(0)
    good = [(f"{i:x}a0b1c2", gw.coloured_noise(rng, psd), i % 2) for i in range(4)]
    _g2net_dir(tmp_path / "ok", good)
    out = gw.load_g2net(tmp_path / "ok")
    assert out["features"].shape == (4, 3, 80, 128) and out["labels"].tolist() == [0, 1, 0, 1]
    assert out["ids"][0] == "0a0b1c2"

    _g2net_dir(tmp_path / "bad", good[:1] + [("ffee00", np.zeros((3, 2048)), 0)])
    with pytest.raises(LoraError, match=r"ffee00\.npy has shape \(3, 2048\), expected \(3, 4096\)"):
        gw.load_g2net(tmp_path / "bad")
