"""Pitch extractors: the registry, RVC's frame grid, each method on a 220 Hz tone, RMVPE's layout and
decode, FCPE's loading without torchaudio, caller-given curves.

RMVPE's real weights are not available here, so its network is tested with random weights saved in
`rmvpe.pt`'s key layout (strict load, shapes) and its decode on constructed salience maps; a random
network cannot find 220 Hz, so the tone test covers pm, harvest and fcpe.
"""

from __future__ import annotations

import collections
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import torch

from rvc_lora.errors import CheckpointError, ModelUnavailableError, ParameterError
from rvc_lora.pipeline.f0 import (
    F0_METHODS,
    available_f0_methods,
    clear_f0_cache,
    default_f0_method,
    f0_curve_from_table,
    f0_method_problem,
    get_f0_extractor,
    overlay_f0,
    read_f0_file,
)
from rvc_lora.pipeline.f0 import fcpe as fcpe_mod
from rvc_lora.pipeline.f0.fcpe import FCPEPitch, decode_latent
from rvc_lora.pipeline.f0.mel import mel_filterbank
from rvc_lora.pipeline.f0.pm import praat_pad
from rvc_lora.pipeline.f0.rmvpe import CENTS_BASE, RMVPEPitch, decode_salience
from rvc_lora.pipeline.f0.rmvpe_net import RMVPENet

SR = 16000
T_PAD = SR  # x_pad = 1 (fp32): one second of reflect padding each side, as RVC pads
HAS_FCPE = importlib.util.find_spec("torchfcpe") is not None
HAS_CREPE = importlib.util.find_spec("torchcrepe") is not None
needs_fcpe = pytest.mark.skipif(not HAS_FCPE, reason="torchfcpe not installed (pip install --no-deps torchfcpe==0.0.4)")
AVAILABLE = ["pm", "harvest", pytest.param("fcpe", marks=needs_fcpe)]


@pytest.fixture(scope="module", autouse=True)
def fresh_extractor_cache() -> Iterator[None]:
    """Models cached here (a 360 MB random RMVPE among them) are not left to other test files."""
    clear_f0_cache()
    yield
    clear_f0_cache()


def padded(x: np.ndarray) -> tuple[np.ndarray, int]:
    """RVC's f0 input: reflect-padded by t_pad, and its `p_len`."""
    audio_pad = np.pad(x, T_PAD, mode="reflect")
    return audio_pad, len(audio_pad) // 160


def tone_220(noise: float = 1e-3, seed: int = 0) -> np.ndarray:
    """1 s of 220 Hz that reflect-pads seamlessly: a cosine with peaks at both ends (16000 * 220 / 16000
    whole periods). A -54 dB noise floor, as any recording has: Harvest calls a digitally pure sine
    unvoiced."""
    n = np.arange(SR + 1)
    return 0.5 * np.cos(2 * np.pi * 220 * n / SR) + noise * np.random.default_rng(seed).standard_normal(n.size)


def get_rmvpe(path: Path, device: str = "cpu", is_half: bool = False) -> RMVPEPitch:
    extractor = get_f0_extractor("rmvpe", rmvpe_path=path, device=device, is_half=is_half)
    assert isinstance(extractor, RMVPEPitch)
    return extractor


def get_fcpe() -> FCPEPitch:
    extractor = get_f0_extractor("fcpe")
    assert isinstance(extractor, FCPEPitch)
    return extractor


def hz(cents: float) -> float:
    return float(10 * 2 ** (cents / 1200))


# --- registry -------------------------------------------------------------------------------------


def test_methods_are_rvcs_names() -> None:
    assert F0_METHODS == ("pm", "harvest", "rmvpe", "fcpe", "crepe", "crepe-tiny")


@pytest.mark.parametrize("name", ["crepe_tiny", "PM", "", "rmvpe "])
def test_unknown_method_lists_valid_names(name: str) -> None:
    with pytest.raises(ParameterError, match="pm, harvest, rmvpe, fcpe, crepe, crepe-tiny") as info:
        get_f0_extractor(name)
    assert repr(name) in str(info.value)


