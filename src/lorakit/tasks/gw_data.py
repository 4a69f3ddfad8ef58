"""Gravitational-wave detection data: a synthetic G2Net-like generator (lalsuite) and the G2Net .npy loader.

A sample is 2 s of strain from the detectors H1, L1, V1 at 2048 Hz, shape (3, 4096), like Kaggle's G2Net.
Half the synthetic samples carry a binary-black-hole (BBH) merger; the classifier sees log-mel images:

    strain (3, 4096) --whiten by the PSD, band-pass 20-500 Hz--> (3, 4096) ~ unit variance
                     --log_mel--> (3, 80, 128) features in Whisper's input range (noise ~0, chirp pixels > 0)

Simulation (one numpy Generator per sample, seeded by (seed, index), so a sample never depends on n):
  * noise: Gaussian, coloured in the frequency domain by the design PSDs (aLIGO zero-detuned high power for
    H1 and L1, AdvVirgo for V1). For numpy's rfft, one-sided PSD S gives E|X_k|^2 = N S_k / (2 dt).
  * signal: IMRPhenomD, masses U(10, 50) Msun, aligned spins U(-0.5, 0.5), isotropic sky and inclination,
    uniform polarisation and phase, geocentric merger at U(1.2, 1.8) s; projected onto each detector with
    its antenna pattern and light-travel delay (SimDetectorStrainREAL8TimeSeries), then rescaled to a
    network optimal SNR drawn from `snr_range`, rho_net^2 = sum_det 4 df sum_{20..500 Hz} |h~(f)|^2 / S(f),
    i.e. the SNR visible in the analysis band and in the Tukey-windowed 2 s segment.
"""

import csv
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lorakit.errors import LoraError

FS, N = 2048, 4096                       # sample rate (Hz), samples per detector (2 s)
DT, DF = 1.0 / FS, FS / N                # 0.49 ms, 0.5 Hz
DETECTORS = ("H1", "L1", "V1")
BAND = (20.0, 500.0)                     # analysis band (Hz): below, seismic wall; above, little BBH power
FREQS = np.fft.rfftfreq(N, DT)           # (2049,)
IN_BAND = (FREQS >= BAND[0]) & (FREQS <= BAND[1])
N_FFT, WIN, HOP, N_MELS = 512, 256, 32, 80   # 125 ms Hann window zero-padded to 4 Hz bins; 128 frames
GPS0 = 1_000_000_000                     # window start: fixes Earth's orientation; a random ra covers the sky
_VERSION = 2                             # bump when the generator or the cache format changes: it is
                                         # part of the cache file name (2: + "params" per sample)


def _tukey(n: int = N, alpha: float = 0.1) -> np.ndarray:
    """Flat window with cosine ramps over alpha/2 of each end: tapers the segment edges before the FFT."""
    w, k = np.ones(n), int(alpha * (n - 1) / 2)
    ramp = 0.5 * (1 - np.cos(np.pi * np.arange(k) / k))
    w[:k], w[n - k:] = ramp, ramp[::-1]
    return w


WINDOW = _tukey()


def _lal():
    try:
        import lal               # deferred: heavy optional dependency
        import lalsimulation     # deferred: heavy optional dependency
    except ImportError as e:
        raise LoraError("synthetic GW data needs lalsuite; run `pip install lalsuite`") from e
    return lal, lalsimulation


def design_psd() -> np.ndarray:
    """One-sided design PSDs (strain^2/Hz) on FREQS, shape (3, 2049). Below 10 Hz held at the 10 Hz value
    (the curves diverge there, and the band-pass discards it anyway)."""
    _, ls = _lal()
    f = np.maximum(FREQS, 10.0)
    ligo = np.array([ls.SimNoisePSDaLIGOZeroDetHighPower(x) for x in f])
    virgo = np.array([ls.SimNoisePSDAdvVirgo(x) for x in f])
    return np.stack([ligo, ligo, virgo])


def coloured_noise(rng: np.random.Generator, psd: np.ndarray) -> np.ndarray:
    """Gaussian noise with one-sided PSD `psd` (3, 2049) -> (3, 4096): X_k = sqrt(N S_k / (4 dt)) (a + ib)."""
    X = np.sqrt(N * psd / (4 * DT)) * (rng.standard_normal(psd.shape) + 1j * rng.standard_normal(psd.shape))
    X[:, 0] = X[:, -1] = 0               # DC and Nyquist: out of band, and they must be real
    return np.fft.irfft(X, n=N)


