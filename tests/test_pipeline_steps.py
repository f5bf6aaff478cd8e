"""RVC's deterministic steps checked against the numbers of the spec (§3.2-§3.10)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F

from rvc_lora.errors import AudioError, ParameterError
from rvc_lora.pipeline.steps import (
    F0_MEL_MAX,
    F0_MEL_MIN,
    HIGHPASS_A,
    HIGHPASS_B,
    PAD_FP16,
    PAD_FP32,
    PAD_LOW_MEMORY,
    Chunk,
    PadConfig,
    align_pitch,
    assemble_chunks,
    change_rms,
    chunk_output_length,
    content_frames,
    f0_to_coarse,
    find_cut_points,
    gpu_mem_gib,
    highpass,
    output_sr,
    pitch_tensors,
    plan_chunks,
    protect_features,
    reflect_pad,
    rms_envelope,
    synth_frames,
    transpose_f0,
    trim_chunk,
    upsample_features_x2,
)

PIPELINE_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "rvc-pipeline-reference"

# §3.2, butter(5, 48, "high", fs=16000), 17 significant figures
SPEC_B = [0.96996064518384473, -4.8498032259192234, 9.6996064518384468, -9.6996064518384468, 4.8498032259192234,
          -0.96996064518384473]  # fmt: skip
SPEC_A = [1.0, -4.9390018191683636, 9.757863526739543, -9.6395448494134577, 4.7615067973562093,
          -0.94082365320546057]  # fmt: skip


def test_highpass_coefficients_match_spec() -> None:
    np.testing.assert_allclose(HIGHPASS_B, SPEC_B, rtol=0, atol=1e-12)
    np.testing.assert_allclose(HIGHPASS_A, SPEC_A, rtol=0, atol=1e-12)


def test_highpass_is_zero_phase_filtfilt_in_float64() -> None:
    t = np.arange(16000) / 16000
    x = (0.3 + 0.2 * np.sin(2 * np.pi * 1000 * t) + 0.2 * np.sin(2 * np.pi * 10 * t)).astype(np.float32)
    y = highpass(x)
    assert y.dtype == np.float64 and y.shape == x.shape
    np.testing.assert_array_equal(y, scipy.signal.filtfilt(SPEC_B, SPEC_A, x, padtype="odd", padlen=18))
    mid = slice(4000, 12000)
    np.testing.assert_allclose(y[mid], 0.2 * np.sin(2 * np.pi * 1000 * t[mid]), atol=2e-3)  # 1 kHz passes, no lag


def test_highpass_rejects_too_short() -> None:
    with pytest.raises(AudioError, match="longer than 18"):
        highpass(np.ones(18))


def test_f0_mel_range() -> None:
    assert float(F0_MEL_MIN) == pytest.approx(77.75496616579426, abs=1e-12)
    assert float(F0_MEL_MAX) == pytest.approx(1064.4082331636394, abs=1e-12)


# §3.4 table: f0 Hz -> coarse id
COARSE_TABLE = [(0, 1), (10, 1), (50, 1), (51, 1), (65.4, 7), (100, 20), (110, 23), (220, 60), (261.63, 73),
                (440, 122), (880, 217), (1000, 238), (1100, 255), (2000, 255)]  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_coarse_pitch_table(dtype: type) -> None:
    f0: np.ndarray = np.array([hz for hz, _ in COARSE_TABLE], dtype=dtype)
    coarse = f0_to_coarse(f0)
    assert coarse.dtype == np.int64
    np.testing.assert_array_equal(coarse, [c for _, c in COARSE_TABLE])


def test_coarse_pitch_rounds_the_mapped_mel() -> None:
    # the spec's mapped values: 65.4 Hz -> 6.8970, 261.63 Hz -> 73.1138, 880 Hz -> 217.1781
    for hz, mapped in [(65.4, 6.8970), (261.63, 73.1138), (880.0, 217.1781)]:
        m = (1127 * np.log(1 + hz / 700) - F0_MEL_MIN) * 254 / (F0_MEL_MAX - F0_MEL_MIN) + 1
        assert m == pytest.approx(mapped, abs=5e-5)
    # the id steps where the mapped mel crosses k + 0.5: just below and above 60.5
    mel_605 = (60.5 - 1) * (F0_MEL_MAX - F0_MEL_MIN) / 254 + F0_MEL_MIN
    hz_605 = 700 * (np.exp(mel_605 / 1127) - 1)
    np.testing.assert_array_equal(f0_to_coarse(np.array([hz_605 * (1 - 1e-9), hz_605 * (1 + 1e-9)])), [60, 61])


def test_coarse_pitch_unvoiced_and_nan_are_1() -> None:
    np.testing.assert_array_equal(f0_to_coarse(np.array([0.0, -5.0, np.nan, 1e9])), [1, 1, 1, 255])


def test_transpose_f0() -> None:
    f0 = np.array([0.0, 110.0, 220.0])
    np.testing.assert_allclose(transpose_f0(f0, 12), [0.0, 220.0, 440.0], rtol=1e-15)
    np.testing.assert_allclose(transpose_f0(f0, -12), [0.0, 55.0, 110.0], rtol=1e-15)
    np.testing.assert_array_equal(transpose_f0(f0, 3), f0 * 2 ** (3 / 12))
    assert f0[1] == 110.0  # the caller's array is not modified (RVC's in-place bug)
    assert transpose_f0(f0.astype(np.float32), 5).dtype == np.float32


def test_pitch_tensors() -> None:
    f0 = np.array([0.0, 220.0, 440.0, 880.0, 1000.0])
    pitch, pitchf = pitch_tensors(f0, 4)
    assert (pitch.dtype, pitchf.dtype, tuple(pitch.shape), tuple(pitchf.shape)) == (
        torch.int64, torch.float32, (1, 4), (1, 4))  # fmt: skip
    assert pitch.tolist() == [[1, 60, 122, 217]]
    assert pitchf.tolist() == [[0.0, 220.0, 440.0, 880.0]]
    with pytest.raises(ParameterError, match="5 frames"):
        pitch_tensors(f0, 6)


# --- padding and cut points (§3.3) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pad", "expected"),
    [
        (PAD_FP16, (48000, 96000, 160000, 960000, 1040000)),
        (PAD_FP32, (16000, 32000, 96000, 608000, 656000)),
        (PAD_LOW_MEMORY, (16000, 32000, 80000, 480000, 512000)),
    ],
)
def test_pad_sizes(pad: PadConfig, expected: tuple[int, ...]) -> None:
    assert (pad.t_pad, pad.t_pad2, pad.t_query, pad.t_center, pad.t_max) == expected
    assert pad.t_pad_tgt(40000) == 40000 * pad.x_pad


def test_pad_selection() -> None:
    assert PadConfig.select(is_half=True) == PadConfig(3, 10, 60, 65)
    assert PadConfig.select(is_half=False) == PadConfig(1, 6, 38, 41)
    assert PadConfig.select(is_half=True, gpu_mem_gib=4) == PadConfig(1, 5, 30, 32)
    assert PadConfig.select(is_half=True, gpu_mem_gib=5) is PAD_FP16
    assert gpu_mem_gib(int(3.7 * 2**30)) == 4  # int(3.7 + 0.4): rounds up from .6
    assert gpu_mem_gib(int(3.5 * 2**30)) == 3
    assert gpu_mem_gib(80 * 2**30) == 80


def test_reflect_pad_does_not_repeat_the_edge() -> None:
    np.testing.assert_array_equal(reflect_pad(np.array([1.0, 2.0, 3.0, 4.0]), 2, 3), [3, 2, 1, 2, 3, 4, 3, 2, 1])


def loud_with_gaps(n: int, gaps: list[tuple[int, int]], seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).uniform(0.2, 0.5, n) * np.where(np.arange(n) % 2, 1, -1)
    for a, b in gaps:
        x[a:b] = 0.0
    return x


def test_cut_points_land_on_known_quiet_places() -> None:
    # fp32 numbers, 100 s: cuts near 38 s and 76 s, searched within +-6 s. A zero run [a, b) gives
    # S = 0 exactly for windows j in [a + 80, b - 80]: the first of them is the cut.
    pad, n = PAD_FP32, 1_600_000
    gaps = [(500_000, 505_000), (600_000, 610_000), (1_290_000, 1_295_000)]  # the first is outside [512000, 704000)
    x = loud_with_gaps(n, gaps)
    x[650_000:655_000] *= 0.01  # quiet, but not as quiet as the zero run
    assert find_cut_points(x, pad.t_center, pad.t_query, pad.t_max) == [600_080, 1_290_080]


def test_cut_points_without_gaps_pick_the_quietest_window() -> None:
    n = 5000
    x = loud_with_gaps(n, [])
    x[1230:1250] *= 0.01  # the quietest 160-sample window is centred inside this dip
    cuts = find_cut_points(x, t_center=1200, t_query=300, t_max=4000)
    ap = np.abs(np.pad(x, 80, mode="reflect"))
    s = np.array([ap[j : j + 160].sum() for j in range(n)])  # the spec's S, written directly
    expected = [t - 300 + int(np.argmin(s[t - 300 : t + 300])) for t in range(1200, n, 1200)]
    assert cuts == expected
    assert 1230 - 80 <= cuts[0] <= 1250 + 80


def test_cut_points_first_minimum_and_truncated_window() -> None:
    n = 2500  # windows [400, 1600) and [1400, 2600) -> [1400, 2500)
    x = loud_with_gaps(n, [(700, 1000), (2400, 2500)])  # S = 0 on j in [780, 920]: first index wins
    assert find_cut_points(x, t_center=1000, t_query=600, t_max=2000) == [780, 2480]


def test_no_cut_points_up_to_t_max() -> None:
    x = loud_with_gaps(1840, [])
    assert find_cut_points(x, t_center=500, t_query=100, t_max=2000) == []  # N + 160 == t_max
    assert len(find_cut_points(loud_with_gaps(1841, []), t_center=500, t_query=100, t_max=2000)) == 3


def test_plan_chunks_single() -> None:
    assert plan_chunks([], 88655, 16000) == [Chunk(0, 88655, 0, 554)]


def test_plan_chunks_overlap_one_frame() -> None:
    t_pad, n_padded = 16000, 1_632_000
    chunks = plan_chunks([600_085, 1_289_759], n_padded, t_pad)  # floored to 600_000 and 1_289_600
    assert chunks == [
        Chunk(0, 600_000 + 32_000 + 160, 0, (600_000 + 32_000) // 160),
        Chunk(600_000, 1_289_600 + 32_000 + 160, 3750, (1_289_600 + 32_000) // 160),
        Chunk(1_289_600, n_padded, 8060, n_padded // 160),
    ]
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.stop - b.start == 2 * t_pad + 160  # the next chunk's context plus one frame


@pytest.mark.parametrize("cut", [150_000, 150_079, 150_159, 150_237, 150_399])
def test_chunk_pitch_slice_covers_synth_frames(cut: int) -> None:
    # RVC relies on every chunk's f0 slice being at least as long as its synthesized frames
    for chunk in plan_chunks([cut], 400_017, PAD_FP16.t_pad):
        length = chunk.stop - chunk.start
        assert chunk.frame_stop - chunk.frame_start >= synth_frames(length) > 0


def test_frame_arithmetic() -> None:
    assert content_frames(400) == 1 and content_frames(719) == 1 and content_frames(720) == 2
    assert synth_frames(88655) == 552  # 2 * 276 < 554
    assert synth_frames(88640 + 80) == 554  # L // 160 == 2F when L mod 320 is in [80, 160)
    assert chunk_output_length(88655, 40000, 40000) == 552 * 400 - 80000


@pytest.mark.skipif(not (PIPELINE_REFERENCE / "cases.json").exists(), reason="shared reference fixtures absent")
def test_reference_output_lengths() -> None:
    import soundfile as sf

    cases = json.loads((PIPELINE_REFERENCE / "cases.json").read_text())["cases"]
    n = sf.info(PIPELINE_REFERENCE / "speech.wav").frames  # 16 kHz mono: no resampling on load
    for case in cases:
        chunks = plan_chunks([], n + 2 * PAD_FP32.t_pad, PAD_FP32.t_pad)
        at_model_sr = sum(chunk_output_length(c.stop - c.start, 40000, 40000) for c in chunks)
        sr = output_sr(40000, case["resample_sr"])
        assert (sr, -(-at_model_sr * sr // 40000)) == (case["sr"], case["length"]), case["name"]


# --- features, protect (§3.7) ------------------------------------------------------------------------


def test_upsample_features_x2_is_rvc_nearest_interpolate() -> None:
    feats = torch.randn(1, 7, 5)
    up = upsample_features_x2(feats)
    rvc = F.interpolate(feats.permute(0, 2, 1), scale_factor=2).permute(0, 2, 1)
    assert up.shape == (1, 14, 5)
    assert torch.equal(up, rvc)
    assert up.stride() == rvc.stride() == (70, 1, 14)  # RVC's permuted view: its layout decides the synth's rounding
    assert torch.equal(up[:, 0::2], feats) and torch.equal(up[:, 1::2], feats)


def test_align_pitch_cuts_to_feature_frames() -> None:
    feats = torch.zeros(1, 552, 4)
    pitch, pitchf = torch.arange(554)[None], torch.arange(554, dtype=torch.float32)[None]
    f, p, pf = align_pitch(feats, pitch, pitchf, chunk_len=88655)
    assert (f.shape[1], p.shape[1], pf.shape[1]) == (552, 552, 552)
    assert p[0, -1].item() == 551
    _, p, _ = align_pitch(torch.zeros(1, 600, 4), pitch, pitchf, chunk_len=88655)  # L // 160 = 554 is the cap
    assert p.shape[1] == 554
    with pytest.raises(ParameterError, match="554 f0 frames"):
        align_pitch(torch.zeros(1, 600, 4), pitch, pitchf, chunk_len=96000)


def test_protect_blend() -> None:
    feats, feats0 = torch.ones(1, 5, 3), torch.zeros(1, 5, 3)
    pitchf = torch.tensor([[0.0, 0.5, 1.0, 200.0, -3.0]])
    out = protect_features(feats, feats0, pitchf, 0.33)
    expected_w = torch.tensor([0.33, 0.33, 1.0, 1.0, 0.33])
    torch.testing.assert_close(out, expected_w[None, :, None].expand(1, 5, 3), rtol=0, atol=1e-7)
    feats0 = torch.full((1, 5, 3), 2.0)
    out = protect_features(feats, feats0, pitchf, 0.1)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([1.9, 1.9, 1.0, 1.0, 1.9]))  # 1*w + 2*(1-w)


def test_protect_off_and_dtype() -> None:
    feats = torch.randn(1, 4, 2)
    assert protect_features(feats, torch.zeros(1, 4, 2), torch.zeros(1, 4), 0.5) is feats
    half = protect_features(feats.half(), torch.zeros(1, 4, 2).half(), torch.zeros(1, 4), 0.2)
    assert half.dtype == torch.float16  # cast back to feats0's dtype, as RVC


# --- rms mix, trim, output (§3.8-§3.10) --------------------------------------------------------------


def test_rms_envelope_frames() -> None:
    c = 0.4
    env = rms_envelope(np.full(16000 * 3, c), 16000)  # frames of 16000 every 8000, centred, zero-padded
    assert env.dtype == np.float32 and len(env) == 1 + 48000 // 8000
    np.testing.assert_allclose(env, [c * 0.5**0.5, c, c, c, c, c, c * 0.5**0.5], rtol=1e-6)
    ramp = np.arange(40000, dtype=np.float32) / 40000
    direct = [np.sqrt(np.mean(np.square(np.pad(ramp, 20000)[k * 20000 : k * 20000 + 40000]))) for k in range(3)]
    np.testing.assert_allclose(rms_envelope(ramp, 40000), direct, rtol=1e-6)


def test_change_rms_on_constant_envelopes() -> None:
    src = np.full(16000 * 4, 0.5)  # envelope 0.5 (inside the first and last half second: less)
    out = np.full(40000 * 4, 0.1, dtype=np.float32)
    for rate in (0.0, 0.25, 0.75):
        mixed = change_rms(src, 16000, out, 40000, rate)
        mid = mixed[40000:120000]  # only full frames are interpolated here
        np.testing.assert_allclose(mid, 0.1 * (0.5 / 0.1) ** (1 - rate), rtol=1e-5)
        assert mixed.dtype == np.float32
    assert change_rms(src, 16000, out, 40000, 1.0) is out  # RVC skips the step


def test_change_rms_follows_the_input_envelope() -> None:
    src = np.concatenate([np.full(32000, 0.5), np.full(32000, 0.05)])  # loud then quiet, 2 s + 2 s
    out = np.full(160000, 0.2, dtype=np.float32)
    mixed = change_rms(src, 16000, out, 40000, 0.0)
    assert mixed[30000] == pytest.approx(0.5, rel=1e-5) and mixed[130000] == pytest.approx(0.05, rel=1e-5)


def test_change_rms_silent_output_stays_finite() -> None:
    mixed = change_rms(np.full(32000, 0.3), 16000, np.zeros(80000, np.float32), 40000, 0.25)
    assert np.all(mixed == 0)
    with pytest.raises(ParameterError):
        change_rms(np.ones(100), 16000, np.ones(100, np.float32), 40000, 1.5)


def test_trim_and_assemble_chunks() -> None:
    np.testing.assert_array_equal(trim_chunk(np.arange(10.0), 2), [2, 3, 4, 5, 6, 7])
    out = assemble_chunks([trim_chunk(np.arange(10.0), 2), trim_chunk(np.arange(10.0, 20.0), 3)])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [2, 3, 4, 5, 6, 7, 13, 14, 15, 16])
    assert assemble_chunks([]).shape == (0,)
    with pytest.raises(ParameterError):
        trim_chunk(np.arange(10.0), 0)


@pytest.mark.parametrize(("tgt", "requested", "expected"), [
    (40000, 0, 40000), (40000, 32000, 32000), (40000, 8000, 40000), (40000, 40000, 40000), (32000, 16000, 16000),
])  # fmt: skip
def test_output_sr(tgt: int, requested: int, expected: int) -> None:
    assert output_sr(tgt, requested) == expected
