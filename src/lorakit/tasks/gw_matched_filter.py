"""The optimal detector for the gw task: whitened matched filtering over a template bank.

For Gaussian noise of known PSD S(f), the matched filter is the optimal statistic for a known signal;
maximised over a bank of templates, arrival time and phase it is the standard search statistic, the
ceiling a trained network can approach. Everything here reads the raw strain the data set was made
from (gw_data.strain_samples) and the same design PSDs.

Per detector, with a_k = rfft(w x)_k / sqrt(N S_k mean(w^2) / (2 dt)) (unit-variance complex white
noise in the 20-500 Hz band, zero outside; w the data's Tukey window) and a template's whitened,
normalised spectrum b_k = h~_k / sqrt(S_k) / ||h~ / sqrt(S)|| (sum_k |b_k|^2 = 1):

    z(tau) = sqrt(2) sum_k a_k conj(b_k) exp(2 pi i k tau / N)        (complex SNR time series)

Its real and imaginary parts are the two orthogonal phases of the template, each of unit variance in
noise, so |z|^2 of noise averages 2 and max over phase is |z|; for the exact template at the right time
|z| is the optimal SNR (up to the window). The negative frequencies are left out, so one complex ifft
of length N gives z for every circular lag tau at once.

Network statistic (incoherent, respecting light-travel time; common template):
    rho^2_net = max over templates, over H1 times t in the merger-time prior (1.2-1.8 s geocentric,
                +-22 ms of H1 delay) of  |z_H1(t)|^2 + max_{|d| <= 10 ms} |z_L1(t+d)|^2
                                                    + max_{|d| <= 27 ms} |z_V1(t+d)|^2
(10 ms and 27 ms are the H1-L1 and H1-V1 light-travel times, rounded up.)

Templates: IMRPhenomD (lalsimulation, the approximant of the injections; PyCBC is not needed), the
plus polarisation at 1 Mpc, from 20 Hz, truncated to the last PRE_S seconds before the peak (no
injection has more in the window) with a short Hann taper, placed with its peak at sample 0. The
default bank is the zero-spin grid of 12 log-spaced masses in 10-50 Msun (78 pairs m1 >= m2); ``spins``
adds aligned-spin rows (s1z = s2z = chi) to cover the prior's +-0.5 (a larger bank also raises the noise
maximum, so it need not score higher).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from lorakit.errors import LoraError
from lorakit.tasks import gw_data as g

PRE_S, POST_S, TAPER_S = 1.25, 0.25, 0.05      # template span before / after the peak, start taper (s)
LIGHT_TRAVEL_S = {"L1": 0.010, "V1": 0.027}    # max |t_det - t_H1|, rounded up
H1_WINDOW_S = (1.2 - 0.022, 1.8 + 0.022)       # the prior's merger times, seen at H1


def template_grid(n_masses: int = 12, spins=(0.0,), m_lo: float = 10.0, m_hi: float = 50.0) -> np.ndarray:
    """(T, 4) rows (m1, m2, s1z, s2z): log-spaced masses, every pair m1 >= m2, each spin s1z = s2z."""
    masses = np.geomspace(m_lo, m_hi, n_masses)
    rows = [(m1, m2, chi, chi) for chi in spins
            for m1, m2 in itertools.combinations_with_replacement(masses[::-1], 2)]
    return np.array(rows, dtype=np.float64)


def template_strain(m1: float, m2: float, s1z: float, s2z: float) -> np.ndarray:
    """IMRPhenomD h_+ (face-on, 1 Mpc), (N,) with its peak at sample 0 and the inspiral wrapped to the
    end of the array (circular lags then put the peak at the lag)."""
    lal, ls = g._lal()
    hp, _ = ls.SimInspiralChooseTDWaveform(
        m1 * lal.MSUN_SI, m2 * lal.MSUN_SI, 0, 0, s1z, 0, 0, s2z, 1e6 * lal.PC_SI, 0.0, 0.0,
        0, 0, 0, g.DT, g.BAND[0], g.BAND[0], lal.CreateDict(), ls.IMRPhenomD)
    h, peak = hp.data.data, round(-float(hp.epoch) * g.FS)          # the peak is at t = 0
    pre, post, taper = (round(s * g.FS) for s in (PRE_S, POST_S, TAPER_S))
    h = h[max(0, peak - pre):peak + post].copy()
    start = min(pre, peak)
    h[:taper] *= 0.5 * (1 - np.cos(np.pi * np.arange(min(taper, len(h))) / taper))
    out = np.zeros(g.N)
    out[(np.arange(len(h)) - start) % g.N] = h
    return out


def whitened_templates(bank: np.ndarray, psd: np.ndarray) -> torch.Tensor:
    """(T, 3, 2049) complex64 b_k per template and detector: h~ / sqrt(S) in band, unit norm."""
    spectra = np.fft.rfft(np.stack([template_strain(*row) for row in bank]))      # (T, 2049)
    b = np.zeros((len(bank), len(g.DETECTORS), len(g.FREQS)), dtype=np.complex128)
    b[:, :, g.IN_BAND] = spectra[:, None, g.IN_BAND] / np.sqrt(psd[None, :, g.IN_BAND])
    b /= np.linalg.norm(b, axis=-1, keepdims=True)
    return torch.from_numpy(b.astype(np.complex64))


def whitened_data(strain: np.ndarray, psd: np.ndarray) -> torch.Tensor:
    """(B, 3, 4096) raw strain -> (B, 3, 2049) complex64 a_k, unit-variance white noise in band."""
    X = np.fft.rfft(strain * g.WINDOW)
    a = np.zeros_like(X)
    a[..., g.IN_BAND] = X[..., g.IN_BAND] / np.sqrt(
        g.N * psd[..., g.IN_BAND] * np.mean(g.WINDOW ** 2) / (2 * g.DT))
    return torch.from_numpy(a.astype(np.complex64))


def snr_series(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|z(tau)|^2 for data a (B, 3, F) and templates b (T, 3, F): (B, T, 3, N) float32."""
    c = torch.zeros(a.shape[0], b.shape[0], a.shape[1], g.N, dtype=torch.complex64)
    c[..., :a.shape[-1]] = a[:, None] * b.conj()[None]
    z = torch.fft.ifft(c, dim=-1) * (math.sqrt(2) * g.N)
    return z.real ** 2 + z.imag ** 2