PARAMS = ("m1", "m2", "s1z", "s2z", "tc")   # source-frame masses (Msun), aligned spins, merger time (s)


def draw_bbh(rng: np.random.Generator) -> dict:
    """A BBH from the prior: masses U(10, 50) Msun (m1 >= m2), aligned spins U(-0.5, 0.5), isotropic sky
    and inclination, uniform polarisation and phase, geocentric merger time U(1.2, 1.8) s on the grid."""
    m1, m2 = sorted(rng.uniform(10.0, 50.0, 2), reverse=True)
    s1z, s2z = rng.uniform(-0.5, 0.5, 2)
    ra, dec = rng.uniform(0, 2 * np.pi), np.arcsin(rng.uniform(-1, 1))
    psi, incl, phase = rng.uniform(0, np.pi), np.arccos(rng.uniform(-1, 1)), rng.uniform(0, 2 * np.pi)
    tc = round(rng.uniform(1.2, 1.8) * FS) / FS      # on the sample grid, so detector series align with it
    return dict(m1=m1, m2=m2, s1z=s1z, s2z=s2z, ra=ra, dec=dec, psi=psi, incl=incl, phase=phase, tc=tc)


def bbh_strain(rng: np.random.Generator, source: dict | None = None) -> np.ndarray:
    """A random BBH merger (or ``source`` from draw_bbh) as seen by H1, L1, V1 in the window starting
    at GPS0, shape (3, 4096)."""
    lal, ls = _lal()
    p = source if source is not None else draw_bbh(rng)
    hp, hc = ls.SimInspiralChooseTDWaveform(
        p["m1"] * lal.MSUN_SI, p["m2"] * lal.MSUN_SI, 0, 0, p["s1z"], 0, 0, p["s2z"], 400e6 * lal.PC_SI,
        p["incl"], p["phase"], 0, 0, 0, DT, BAND[0], BAND[0], lal.CreateDict(),
        ls.IMRPhenomD)                                                    # peak at t=0, start tapered
    for pol in (hp, hc):
        pol.epoch += GPS0 + p["tc"]
    out = np.zeros((len(DETECTORS), N))
    for row, prefix in zip(out, DETECTORS):
        h = ls.SimDetectorStrainREAL8TimeSeries(hp, hc, p["ra"], p["dec"], p["psi"],
                                                ls.DetectorPrefixToLALDetector(prefix))
        # h is on hp's sample grid (the sub-sample part of the delay is interpolated inside), so an integer
        start = round(float(h.epoch - lal.LIGOTimeGPS(GPS0)) * FS)
        data = h.data.data
        lo, hi = max(0, start), min(N, start + len(data))
        row[lo:hi] = data[lo - start:hi - start]
    return out


def optimal_snr(h: np.ndarray, psd: np.ndarray) -> np.ndarray:
    """Per-detector optimal SNR in the band: rho^2 = 4 df sum |h~|^2 / S with h~ = dt rfft(window * h)."""
    H = np.fft.rfft(h * WINDOW) * DT
    return np.sqrt(4 * DF * np.sum(np.abs(H[:, IN_BAND]) ** 2 / psd[:, IN_BAND], axis=-1))


def whiten(x: np.ndarray, psd: np.ndarray) -> np.ndarray:
    """(..., 4096) strain -> whitened, band-passed 20-500 Hz, unit variance for Gaussian noise of PSD `psd`.

    Y_k = rfft(w x)_k / sqrt(S_k mean(w^2) / (2 dt)) makes E|Y_k|^2 = N (white, unit variance); keeping
    only the band keeps a fraction IN_BAND.mean() of that variance, which the last division restores.
    """
    X = np.fft.rfft(x * WINDOW)
    Y = np.zeros_like(X)
    Y[..., IN_BAND] = X[..., IN_BAND] / np.sqrt(psd[..., IN_BAND] * np.mean(WINDOW ** 2) / (2 * DT))
    return np.fft.irfft(Y, n=N) / np.sqrt(IN_BAND.mean())