@pytest.mark.parametrize(
    ("rmvpe", "installed", "expected"),
    [("rmvpe.pt", {"torchfcpe"}, "rmvpe"), ("rmvpe.pt", set(), "rmvpe"),
     (None, {"torchfcpe", "torchcrepe"}, "fcpe" if HAS_FCPE else "pm"), (None, {"torchcrepe"}, "pm"),
     (None, set(), "pm")],
)
def test_default_method_is_rmvpe_then_fcpe_then_pm(monkeypatch: pytest.MonkeyPatch, rmvpe: str | None,
                                                   installed: set[str], expected: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: real(name) if name in installed or name not in ("torchfcpe", "torchcrepe")
                        else None)
    assert default_f0_method(rmvpe) == expected
    available = available_f0_methods(rmvpe)
    assert ("rmvpe" in available) == (rmvpe is not None)
    assert ("crepe" in available) == ("crepe-tiny" in available) == ("torchcrepe" in installed and HAS_CREPE)
    if rmvpe is None:
        assert "--rmvpe" in str(f0_method_problem("rmvpe", None))
    if "torchcrepe" not in installed:
        assert "pip install --no-deps torchcrepe" in str(f0_method_problem("crepe-tiny", rmvpe))


@pytest.mark.parametrize("name", ["pm", "harvest"])
def test_extractor_is_built_once(name: str) -> None:
    first = get_f0_extractor(name)
    assert get_f0_extractor(name, device="cuda", is_half=True) is first  # CPU methods ignore device
    assert first.name == name


@pytest.mark.parametrize(
    "audio",
    [np.zeros((2, 1600)), np.zeros(1600, dtype=np.int16), np.r_[np.zeros(1600), np.nan]],
    ids=["2-d", "int", "nan"],
)
def test_bad_audio_is_a_parameter_error(audio: np.ndarray) -> None:
    with pytest.raises(ParameterError, match="f0 input"):
        get_f0_extractor("pm")(audio, 10)


# --- every available method on RVC's grid ------------------------------------------------------------


