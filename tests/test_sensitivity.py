"""Detection efficiency by SNR bin at a fixed false-alarm probability (report/sensitivity.py)."""

import numpy as np
import pytest

from lorakit.report import sensitivity as sens


def constructed():
    """100 noise scores 0..99 (1% FAP threshold: 98, one noise sample above) and 10 signals per bin;
    in bin i (SNR 4+2i .. 6+2i) the first 2i signals score 1000 (detected), the rest 50."""
    scores, labels, snr = list(range(100)), [0] * 100, [0.0] * 100
    for i, lo in enumerate(range(4, 16, 2)):
        for j in range(10):
            scores.append(1000 if j < 2 * i else 50)
            labels.append(1)
            snr.append(lo + 0.1 + 0.18 * j)
    return np.array(scores), np.array(labels), np.array(snr)


def test_threshold_bins_and_efficiency():
    out = sens.efficiency(*constructed())
    assert out["threshold"] == 98 and out["fap"] == pytest.approx(0.01)
    assert [(b["lo"], b["hi"], b["n"]) for b in out["bins"]] == [(4, 6, 10), (6, 8, 10), (8, 10, 10),
                                                                (10, 12, 10), (12, 14, 10), (14, 16, 10)]
    assert [b["efficiency"] for b in out["bins"]] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert out["bins"][2]["stderr"] == pytest.approx(np.sqrt(0.4 * 0.6 / 10))
    # bin AUC: detected signals beat every noise score; a 50 beats 0..49 and ties with 50: 50.5%
    assert out["bins"][5]["auc"] == 1.0 and out["bins"][0]["auc"] == pytest.approx(0.505)


def test_edges_go_to_the_upper_bin_and_16_is_kept():
    scores = np.r_[np.zeros(100), [5.0, 5.0, 5.0]]
    labels = np.r_[np.zeros(100), np.ones(3)]
    out = sens.efficiency(scores, labels, np.r_[np.zeros(100), [6.0, 15.99, 16.0]])
    assert [b["n"] for b in out["bins"]] == [0, 1, 0, 0, 0, 2]


def test_rho50_auc99_and_seed_spread():
    out = sens.efficiency(*constructed())
    assert sens.rho50(out) == pytest.approx(10.0)      # 0.4 at centre 9, 0.6 at centre 11
    assert sens.auc99_from(out) == 14
    other = sens.efficiency(*constructed())
    other["bins"][1]["efficiency"] = 0.4
    both = sens.combine([out, other])
    assert both["bins"][1]["efficiency"] == pytest.approx(0.3)
    assert both["bins"][1]["spread"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    lines = sens.section({"lora": both, "matched-filter": out})
    assert any("SNR 4-6" in line for line in lines)
    assert any(line.startswith("- lora:") and "from the matched filter" in line for line in lines)