def mel_filterbank(n_mels: int = N_MELS, f_lo: float = BAND[0], f_hi: float = BAND[1]) -> torch.Tensor:
    """(n_mels, N_FFT // 2 + 1) triangles equally spaced on the HTK mel scale, mel = 2595 log10(1 + f / 700).

    Each row sums to 1, so a filter returns the mean power over its band and white noise gives a flat image
    (Slaney's area normalisation would do the same up to the bin width).
    """
    def mel(f):
        return 2595 * np.log10(1 + f / 700)

    edges = 700 * (10 ** (np.linspace(mel(f_lo), mel(f_hi), n_mels + 2) / 2595) - 1)    # Hz
    f = np.fft.rfftfreq(N_FFT, DT)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    tri = np.maximum(0, np.minimum((f - lo) / (mid - lo), (hi - f) / (hi - mid)))
    return torch.tensor(tri / tri.sum(axis=1, keepdims=True), dtype=torch.float32)


_MELS = mel_filterbank()


def log_mel(x) -> torch.Tensor:
    """Whitened (..., 4096) -> (..., 80, 128) float32 log-mel features.

    STFT: Hann 256 (125 ms) zero-padded to 512, hop 32, centred; the last of the 129 frames is dropped
    as Whisper does, leaving 4096 / 32 = 128. Power is divided by sum(w^2), so unit-variance white noise
    has expected power 1 per bin. Then Whisper's scaling (log_spec + 4) / 4 with log_spec = log10 of the
    power in units of 1e-4, floored at 1e-4 like Whisper's dynamic-range floor:
    features = max(log10(P), -4) / 4: Gaussian noise averages ~0.02 (std 0.13), floor -1, chirps up to ~0.5.
    """
    x = torch.as_tensor(x, dtype=torch.float32)
    window = torch.hann_window(WIN)
    spec = torch.stft(x.reshape(-1, N), N_FFT, HOP, win_length=WIN, window=window, center=True,
                      return_complex=True)[..., :-1]                    # (B, 257, 128)
    power = spec.abs() ** 2 / window.pow(2).sum()
    mel = _MELS @ power                                                  # (B, 80, 128)
    return (torch.clamp(mel, min=1e-4).log10() / 4).reshape(*x.shape[:-1], N_MELS, -1)


def _strain(rng: np.random.Generator, label: int, lo: float, hi: float, psd: np.ndarray):
    """One sample's raw strain (3, 4096), network SNR and source parameters (PARAMS; zeros for noise):
    noise, plus a BBH scaled to a network SNR U(lo, hi) if label. The draw order is fixed: replaying
    the same rng gives the same sample (strain_samples relies on it)."""
    strain, snr, params = coloured_noise(rng, psd), 0.0, np.zeros(len(PARAMS))
    if label:
        source = draw_bbh(rng)
        h, snr = bbh_strain(rng, source), rng.uniform(lo, hi)
        strain += h * snr / np.linalg.norm(optimal_snr(h, psd))     # norm over detectors: network SNR
        params = np.array([source[k] for k in PARAMS])
    return strain, snr, params


def _sample(rng: np.random.Generator, label: int, lo: float, hi: float, psd: np.ndarray):
    """One sample's (features (3, 80, 128), network SNR, source parameters)."""
    strain, snr, params = _strain(rng, label, lo, hi, psd)
    return log_mel(whiten(strain, psd)).numpy(), snr, params