@pytest.mark.parametrize("name", AVAILABLE)
def test_220hz_tone(name: str) -> None:
    audio_pad, p_len = padded(tone_220())
    f0 = get_f0_extractor(name)(audio_pad, p_len)
    assert f0.shape == (p_len,)
    heard = f0[T_PAD // 160 : T_PAD // 160 + SR // 160 + 1]  # the frames of the input itself
    assert (heard > 0).all()
    np.testing.assert_allclose(heard, 220.0, rtol=0.01)


@pytest.mark.parametrize("name", AVAILABLE)
@pytest.mark.parametrize("surplus", [0, -7, 5])
def test_curve_has_p_len_frames(name: str, surplus: int) -> None:
    """RVC cuts every method's curve to `p_len`; a longer `p_len` gets unvoiced frames at the end."""
    audio = np.random.default_rng(1).standard_normal(8000) * 0.1
    p_len = len(audio) // 160 + surplus
    f0 = get_f0_extractor(name)(audio, p_len)
    assert f0.shape == (p_len,)
    assert np.isfinite(f0).all() and (f0 >= 0).all()
    if surplus > 0:
        assert (f0[-surplus + 1 :] == 0).all()  # frame N // 160 is real, the ones after it are padding


@pytest.mark.parametrize("name", AVAILABLE)
def test_silence_is_unvoiced(name: str) -> None:
    f0 = get_f0_extractor(name)(np.zeros(8000), 50)
    assert (f0 == 0).all()


@pytest.mark.parametrize(
    ("n_frames", "p_len", "expected"), [(95, 100, (3, 2)), (96, 100, (2, 2)), (100, 100, (0, 0)), (103, 100, (0, 0))]
)
def test_praat_curve_is_centred_like_rvc(n_frames: int, p_len: int, expected: tuple[int, int]) -> None:
    assert praat_pad(n_frames, p_len) == expected


def test_harvest_filter_radius_switches_a_3_tap_median() -> None:
    t = np.arange(SR) / SR
    vibrato = 0.5 * np.sin(2 * np.pi * np.cumsum(220 + 30 * np.sin(2 * np.pi * 5 * t)) / SR)
    audio = vibrato + 1e-3 * np.random.default_rng(2).standard_normal(SR)
    harvest = get_f0_extractor("harvest")
    raw = harvest(audio, 101, filter_radius=2)  # all of harvest's N // 160 + 1 frames
    filtered = harvest(audio, 101, filter_radius=3)
    assert not np.array_equal(raw, filtered)
    np.testing.assert_array_equal(filtered, scipy.signal.medfilt(raw, 3))
    np.testing.assert_array_equal(harvest(audio, 101, filter_radius=7), filtered)  # a switch, not a radius


@pytest.mark.parametrize("name", AVAILABLE)
def test_extraction_leaves_torch_global_rng_alone(name: str) -> None:
    """The synthesizer's noise comes from torch's global generator: neither building an extractor
    (lazily, maybe mid-conversion) nor running it may draw from it."""
    clear_f0_cache()
    state = torch.get_rng_state()
    get_f0_extractor(name)(np.random.default_rng(3).standard_normal(4000) * 0.1, 25)
    assert torch.equal(torch.get_rng_state(), state)


# --- mel filterbanks (values from librosa.filters.mel) -------------------------------------------------


@pytest.mark.parametrize(
    ("htk", "fmin", "row", "col", "value"),
    [
        (True, 30, 0, 3, 0.056785039603710175),
        (True, 30, 10, 14, 0.0016538305208086967),
        (True, 30, 64, 118, 0.02016606368124485),
        (True, 30, 127, 502, 0.00575740821659565),
        (False, 0, 0, 1, 0.028577780351042747),
        (False, 0, 10, 17, 0.027376357465982437),
        (False, 0, 64, 109, 0.020523004233837128),
        (False, 0, 127, 501, 0.004787922836840153),
    ],
)
def test_mel_filterbank_matches_librosa(htk: bool, fmin: float, row: int, col: int, value: float) -> None:
    basis = mel_filterbank(sr=SR, n_fft=1024, n_mels=128, fmin=fmin, fmax=8000, htk=htk)
    assert basis.shape == (128, 513) and basis.dtype == np.float32
    assert basis[row, col] == np.float32(value)


# --- rmvpe ---------------------------------------------------------------------------------------------


def test_rmvpe_layout_is_rmvpe_pts() -> None:
    with torch.device("meta"):
        state = RMVPENet().state_dict()
    assert len(state) == 741
    assert sum(k.endswith("num_batches_tracked") for k in state) == 118
    assert (
        sum(v.numel() for k, v in state.items() if not k.split(".")[-1].startswith(("running_", "num_"))) == 90_423_165
    )
    shapes = {
        "unet.encoder.bn.running_var": (1,),
        "unet.encoder.layers.0.conv.0.conv.0.weight": (16, 1, 3, 3),
        "unet.encoder.layers.0.conv.0.shortcut.weight": (16, 1, 1, 1),
        "unet.encoder.layers.4.conv.3.conv.4.bias": (256,),
        "unet.intermediate.layers.0.conv.0.shortcut.weight": (512, 256, 1, 1),
        "unet.intermediate.layers.3.conv.3.conv.3.weight": (512, 512, 3, 3),
        "unet.decoder.layers.0.conv1.0.weight": (512, 256, 3, 3),
        "unet.decoder.layers.0.conv2.0.conv.0.weight": (256, 512, 3, 3),
        "unet.decoder.layers.4.conv2.0.shortcut.weight": (16, 32, 1, 1),
        "cnn.weight": (3, 16, 3, 3),
        "fc.0.gru.weight_ih_l0": (768, 384),
        "fc.0.gru.weight_hh_l0_reverse": (768, 256),
        "fc.1.weight": (360, 512),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert "unet.intermediate.layers.1.conv.0.shortcut.weight" not in state  # 512 -> 512: identity


@pytest.mark.parametrize(
    ("peaks", "expected_hz"),
    [
        ({100: 1.0}, hz(CENTS_BASE + 2000)),  # one bin: its own pitch
        ({167: 0.5, 168: 0.5}, hz(CENTS_BASE + 20 * 167.5)),  # halfway between two bins
        ({167: 0.75, 168: 0.25}, hz(CENTS_BASE + 20 * 167.25)),
        ({0: 0.75, 1: 0.25}, hz(CENTS_BASE + 20 * 0.25)),  # bins below 0 count as zero salience
        ({359: 0.9}, hz(CENTS_BASE + 20 * 359)),
        ({200: 0.8, 210: 0.7}, hz(CENTS_BASE + 20 * 200)),  # bins 5+ away from the peak are ignored
        ({50: 0.03}, 0.0),  # peak at the threshold: unvoiced
        ({}, 0.0),  # all zero: 0/0 in RVC, unvoiced here
    ],
)
def test_rmvpe_decode(peaks: dict[int, float], expected_hz: float) -> None:
    salience = np.zeros((1, 360), dtype=np.float32)
    for bin_, value in peaks.items():
        salience[0, bin_] = value
    f0 = decode_salience(salience)
    assert f0.dtype == np.float64
    np.testing.assert_allclose(f0, [expected_hz], rtol=1e-12)


def test_rmvpe_decode_220hz() -> None:
    """A salience split between the two bins around 220 Hz decodes to 220 Hz."""
    cents = 1200 * np.log2(22.0)
    pos = (cents - CENTS_BASE) / 20
    lo = int(pos)
    salience = np.zeros((3, 360), dtype=np.float32)
    salience[:, lo], salience[:, lo + 1] = 1 - (pos - lo), pos - lo
    np.testing.assert_allclose(decode_salience(salience), 220.0, rtol=1e-6)


@pytest.fixture(scope="module")
def rmvpe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights in `rmvpe.pt`'s layout, stored in fp16 like the distributed file."""
    torch.manual_seed(0)
    net = RMVPENet()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so loading them is visible
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("rmvpe") / "rmvpe.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}, path)
    return path


def test_rmvpe_loads_strictly_and_decodes_its_salience(rmvpe_file: Path) -> None:
    extractor = get_rmvpe(rmvpe_file)
    assert get_f0_extractor("rmvpe", rmvpe_path=str(rmvpe_file)) is extractor
    saved = torch.load(rmvpe_file, weights_only=True)
    loaded = extractor.net.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k].to(loaded[k].dtype)) for k in saved)

    audio = np.random.default_rng(4).standard_normal(4321) * 0.1
    salience = extractor.salience(audio)
    assert salience.shape == (4321 // 160 + 1, 360) and salience.dtype == np.float32
    assert ((salience > 0) & (salience < 1)).all()
    f0 = extractor(audio, 4321 // 160)
    np.testing.assert_array_equal(f0, decode_salience(salience)[:-1])


def test_rmvpe_network_sees_mel_zero_padded_to_32_frames(rmvpe_file: Path) -> None:
    extractor = get_rmvpe(rmvpe_file)
    seen: list[torch.Tensor] = []
    hook = extractor.net.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        extractor(np.random.default_rng(5).standard_normal(160 * 40) * 0.1, 40)  # 41 frames -> 64
    finally:
        hook.remove()
    (mel,) = seen
    assert mel.shape == (1, 128, 64) and mel.dtype == torch.float32
    assert (mel[..., 41:] == 0).all() and (mel[..., :41] != 0).any()


def test_rmvpe_log_mel_floor_and_frames(rmvpe_file: Path) -> None:
    mel = get_rmvpe(rmvpe_file).log_mel(np.zeros(1600))
    assert mel.shape == (1, 128, 11)
    torch.testing.assert_close(mel, torch.full_like(mel, float(np.log(np.float32(1e-5)))))


def test_rmvpe_leaves_torch_global_rng_alone(rmvpe_file: Path) -> None:
    clear_f0_cache()
    state = torch.get_rng_state()
    get_rmvpe(rmvpe_file)(np.random.default_rng(3).standard_normal(4000) * 0.1, 25)
    assert torch.equal(torch.get_rng_state(), state)  # last of the tests that load the file: it drops the cache


def test_rmvpe_without_a_path_says_which_setting() -> None:
    with pytest.raises(ModelUnavailableError) as info:
        get_f0_extractor("rmvpe")
    message = str(info.value)
    assert "--rmvpe" in message and "RVC_LORA_RMVPE" in message and "rvc-lora models fetch" in message
    assert "rmvpe_path" not in message  # the Python argument means nothing to a CLI or HTTP user


def test_rmvpe_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="nowhere.pt"):
        get_f0_extractor("rmvpe", rmvpe_path=tmp_path / "nowhere.pt")


@pytest.mark.parametrize("content", ["bad_keys", "not_torch", "not_a_dict"])
def test_rmvpe_wrong_file_is_a_checkpoint_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "rmvpe.pt"
    if content == "bad_keys":
        torch.save({"cnn.weight": torch.zeros(3, 16, 3, 3), "extra": torch.zeros(1)}, path)
    elif content == "not_torch":
        path.write_bytes(b"not a torch file")
    else:
        torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="rmvpe.pt"):
        get_f0_extractor("rmvpe", rmvpe_path=path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rmvpe_half_on_cuda_tracks_fp32(rmvpe_file: Path) -> None:
    audio = np.random.default_rng(6).standard_normal(8000) * 0.1
    full = get_rmvpe(rmvpe_file, device="cuda").salience(audio)
    half = get_rmvpe(rmvpe_file, device="cuda", is_half=True).salience(audio)
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, atol=2e-2)