def network_statistic(z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, 3, N) |z|^2 -> (rho^2_net (B,), best template index (B,)), the statistic in the docstring."""
    def best_within(x: torch.Tensor, seconds: float) -> torch.Tensor:
        w = math.ceil(seconds * g.FS)
        padded = torch.cat([x[..., -w:], x, x[..., :w]], dim=-1)     # circular, like the lags
        return padded.unfold(-1, 2 * w + 1, 1).amax(dim=-1)
    lo, hi = (round(s * g.FS) for s in H1_WINDOW_S)
    total = (z2[:, :, 0] + best_within(z2[:, :, 1], LIGHT_TRAVEL_S["L1"])
             + best_within(z2[:, :, 2], LIGHT_TRAVEL_S["V1"]))[..., lo:hi + 1]
    per_template = total.amax(dim=-1)                                # (B, T)
    value, index = per_template.max(dim=-1)
    return value, index


def matched_filter_scores(strain: np.ndarray, psd: np.ndarray, bank: np.ndarray, chunk: int = 8,
                          progress: bool = True) -> dict:
    """Network statistic of each sample: {"scores": (B,), "template": (B,) best bank row index}.

    Memory: chunk x T x 3 x N complex64 (8 x 78 x 3 x 4096 x 8 B = 61 MB at the defaults)."""
    from tqdm import tqdm           # deferred: heavy optional dependency
    if strain.ndim != 3 or strain.shape[1:] != (len(g.DETECTORS), g.N):
        raise LoraError(f"strain has shape {strain.shape}; expected (samples, {len(g.DETECTORS)}, {g.N})")
    if len(bank) == 0:
        raise LoraError("the template bank is empty; give at least one (m1, m2, s1z, s2z) row")
    b = whitened_templates(bank, psd)
    scores, best = [], []
    for start in tqdm(range(0, len(strain), chunk), desc="matched filter", disable=not progress):
        value, index = network_statistic(snr_series(whitened_data(strain[start:start + chunk], psd), b))
        scores.append(value)
        best.append(index)
    return {"scores": torch.cat(scores).numpy(), "template": torch.cat(best).numpy()}