@contextmanager
def _one_torch_thread():
    """Per-sample STFTs are tiny: with several intra-op threads on a busy machine, thread hand-off costs
    40x the work (measured 108 ms vs 2.7 ms a sample on 2 shared cores). Restored on exit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_gw_dataset(n: int, seed: int = 0, cache_dir=None, snr_range=(4.0, 16.0), progress: bool = True):
    """Synthetic G2Net-like set: {"features": (n, 3, 80, 128) float32, "labels": (n,) int64, "snr": (n,)
    injected network SNR, "params": (n, 5) the source's PARAMS (m1, m2, s1z, s2z, tc)}.

    Exactly n // 2 samples carry a signal (label 1, snr = its network SNR); the rest are noise (snr 0,
    params 0). The SNR and parameters stay in the cache so that sensitivity by SNR and the matched
    filter's exact-template check need no re-simulation.
    With `cache_dir`, the arrays are saved once as an .npz named by the parameters and reloaded after.
    """
    lo, hi = (float(v) for v in snr_range)
    if not (isinstance(n, (int, np.integer)) and n > 0):
        raise LoraError(f"n={n!r} must be a positive int (the number of samples to generate)")
    if not 0 < lo <= hi:
        raise LoraError(f"snr_range={snr_range!r} must be (low, high) with 0 < low <= high, e.g. (4, 16)")
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"gw_v{_VERSION}_n{int(n)}_seed{seed}_snr{lo:g}-{hi:g}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as f:
                return {k: torch.from_numpy(f[k]) for k in ("features", "labels", "snr", "params")}

    psd = design_psd()
    labels = dataset_labels(n, seed)
    snr, params = np.zeros(n, dtype=np.float32), np.zeros((n, len(PARAMS)), dtype=np.float64)
    features = np.empty((n, len(DETECTORS), N_MELS, N // HOP), dtype=np.float32)
    with _one_torch_thread():
        for i in tqdm(range(n), desc="gw samples", disable=not progress):
            features[i], snr[i], params[i] = _sample(np.random.default_rng([seed, i]), labels[i], lo, hi, psd)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")                 # write then rename: no half-written cache
        np.savez(tmp, features=features, labels=labels, snr=snr, params=params)
        tmp.replace(path)
    return {"features": torch.from_numpy(features), "labels": torch.from_numpy(labels),
            "snr": torch.from_numpy(snr), "params": torch.from_numpy(params)}


def dataset_labels(n: int, seed: int) -> np.ndarray:
    """Which of the n samples carry a signal: exactly n // 2, at seeded random positions."""
    return (np.random.default_rng(seed).permutation(n) < n // 2).astype(np.int64)


def strain_samples(n: int, seed: int, indices, snr_range=(4.0, 16.0)) -> dict:
    """The raw strain of samples ``indices`` of make_gw_dataset(n, seed, snr_range=...), replayed from
    their seeds (11 ms a sample): {"strain": (k, 3, 4096) float64, "labels", "snr", "params"}.
    For the matched filter, which reads strain rather than log-mel images."""
    lo, hi = (float(v) for v in snr_range)
    psd, labels = design_psd(), dataset_labels(n, seed)
    out = [_strain(np.random.default_rng([seed, int(i)]), labels[int(i)], lo, hi, psd) for i in indices]
    return {"strain": np.stack([o[0] for o in out]), "labels": labels[np.asarray(indices, dtype=int)],
            "snr": np.array([o[1] for o in out]), "params": np.stack([o[2] for o in out])}


def load_g2net(data_dir, n: int | None = None):
    """Kaggle G2Net: {"features": (n, 3, 80, 128), "labels": (n,), "ids": [str]} for the first n rows.

    Layout: data_dir/training_labels.csv (id,target) and data_dir/train/a/b/c/abc....npy of shape (3, 4096).
    The PSD is not known for real data, so it is estimated per detector by Welch averaging over the
    noise-only (target 0) samples among those loaded, one Tukey-windowed 2 s segment per file:
    S_k = 2 dt / (N mean(w^2)) * mean |rfft(w x)_k|^2, the normalisation that makes `whiten` consistent.
    """
    root = Path(data_dir)
    with open(root / "training_labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    ids, labels = [r["id"] for r in rows], np.array([int(r["target"]) for r in rows], dtype=np.int64)

    def strain(i: str) -> np.ndarray:
        file = root / "train" / i[0] / i[1] / i[2] / f"{i}.npy"
        x = np.load(file, allow_pickle=False)
        if x.shape != (len(DETECTORS), N):
            raise LoraError(f"{file} has shape {x.shape}, expected ({len(DETECTORS)}, {N}) "
                            f"(H1, L1, V1 x 2 s at {FS} Hz); check the file or the data directory")
        return x.astype(np.float64)

    noise = [i for i, y in zip(ids, labels) if y == 0]
    if not noise:
        raise LoraError(f"no noise-only (target 0) rows among the {len(ids)} loaded from {root}; "
                        f"the Welch PSD needs some: pass a larger n")
    power = sum(np.abs(np.fft.rfft(strain(i) * WINDOW)) ** 2 for i in noise) / len(noise)
    psd = 2 * DT / (N * np.mean(WINDOW ** 2)) * power
    with _one_torch_thread():
        features = torch.stack([log_mel(whiten(strain(i), psd)) for i in ids])
    return {"features": features, "labels": torch.from_numpy(labels), "ids": ids}