# --- fcpe ------------------------------------------------------------------------------------------------


def test_fcpe_without_torchfcpe_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelUnavailableError, match=r"pip install --no-deps torchfcpe==0\.0\.4"):
        fcpe_mod.FCPEPitch.from_bundled()


@pytest.mark.parametrize(
    ("peaks", "expected_cents"),
    [
        ({100: 1.0}, 100.0),
        ({100: 0.5, 101: 0.5}, 100.5),
        ({0: 0.5, 1: 0.25}, (5 * 0.5 * 0 + 0.25 * 1) / (5 * 0.5 + 0.25)),  # index 0 repeats 5 times (clamped)
        ({359: 0.6, 358: 0.3}, (0.3 * 358 + 5 * 0.6 * 359) / (0.3 + 5 * 0.6)),
        ({200: 0.006}, None),  # at the threshold: unvoiced
        ({}, None),
    ],
)
def test_fcpe_decode(peaks: dict[int, float], expected_cents: float | None) -> None:
    cent_table = torch.arange(360, dtype=torch.float32) * 20 + 1000  # any increasing table
    latent = torch.zeros(1, 1, 360)
    for bin_, value in peaks.items():
        latent[0, 0, bin_] = value
    f0 = decode_latent(latent, cent_table)
    assert f0.shape == (1, 1)
    expected = 0.0 if expected_cents is None else hz(1000 + 20 * expected_cents)
    assert f0.item() == pytest.approx(expected, rel=1e-6)


