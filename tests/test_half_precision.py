"""The fp16 path (RVC's `is_half`) run on CPU: every model kind, adapters, index, protect, RMS mix, resampling
and the service engine, each compared with the fp32 conversion of the same input and seed.

CPU torch draws fp16 normals from another stream than fp32 ones (`randn(n, dtype=half)` is not `randn(n)`
rounded once n >= 16), so two conversions with one seed get different prior noise and, the generator having
advanced differently, different SineGen noise. `same_noise` makes every `randn_like` draw in fp32 and round, so
the comparison measures precision only: for fp32 tensors it is exactly torch's own draw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from rvc_lora import SynthesizerLoRA, save_adapter
from rvc_lora.demo import speech_like
from rvc_lora.lora import lora_layers
from rvc_lora.models.nsf import SineGen
from rvc_lora.pipeline import converter as converter_module
from rvc_lora.pipeline.content import build_random_hubert
from rvc_lora.pipeline.converter import ConvertParams, VoiceConverter
from rvc_lora.pipeline.f0 import get_f0_extractor
from rvc_lora.pipeline.index import build_index
from rvc_lora.pipeline.steps import PAD_FP16, PAD_FP32, PAD_LOW_MEMORY, PadConfig
from tests.conftest import LORA, TINY_HUBERT, tiny_model
from tests.test_f0 import rmvpe_file  # noqa: F401 - the fixture: random weights in rmvpe.pt's layout

# fp16 vs fp32 with the same noise, measured on these tiny random models: 41-60 dB per conversion, v2 f0 lowest (its
# decoder ends in a small difference of large activations); without `same_noise` the f0 models drop to 25-49 dB.
# 30 dB still fails on a wrong dtype, a half-applied adapter or a shifted chunk, each of which gives ~0 dB.
MIN_SNR_DB = 30.0
SECONDS = 2.0


def snr_db(reference: NDArray[np.floating], test: NDArray[np.floating]) -> float:
    ref = np.asarray(reference, dtype=np.float64)
    err = ref - np.asarray(test, dtype=np.float64)
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum(err**2), 1e-30)))


@pytest.fixture
def same_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    draw = torch.randn_like

    def fp32_then_round(t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return draw(t, **{**kwargs, "dtype": torch.float32}).to(kwargs.get("dtype") or t.dtype)

    monkeypatch.setattr(torch, "randn_like", fp32_then_round)


def converter(version: str, f0: bool, *, is_half: bool, pad: PadConfig | None = None) -> VoiceConverter:
    """A tiny converter with its own encoder: `VoiceConverter` casts the modules it is given in place."""
    return VoiceConverter(SynthesizerLoRA(tiny_model(version, f0), LORA), build_random_hubert(TINY_HUBERT, seed=3),
                          device="cpu", is_half=is_half, pad=pad)


def pair(version: str, f0: bool) -> tuple[VoiceConverter, VoiceConverter]:
    """(fp32, fp16) converters with the same weights, chunked alike (RVC's fp16 padding for both)."""
    return converter(version, f0, is_half=False, pad=PAD_FP16), converter(version, f0, is_half=True)


def random_adapter(path: Path, version: str, f0: bool, seed: int) -> Path:
    model = SynthesizerLoRA(tiny_model(version, f0), LORA)
    gen = torch.Generator().manual_seed(seed)
    model.load_lora_weights({k: torch.randn(v.shape, generator=gen) * 0.05
                             for k, v in model.get_lora_state_dict().items()})
    return save_adapter(path, model)


def test_half_uses_rvc_is_half_padding() -> None:
    assert (PAD_FP16.x_pad, PAD_FP16.x_query, PAD_FP16.x_center, PAD_FP16.x_max) == (3, 10, 60, 65)
    assert (PAD_FP16.t_pad, PAD_FP16.t_pad2, PAD_FP16.t_query, PAD_FP16.t_center, PAD_FP16.t_max) == \
        (48000, 96000, 160000, 960000, 1040000)
    assert PAD_FP16.t_pad_tgt(40000) == 120000
    assert PadConfig.select(is_half=True) is PAD_FP16 and PadConfig.select(is_half=False) is PAD_FP32
    assert PadConfig.select(is_half=True, gpu_mem_gib=4) is PAD_LOW_MEMORY  # a small GPU overrides both
    assert PadConfig.select(is_half=True, gpu_mem_gib=5) is PAD_FP16
    half, auto = converter("v1", False, is_half=True), converter("v1", False, is_half=False)
    assert (half.is_half, half.dtype, half.pad) == (True, torch.float16, PAD_FP16)
    assert (auto.is_half, auto.dtype, auto.pad) == (False, torch.float32, PAD_FP32)


@pytest.mark.parametrize(("total_bytes", "pad"), [(int(3.6 * 2**30), PAD_LOW_MEMORY),
                                                  (int(4.5 * 2**30), PAD_LOW_MEMORY), (int(4.7 * 2**30), PAD_FP16),
                                                  (80 * 2**30, PAD_FP16)])
def test_small_gpus_get_rvcs_low_memory_padding(monkeypatch: pytest.MonkeyPatch, total_bytes: int,
                                                pad: PadConfig) -> None:
    """On CUDA the converter sizes the GPU as RVC does (`int(GiB + 0.4)`: 4.5 GiB is 4) to pick the padding."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=total_bytes))
    gib = converter_module._gpu_mem_gib(torch.device("cuda"))
    assert PadConfig.select(is_half=True, gpu_mem_gib=gib) is pad
    assert converter_module._gpu_mem_gib(torch.device("cpu")) is None


def test_half_converter_holds_every_float_tensor_in_fp16() -> None:
    vc = converter("v2", True, is_half=True)
    tensors = [*vc.model.parameters(), *vc.model.buffers(), *vc.content.parameters()]
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float16}
    layers = lora_layers(vc.model.base).values()
    assert all(layer.lora_A.dtype == layer.lora_B.dtype == torch.float16 for layer in layers)


@pytest.mark.parametrize(
    ("version", "f0", "adapter", "use_index", "protect", "rms_mix_rate", "resample_sr"),
    [
        ("v2", True, False, False, 0.5, 1.0, 0),  # the bare path: no protect, no RMS mix
        ("v2", True, True, True, 0.33, 0.25, 0),  # RVC's defaults with an adapter and an index
        ("v2", False, True, False, 0.5, 0.25, 48000),
        ("v1", True, False, True, 0.2, 1.0, 32000),
        ("v1", False, False, True, 0.5, 0.5, 0),
        ("v1", True, True, False, 0.33, 0.25, 0),
    ],
)
def test_half_conversion_matches_fp32(tmp_path: Path, same_noise: None, version: str, f0: bool, adapter: bool,
                                      use_index: bool, protect: float, rms_mix_rate: float, resample_sr: int) -> None:
    fp32, fp16 = pair(version, f0)
    audio = speech_like(SECONDS, 16000, seed=1)
    voice = random_adapter(tmp_path / "voice.safetensors", version, f0, seed=1) if adapter else None
    index = None
    if use_index:
        feats = fp32.content.extract(torch.from_numpy(audio).double(), fp32.model.cfg.version)[0].numpy()
        index = build_index(np.concatenate([feats] * 4) + 0.01, tmp_path / "voice.index")
    params = ConvertParams(f0_method="pm", index_rate=0.6 if use_index else 0.0, protect=protect,
                           rms_mix_rate=rms_mix_rate, resample_sr=resample_sr, seed=7)
    want = fp32.convert(audio, 16000, params, adapter=voice, index=index)
    got = fp16.convert(audio, 16000, params, adapter=voice, index=index)
    sr = resample_sr or fp32.sr
    assert (got.sr, want.sr) == (sr, sr)
    assert got.audio.dtype == np.float32 and np.isfinite(got.audio).all()
    assert len(got.audio) == len(want.audio)
    assert abs(len(got.audio) - SECONDS * sr) <= 2 * sr // 100  # RVC's chunk arithmetic: within 2 frames
    assert np.sqrt(np.mean(got.audio**2)) > 1e-3  # not silence
    assert snr_db(want.audio, got.audio) >= MIN_SNR_DB


def test_half_conversion_is_deterministic_with_a_seed() -> None:
    vc = converter("v2", True, is_half=True)
    audio, params = speech_like(1.0, 16000, seed=2), ConvertParams(seed=5)
    np.testing.assert_array_equal(vc.convert(audio, 16000, params).audio, vc.convert(audio, 16000, params).audio)


def test_half_adapters_swap_in_place_and_back(tmp_path: Path) -> None:
    vc = converter("v2", True, is_half=True)
    audio, params = speech_like(1.0, 16000, seed=4), ConvertParams(seed=3)
    files = [random_adapter(tmp_path / f"v{seed}.safetensors", "v2", True, seed) for seed in (1, 2)]
    slots = [t.data_ptr() for layer in lora_layers(vc.model.base).values() for t in (layer.lora_A, layer.lora_B)]
    base = vc.convert(audio, 16000, params).audio
    first = vc.convert(audio, 16000, params, adapter=files[0])
    second = vc.convert(audio, 16000, params, adapter=files[1])
    assert first.adapter_swapped and snr_db(base, first.audio) < 40 and snr_db(first.audio, second.audio) < 40
    np.testing.assert_array_equal(vc.convert(audio, 16000, params, adapter=files[0]).audio, first.audio)
    np.testing.assert_array_equal(vc.convert(audio, 16000, params).audio, base)
    assert [t.data_ptr() for layer in lora_layers(vc.model.base).values()
            for t in (layer.lora_A, layer.lora_B)] == slots  # copies into the same fp16 tensors
    vc.use_adapter(files[0])
    resident = vc.model.get_lora_state_dict(rank=LORA.r)
    stored = SynthesizerLoRA(tiny_model("v2", True), LORA)
    stored.load_adapter(files[0])
    for key, value in stored.get_lora_state_dict(rank=LORA.r).items():
        assert resident[key].dtype == torch.float16
        torch.testing.assert_close(resident[key], value.half(), rtol=0, atol=0)  # the fp32 values, rounded once


def _record_sinegen(vc: VoiceConverter, seen: list[tuple[torch.dtype, torch.dtype]]) -> Callable[[], None]:
    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, ...]) -> None:
        seen.append((args[0].dtype, out[0].dtype))

    return vc.model.base.dec.m_source.l_sin_gen.register_forward_hook(hook).remove


def test_sinegen_runs_in_float32_in_half_mode() -> None:
    vc = converter("v2", True, is_half=True)
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    remove = _record_sinegen(vc, seen)
    vc.convert(speech_like(1.0, 16000, seed=2), 16000, ConvertParams(seed=1))
    gen = torch.Generator().manual_seed(0)
    phone, pitch = torch.randn(30, 768, generator=gen), torch.randint(1, 256, (30,), generator=gen)
    out = vc.infer_features(phone, pitch, torch.full((30,), 180.0, dtype=torch.float64), seed=2)
    remove()
    assert seen == [(torch.float32, torch.float32)] * 2  # f0 Hz in, excitation out: float32 both times
    assert np.isfinite(out.audio).all() and out.audio.dtype == np.float32


def test_sinegen_phase_holds_only_in_float32() -> None:
    """Why SineGen never runs in fp16 (spec §5.11): 30 s of 440 Hz at 40 kHz stays on the ideal sine (sample n at
    phase `(n + 1) f0 / sr`) from float32 f0, and ends up in antiphase from fp16 f0."""
    gen = SineGen(40000)
    f0 = torch.full((1, 3000), 440.0)
    ideal = 0.1 * torch.sin(2 * torch.pi * 440.0 * (torch.arange(3000 * 400, dtype=torch.float64) + 1) / 40000)
    error = {}
    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(0)
        excitation, uv, noise = gen(f0.to(dtype), 400)
        error[dtype] = float(((excitation - noise * uv).squeeze().double() - ideal).abs().max())
    assert error[torch.float32] < 1e-3 and error[torch.float16] > 0.05


def test_rmvpe_half_runs_on_cpu_and_tracks_fp32(rmvpe_file: Path) -> None:  # noqa: F811 - the imported fixture
    audio = np.random.default_rng(6).standard_normal(4000) * 0.1
    full = get_f0_extractor("rmvpe", rmvpe_path=rmvpe_file, is_half=False)
    half = get_f0_extractor("rmvpe", rmvpe_path=rmvpe_file, is_half=True)
    seen: list[torch.dtype] = []
    hook = half.net.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))  # type: ignore[attr-defined]
    try:
        salience = half.salience(audio)  # type: ignore[attr-defined]
    finally:
        hook.remove()
    assert seen == [torch.float16] and salience.dtype == np.float32
    np.testing.assert_allclose(salience, full.salience(audio), atol=2e-3)  # type: ignore[attr-defined]


def test_half_infer_features_matches_fp32(same_noise: None) -> None:
    fp32, fp16 = pair("v1", True)
    gen = torch.Generator().manual_seed(0)
    phone, pitch = torch.randn(60, 256, generator=gen), torch.randint(1, 256, (60,), generator=gen)
    f0 = 120 + 80 * torch.rand(60, generator=gen)
    want = fp32.infer_features(phone, pitch, f0, sid=1, seed=4)
    got = fp16.infer_features(phone, pitch, f0, sid=1, seed=4)
    assert got.audio.dtype == np.float32 and len(got.audio) == len(want.audio) == 60 * 400
    assert snr_db(want.audio, got.audio) >= MIN_SNR_DB


@pytest.fixture
def engines(tiny_service_assets: dict[str, Any], tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    from service.rvc_engine import load_engine
    from service.settings import Settings

    def settings(half: bool) -> Settings:
        return Settings(model=tiny_service_assets["model"], hubert=tiny_service_assets["hubert"], device="cpu",
                        half=half, max_rank=8, warmup=False, adapter_dir=tmp_path / "adapters")

    yield load_engine(settings(False)), load_engine(settings(True))


def test_service_engine_in_half_precision(engines: tuple[Any, Any], tiny_service_assets: dict[str, Any],
                                          same_noise: None) -> None:
    from service.engine import ConvertOptions, Features

    fp32, fp16 = engines
    # precision is not part of the model's identity; only the memory a bank slot takes halves
    assert dataclasses.replace(fp16.info, bank_slot_bytes=0) == dataclasses.replace(fp32.info, bank_slot_bytes=0)
    assert fp16.info.bank_slot_bytes * 2 == fp32.info.bank_slot_bytes > 0
    fp32._vc.pad = PAD_FP16  # chunk alike, as RVC's fp16 padding does
    voices = [(e, e.load_voice(tiny_service_assets["adapters"][0], None)) for e in engines]
    assert {t.dtype for t in voices[1][1].adapter.tensors} == {torch.float16}
    audio = speech_like(SECONDS, 16000, seed=3)
    options = ConvertOptions(f0_method="pm", seed=2)
    (want, want_voiced), (got, got_voiced) = [(e.convert(audio, options, None), e.convert(audio, options, v))
                                              for e, v in voices]
    for ref, out in ((want, got), (want_voiced, got_voiced)):
        assert out.sr == ref.sr == 40000 and len(out.audio) == len(ref.audio)
        assert np.isfinite(out.audio).all() and snr_db(ref.audio, out.audio) >= MIN_SNR_DB
    assert snr_db(got.audio, got_voiced.audio) < 40  # the adapter is applied in fp16 too
    gen = np.random.default_rng(0)
    features = Features(phone=gen.standard_normal((50, 256)).astype(np.float32),
                        pitch=gen.integers(1, 256, 50).astype(np.int64), nsff0=np.full(50, 150.0, np.float32),
                        sid=0, seed=1)
    inferred = [e.infer(features, v) for e, v in voices]
    assert snr_db(inferred[0].audio, inferred[1].audio) >= MIN_SNR_DB
