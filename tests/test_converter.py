"""VoiceConverter end to end: RVC pipeline parity on real speech, every model kind, cut points, adapters."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rvc_lora import AudioError, ParameterError, SynthesizerLoRA, load_synthesizer_with_lora
from rvc_lora.demo import speech_like
from rvc_lora.pipeline.audio import decode_audio
from rvc_lora.pipeline.content import ContentEncoder, build_random_hubert
from rvc_lora.pipeline.converter import ConvertParams, VoiceConverter
from rvc_lora.pipeline.f0 import default_f0_method
from rvc_lora.pipeline.index import build_index
from rvc_lora.pipeline.steps import PadConfig
from tests.conftest import LORA, PIPELINE_REFERENCE, TINY_HUBERT, tiny_model

HAS_FCPE = importlib.util.find_spec("torchfcpe") is not None


@pytest.fixture(scope="module")
def hubert() -> ContentEncoder:
    return build_random_hubert(TINY_HUBERT, seed=3)


def converter(hubert: ContentEncoder, version: str = "v2", f0: bool = True, seed: int = 0,
              pad: PadConfig | None = None) -> VoiceConverter:
    model = SynthesizerLoRA(tiny_model(version, f0, seed=seed), LORA)
    return VoiceConverter(model, hubert, device="cpu", pad=pad)


def test_matches_the_original_rvc_pipeline_on_real_speech() -> None:
    if not (PIPELINE_REFERENCE / "cases.json").is_file():
        pytest.skip(f"RVC pipeline reference not found at {PIPELINE_REFERENCE}")
    cases = json.loads((PIPELINE_REFERENCE / "cases.json").read_text())
    expected = np.load(PIPELINE_REFERENCE / "expected.npz")
    content = build_random_hubert(None, seed=cases["hubert_seed"])  # = make_hubert.py's model, built in memory
    vc = VoiceConverter(load_synthesizer_with_lora(PIPELINE_REFERENCE / cases["model"], LORA), content)
    audio, sr = decode_audio(PIPELINE_REFERENCE / "speech.wav")
    for case in cases["cases"]:
        params = ConvertParams(**{k: case[k] for k in ("sid", "f0_up_key", "f0_method", "index_rate", "filter_radius",
                                                       "rms_mix_rate", "protect", "resample_sr")}, seed=case["seed"])
        index = PIPELINE_REFERENCE / case["file_index"] if case["file_index"] else None
        result = vc.convert(audio, sr, params, index=index)
        got, want = result.int16().astype(np.int32), expected[case["name"]].astype(np.int32)
        assert (result.sr, len(got)) == (case["sr"], case["length"])
        assert np.abs(got - want).max() <= cases["tolerance_int16"], case["name"]


@pytest.mark.parametrize(("version", "f0", "use_index"), [("v2", True, True), ("v2", False, False),
                                                          ("v1", True, False), ("v1", False, True)])
def test_every_model_kind_converts_with_the_right_length(tmp_path: Path, hubert: ContentEncoder, version: str,
                                                         f0: bool, use_index: bool) -> None:
    vc = converter(hubert, version, f0)
    audio = speech_like(2.0, 16000, seed=1)
    index = None
    if use_index:
        feats = hubert.extract(torch.from_numpy(audio).double(), version)[0].numpy()  # type: ignore[arg-type]
        index = build_index(np.concatenate([feats] * 4) + 0.01, tmp_path / "voice.index")
    params = ConvertParams(f0_method="pm", index_rate=0.5 if use_index else 0.0, seed=7)
    result = vc.convert(audio, 16000, params, index=index)
    assert result.sr == 40000 and result.audio.dtype == np.float32 and np.isfinite(result.audio).all()
    assert abs(len(result.audio) - 2.0 * 40000) <= 2 * 400 * 2  # RVC's chunk arithmetic: within 2 frames
    again = vc.convert(audio, 16000, params, index=index)
    np.testing.assert_array_equal(again.audio, result.audio)  # deterministic with a seed
    assert result.timings["synth"] > 0 and set(result.timings) >= {"decode", "f0", "features", "index", "synth"}


def test_result_names_the_f0_method_that_ran(hubert: ContentEncoder, tmp_path: Path) -> None:
    """No method asked: rmvpe when the converter has rmvpe.pt, else fcpe when installed, else pm."""
    vc = converter(hubert)
    audio = speech_like(0.5, 16000, seed=2)
    result = vc.convert(audio, 16000, ConvertParams(seed=0))
    assert result.f0_method == default_f0_method(None) == ("fcpe" if HAS_FCPE else "pm")
    assert vc.convert(audio, 16000, ConvertParams(f0_method="pm", seed=0)).f0_method == "pm"
    vc.rmvpe_path = tmp_path / "rmvpe.pt"
    assert vc.f0_method(ConvertParams()) == "rmvpe" and vc.f0_method(ConvertParams(f0_method="pm")) == "pm"
    assert converter(hubert, f0=False).convert(audio, 16000, ConvertParams(seed=0)).f0_method is None


def test_transpose_doubles_the_f0_handed_to_the_synthesizer(hubert: ContentEncoder,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    vc = converter(hubert)
    seen: list[torch.Tensor] = []
    original = vc.model.infer

    def spy(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        seen.append(args[3].clone())  # type: ignore[union-attr]
        return original(*args, **kwargs)

    monkeypatch.setattr(vc.model, "infer", spy)
    audio = speech_like(1.5, 16000, seed=2)
    vc.convert(audio, 16000, ConvertParams(f0_up_key=0, seed=0))
    vc.convert(audio, 16000, ConvertParams(f0_up_key=12, seed=0))
    base, up = seen
    voiced = base > 0
    assert voiced.sum() > 50
    torch.testing.assert_close(up[voiced], 2 * base[voiced], rtol=1e-6, atol=1e-4)


def test_long_input_is_cut_at_quiet_places(hubert: ContentEncoder) -> None:
    pad = PadConfig(x_pad=1, x_query=2, x_center=8, x_max=10)  # force several chunks on 30 s
    vc = converter(hubert, pad=pad)
    audio = speech_like(30.0, 16000, seed=3)
    calls: list[tuple[int, int]] = []
    result = vc.convert(audio, 16000, ConvertParams(rms_mix_rate=1.0, seed=1),
                        progress=lambda i, n: calls.append((i, n)))
    chunks = calls[-1][1]
    assert chunks >= 3 and calls[-1] == (chunks, chunks)
    assert abs(len(result.audio) - 30 * 40000) <= chunks * 2 * 400


def test_adapters_swap_per_conversion(tmp_path: Path, hubert: ContentEncoder) -> None:
    from rvc_lora import save_adapter

    vc = converter(hubert)
    audio, params = speech_like(1.0, 16000, seed=4), ConvertParams(seed=3)
    base = vc.convert(audio, 16000, params).audio
    files = []
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        vc.model.load_lora_weights({k: torch.randn(v.shape, generator=gen) * 0.05
                                    for k, v in vc.model.get_lora_state_dict().items()})
        files.append(save_adapter(tmp_path / f"v{seed}.safetensors", vc.model))
    vc.use_adapter(None)
    first = vc.convert(audio, 16000, params, adapter=files[0])
    second = vc.convert(audio, 16000, params, adapter=files[1])
    assert first.adapter_swapped and not np.allclose(first.audio, second.audio)
    np.testing.assert_array_equal(vc.convert(audio, 16000, params, adapter=files[0]).audio, first.audio)
    np.testing.assert_array_equal(vc.convert(audio, 16000, params).audio, base)


def test_bad_input_and_parameters(hubert: ContentEncoder) -> None:
    vc = converter(hubert)
    with pytest.raises(AudioError):  # RVC's output would be empty (silence itself converts, as in RVC)
        vc.convert(np.ones(399, np.float32), 16000)
    with pytest.raises(AudioError):
        vc.convert(np.full(16000, np.nan, np.float32), 16000)
    with pytest.raises(ParameterError, match="sid"):
        vc.convert(speech_like(0.5), 16000, ConvertParams(sid=5))
    for bad in ({"f0_up_key": 1000}, {"f0_method": "yin"}, {"protect": 0.9}, {"index_rate": -1},
                {"resample_sr": 8000}, {"sid": -1}):
        with pytest.raises(ParameterError):
            ConvertParams(**bad)  # type: ignore[arg-type]


def test_infer_features_matches_model_infer(hubert: ContentEncoder) -> None:
    vc = converter(hubert)
    gen = torch.Generator().manual_seed(0)
    phone, pitch, f0 = torch.randn(20, 768, generator=gen), torch.randint(1, 256, (20,), generator=gen), \
        torch.full((20,), 180.0)
    out = vc.infer_features(phone, pitch, f0, sid=1, seed=5)
    torch.manual_seed(5)
    with torch.no_grad():
        ref = vc.model.infer(phone[None], torch.tensor([20]), pitch[None], f0[None], torch.tensor([1]))[0][0, 0]
    np.testing.assert_array_equal(out.audio, ref.numpy())
    with pytest.raises(ParameterError):
        vc.infer_features(torch.randn(20, 256), pitch, f0)