@needs_fcpe
def test_fcpe_runs_without_importing_torchfcpe_or_torchaudio() -> None:
    extractor = get_f0_extractor("fcpe")
    extractor(np.zeros(3200), 20)
    assert "torchfcpe" not in sys.modules and "torchaudio" not in sys.modules


@needs_fcpe
def test_fcpe_mel_repeats_the_last_frame() -> None:
    mel = get_fcpe().log_mel(tone_220()[:16000])
    assert mel.shape == (1, 101, 128)  # the STFT gives N // 160 = 100 frames, RVC asks for 101
    assert torch.equal(mel[:, -1], mel[:, -2])


def test_fcpe_rejects_another_model_config(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"model": {}, "config_dict": {"mel": {"sr": 44100}, "model": {}}}, path)
    with pytest.raises(CheckpointError, match="FCPE config mel"):
        fcpe_mod.FCPEPitch.from_file(path)


# --- RVC's f0 file (§3.4) ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "expected"),
    [(0, [100.0, 0.0, 110.0, 4, 5, 6]), (2, [1, 2, 100, 0, 110, 6]), (4, [1, 2, 3, 4, 100, 0])],
)
def test_f0_file_curve_overwrites_from_the_offset(offset: int, expected: list[float]) -> None:
    # frames before the offset and after the curve keep the extracted f0; the curve is cut at the end
    f0 = np.arange(1.0, 7.0)
    np.testing.assert_array_equal(overlay_f0(f0, [100.0, 0.0, 110.0], offset), expected)
    np.testing.assert_array_equal(f0, np.arange(1.0, 7.0))  # a copy: the extracted curve is left alone
    assert overlay_f0(f0.astype(np.float32), [100.1], 0).dtype == np.float32  # written into f0's dtype


@pytest.mark.parametrize("curve", [[[100.0]], [100.0, -1.0], [np.inf]])
def test_f0_file_curve_rejects_bad_values(curve: list[float]) -> None:
    with pytest.raises(ParameterError, match="f0 curve"):
        overlay_f0(np.zeros(4), curve, 0)


def test_f0_file_is_interpolated_from_frame_0_over_its_time_span(tmp_path: Path) -> None:
    # RVC: delta_t = round((t_max - t_min) * 100 + 1) frames 0, 1, ..., np.interp at times * 100, so a table
    # starting at 0.02 s is held at its first value up to frame 2 and stops at frame 3 (not at 0.05 s)
    path = tmp_path / "f0.txt"
    path.write_text("0.02,200\n0.04,300\n\n0.05,0\n")
    np.testing.assert_allclose(read_f0_file(path), [200, 200, 200, 250], rtol=1e-6)
    np.testing.assert_allclose(f0_curve_from_table([[0.0, 100.0], [0.01, 200.0]]), [100, 200], rtol=1e-6)
    np.testing.assert_array_equal(f0_curve_from_table([[0.5, 150.0], [1.0, 300.0]]), [150.0] * 51)


