"""rvc_lora.metrics on signals whose distances are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rvc_lora.errors import ParameterError
from rvc_lora.extract import snr_db
from rvc_lora.metrics import GROSS_CENTS, f0_agreement, log_mel_distance

SR = 16000


def noise(seconds: float = 0.5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(seconds * SR))


def test_log_mel_distance_of_a_signal_to_itself_is_zero() -> None:
    x = noise()
    assert log_mel_distance(x, x, SR) == 0.0


@pytest.mark.parametrize("gain", [2.0, 0.5, 10.0])
def test_log_mel_distance_of_a_scaled_copy_is_the_gain_in_db(gain: float) -> None:
    # every band's power scales by gain^2: the per-band dB difference is 20 log10(gain) everywhere (white noise
    # keeps every band far above the floor, even at 1/10 of the level)
    x = noise()
    assert log_mel_distance(x, gain * x, SR) == pytest.approx(abs(20 * math.log10(gain)), abs=1e-6)


def test_log_mel_distance_is_small_for_faint_noise_and_large_for_another_spectrum() -> None:
    x = noise()
    t = np.arange(SR // 2) / SR
    assert 0 < log_mel_distance(x, x + 0.01 * noise(seed=1), SR) < 0.05  # power within ~1e-4: ~4e-4 dB
    tone, other = np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 1760 * t)  # two octaves apart: other bands
    assert log_mel_distance(tone, other, SR) > 10  # a few bands 80 dB apart (the floor), the rest equal


def test_snr_of_a_phase_shifted_sine_follows_the_formula() -> None:
    # x = sin(wt), y = sin(wt + p): |x - y|^2 / |x|^2 = 2 - 2 cos p over whole periods
    t = torch.arange(SR, dtype=torch.float64) / SR
    for phase in (0.1, 0.5, 1.0):
        got = snr_db(torch.sin(2 * math.pi * 100 * t), torch.sin(2 * math.pi * 100 * t + phase))
        assert got == pytest.approx(-10 * math.log10(2 - 2 * math.cos(phase)), abs=1e-6)


def test_f0_agreement_of_a_track_to_itself() -> None:
    f0 = np.array([0, 0, 100, 110, 120, 0, 200.0])
    a = f0_agreement(f0, f0)
    assert (a.voicing, a.cents, a.gross, a.both_voiced) == (1.0, 0.0, 0.0, 4)


def test_f0_agreement_measures_cents_gross_errors_and_voicing() -> None:
    ref = np.full(10, 200.0)
    ref[:2] = 0.0  # 8 voiced frames
    est = ref * 2 ** (30 / 1200)  # 30 cents sharp everywhere
    a = f0_agreement(ref, est)
    assert a.cents == pytest.approx(30) and a.gross == 0.0 and a.voicing == 1.0
    est[2:5] = 400.0  # 3 octave errors among the 8 voiced frames
    est[9] = 0.0  # one frame the estimate calls unvoiced
    b = f0_agreement(ref, est)
    assert b.voicing == pytest.approx(0.9) and b.both_voiced == 7
    assert b.gross == pytest.approx(3 / 7) and 1200 > GROSS_CENTS
    assert b.cents == pytest.approx(30)  # the median ignores the minority of octave errors


def test_f0_agreement_without_common_voiced_frames_is_nan() -> None:
    a = f0_agreement(np.zeros(5), np.full(5, 100.0))
    assert a.voicing == 0.0 and math.isnan(a.cents) and math.isnan(a.gross) and a.both_voiced == 0


@pytest.mark.parametrize("bad", [np.zeros((2, 2)), np.array([]), np.array([1.0, np.nan])])
def test_metrics_refuse_what_is_not_a_finite_1d_signal(bad: np.ndarray) -> None:
    with pytest.raises(ParameterError):
        log_mel_distance(bad, np.ones(100), SR)
    with pytest.raises(ParameterError):
        f0_agreement(np.ones(3), bad)