def test_f0_file_is_parsed_to_float32() -> None:
    # 220.1 is held as float32 (220.1000061...); 0.135 s * 100 + 1 is 14.500001 in float32 -> 15 frames
    # (14.5 in float64 would round to 14)
    curve = f0_curve_from_table([[0.0, 220.1], [0.135, 220.1]])
    assert len(curve) == 15 and curve[0] == float(np.float32(220.1)) != 220.1


@pytest.mark.parametrize("text", ["0.1;200\n", "0.1,200,3\n", "0.2,200\n0.1,100\n", "abc\n", "\n"])
def test_bad_f0_file_is_a_parameter_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "f0.txt"
    path.write_text(text)
    with pytest.raises(ParameterError, match="f0"):
        read_f0_file(path)


# --- rmvpe against the spec's numbers (§3.4.1) -------------------------------------------------------------


@pytest.mark.parametrize(("bin_", "expected_hz"), [(0, 31.7), (359, 2005.5)])
def test_rmvpe_decode_range(bin_: int, expected_hz: float) -> None:
    """cents = 20 k + 1997.3794084376191 (re 10 Hz): bin 0 is 31.7 Hz, bin 359 is 2005.5 Hz."""
    salience = np.zeros((1, 360), dtype=np.float32)
    salience[0, bin_] = 0.5
    assert round(float(decode_salience(salience)[0]), 1) == expected_hz
    salience[0, bin_] = 0.0300001  # just above the 0.03 threshold: still voiced
    assert decode_salience(salience)[0] > 0


def test_rmvpe_log_mel_is_rvcs_front_end(rmvpe_file: Path) -> None:
    """Independent numpy STFT: reflect-pad 512 each side, periodic Hann(1024), a frame every 160 samples,
    |rfft|, HTK mel basis 30-8000 Hz, log(clamp(., 1e-5)); N // 160 + 1 frames."""
    audio = np.random.default_rng(7).standard_normal(5000) * 0.1
    x = np.pad(audio.astype(np.float32).astype(np.float64), 512, mode="reflect")
    n_frames = 5000 // 160 + 1
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(1024) / 1024)
    frames = np.stack([x[160 * j : 160 * j + 1024] * window for j in range(n_frames)], axis=1)  # [1024, T]
    magnitude = np.abs(np.fft.rfft(frames, axis=0))  # [513, T]
    basis = mel_filterbank(sr=SR, n_fft=1024, n_mels=128, fmin=30, fmax=8000, htk=True).astype(np.float64)
    expected = np.log(np.maximum(basis @ magnitude, 1e-5))
    mel = get_rmvpe(rmvpe_file).log_mel(audio)
    assert mel.shape == (1, 128, n_frames) and mel.dtype == torch.float32
    np.testing.assert_allclose(mel[0].numpy(), expected, atol=2e-4)


def test_rmvpe_half_casts_the_mel_before_the_log(rmvpe_file: Path) -> None:
    """is_half: the mel is cast to fp16 before clamp and log (the STFT and basis stay fp32); the net is fp16."""
    audio = np.random.default_rng(8).standard_normal(3000) * 0.1
    full = RMVPEPitch.from_file(rmvpe_file)
    half = RMVPEPitch.from_file(rmvpe_file, is_half=True)
    assert next(half.net.parameters()).dtype == torch.float16 and half.mel_basis.dtype == torch.float32
    mel = half.log_mel(audio)
    assert mel.dtype == torch.float16
    linear = torch.exp(full.log_mel(audio).double()).float()  # the fp32 mel, back from its log
    expected = torch.log(torch.clamp(linear.half(), min=1e-5))
    torch.testing.assert_close(mel, expected, atol=2e-3, rtol=0)


def test_rmvpe_reads_a_legacy_format_ordered_dict(rmvpe_file: Path, tmp_path: Path) -> None:
    state = collections.OrderedDict(torch.load(rmvpe_file, weights_only=True))
    path = tmp_path / "rmvpe.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    audio = np.random.default_rng(9).standard_normal(3200) * 0.1
    np.testing.assert_array_equal(RMVPEPitch.from_file(path)(audio, 20), RMVPEPitch.from_file(rmvpe_file)(audio, 20))
