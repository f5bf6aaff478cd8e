"""The converter against RVC's chunk loop written out here from the spec (§3.3-§3.10), on the branches the
real-speech references do not reach: long audio with cut points, v1 and no-f0 models, f0 files, rms mix
rates, protect on/off, resampling, silence and the shortest convertible input.

`rvc_loop` is deliberately plain: python slices exactly as the spec prints them, the spec's `S` and
first-minimum search, RVC's `F.interpolate`, its protect masks, one seed before the first chunk. The
converter must reproduce it bit for bit on a tiny random model and HuBERT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rvc_lora import AudioError, LoRAConfig, SynthesizerLoRA
from rvc_lora.demo import speech_like
from rvc_lora.pipeline.audio import prepare_16k, resample, to_int16
from rvc_lora.pipeline.content import ContentEncoder, build_random_hubert
from rvc_lora.pipeline.converter import ConvertParams, VoiceConverter
from rvc_lora.pipeline.f0 import get_f0_extractor
from rvc_lora.pipeline.steps import PAD_FP32, PadConfig, change_rms, f0_to_coarse, highpass
from tests.conftest import tiny_model

HUBERT = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 2, "intermediate_size": 32,
          "conv_dim": (16,) * 7, "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 4,
          "classifier_proj_size": 256}
LORA = LoRAConfig(r=4, lora_alpha=4, target_modules=["ups", "resblocks"])
SMALL_PAD = PadConfig(x_pad=1, x_query=2, x_center=5, x_max=6)  # cut points every 5 s, searched within +-2 s


@pytest.fixture(scope="module")
def hubert() -> ContentEncoder:
    return build_random_hubert(HUBERT, seed=5)


def make_converter(hubert: ContentEncoder, version: str, f0: bool, pad: PadConfig) -> VoiceConverter:
    return VoiceConverter(SynthesizerLoRA(tiny_model(version, f0, seed=2), LORA), hubert, device="cpu", pad=pad)


def spec_cut_points(audio: np.ndarray, t_center: int, t_query: int, t_max: int) -> list[int]:
    """§3.3: S = 160-sample sums of |x| over the signal reflect-padded by 80; first minimum near each t."""
    window = 160
    audio_pad = np.pad(audio, (window // 2, window // 2), mode="reflect")
    opt_ts: list[int] = []
    if audio_pad.shape[0] > t_max:
        audio_sum = np.zeros_like(audio)
        for i in range(window):
            audio_sum += np.abs(audio_pad[i : i - window])
        for t in range(t_center, audio.shape[0], t_center):
            w = audio_sum[t - t_query : t + t_query]
            opt_ts.append(t - t_query + int(np.where(w == w.min())[0][0]))
    return opt_ts


def rvc_loop(vc: VoiceConverter, audio16k: np.ndarray, p: ConvertParams,
             f0_curve: np.ndarray | None = None) -> tuple[np.ndarray, list[int]]:
    """The spec's pipeline on prepared 16 kHz audio -> (float32 output before int16, cut points)."""
    assert p.seed is not None
    cfg, tgt_sr = vc.model.cfg, vc.sr
    x_pad, x_query, x_center, x_max = vc.pad.x_pad, vc.pad.x_query, vc.pad.x_center, vc.pad.x_max
    t_pad, t_query, t_center, t_max = 16000 * x_pad, 16000 * x_query, 16000 * x_center, 16000 * x_max
    t_pad2, t_pad_tgt, window = 2 * t_pad, tgt_sr * x_pad, 160

    audio = highpass(audio16k)
    opt_ts = spec_cut_points(audio, t_center, t_query, t_max)
    audio_pad = np.pad(audio, (t_pad, t_pad), mode="reflect")
    p_len = audio_pad.shape[0] // window
    pitch = pitchf = None
    if cfg.f0:
        f0 = get_f0_extractor(vc.f0_method(p))(audio_pad, p_len, filter_radius=p.filter_radius)
        f0 = f0 * pow(2, p.f0_up_key / 12)
        if f0_curve is not None:
            n = f0[x_pad * 100 : x_pad * 100 + len(f0_curve)].shape[0]
            f0[x_pad * 100 : x_pad * 100 + len(f0_curve)] = f0_curve[:n]
        pitch = torch.from_numpy(f0_to_coarse(f0[:p_len]))[None]
        pitchf = torch.from_numpy(f0[:p_len].astype(np.float32))[None]
    sid = torch.tensor([p.sid])

    def vc_chunk(x: np.ndarray, pitch: torch.Tensor | None, pitchf: torch.Tensor | None) -> np.ndarray:
        feats = vc.content.extract(torch.from_numpy(x), cfg.version)
        protect = p.protect < 0.5 and pitch is not None and pitchf is not None
        feats0 = feats.clone() if protect else None
        feats = F.interpolate(feats.permute(0, 2, 1), scale_factor=2).permute(0, 2, 1)
        if feats0 is not None:
            feats0 = F.interpolate(feats0.permute(0, 2, 1), scale_factor=2).permute(0, 2, 1)
        n = x.shape[0] // window
        if feats.shape[1] < n:
            n = feats.shape[1]
            if pitch is not None and pitchf is not None:
                pitch, pitchf = pitch[:, :n], pitchf[:, :n]
        if feats0 is not None and pitchf is not None:
            w = pitchf.clone()
            w[pitchf > 0] = 1
            w[pitchf < 1] = p.protect
            w = w.unsqueeze(-1)
            feats = (feats * w + feats0 * (1 - w)).to(feats0.dtype)
        lengths = torch.tensor([n]).long()
        with torch.no_grad():
            if pitch is not None:
                y = vc.model.infer(feats, lengths, pitch, pitchf, sid)[0]
            else:
                y = vc.model.infer(feats, lengths, sid)[0]
        out: np.ndarray = y[0, 0].float().numpy()
        return out

    def frames(a: torch.Tensor | None, lo: int, hi: int | None = None) -> torch.Tensor | None:
        return None if a is None else a[:, lo:hi]

    torch.manual_seed(p.seed)
    pieces, s, t = [], 0, None
    for t in opt_ts:
        t = t // window * window
        stop = (t + t_pad2) // window
        y = vc_chunk(audio_pad[s : t + t_pad2 + window], frames(pitch, s // window, stop),
                     frames(pitchf, s // window, stop))
        pieces.append(y[t_pad_tgt:-t_pad_tgt])
        s = t
    if t is None:
        y = vc_chunk(audio_pad, pitch, pitchf)
    else:
        y = vc_chunk(audio_pad[t:], frames(pitch, t // window), frames(pitchf, t // window))
    pieces.append(y[t_pad_tgt:-t_pad_tgt])
    audio_opt = np.concatenate(pieces)
    if p.rms_mix_rate != 1:
        audio_opt = change_rms(audio, 16000, audio_opt, tgt_sr, p.rms_mix_rate)
    if tgt_sr != p.resample_sr and p.resample_sr >= 16000:
        audio_opt = resample(audio_opt, tgt_sr, p.resample_sr)
    return audio_opt, opt_ts


CASES = {  # name: (version, f0, pad, samples at 16 kHz (odd), params, f0 file)
    "fp32_42s_v2_f0": ("v2", True, PAD_FP32, 672_001,
                       ConvertParams(f0_up_key=2, rms_mix_rate=0.25, protect=0.33, resample_sr=44100, seed=11), None),
    "small_pad_v1_nono": ("v1", False, SMALL_PAD, 177_603,
                          ConvertParams(rms_mix_rate=1.0, protect=0.2, filter_radius=0, seed=12), None),
    "small_pad_v1_f0_file": ("v1", True, SMALL_PAD, 177_601,
                             ConvertParams(f0_up_key=-3, rms_mix_rate=0.0, protect=0.5, resample_sr=32000, seed=13),
                             "0.5,150\n1.0,300\n1.5,0\n3.0,220\n"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_converter_is_rvc_chunk_loop(tmp_path: Path, hubert: ContentEncoder, name: str) -> None:
    version, f0, pad, n, params, f0_text = CASES[name]
    vc = make_converter(hubert, version, f0, pad)
    audio = speech_like(n / 16000 + 0.01, 16000, seed=len(name))[:n] * 0.9  # peak < 0.95: not normalised
    f0_file = None
    if f0_text is not None:
        f0_file = tmp_path / "f0.txt"
        f0_file.write_text(f0_text)
    result = vc.convert(audio, 16000, params, f0_file=f0_file)
    curve = None
    if f0_text is not None:  # RVC's parse: float32 table, frames 0 .. round((t_max - t_min) * 100)
        table = np.array([[float(v) for v in line.split(",")] for line in f0_text.strip().split("\n")], np.float32)
        delta_t = int(np.round((table[:, 0].max() - table[:, 0].min()) * 100 + 1))
        curve = np.interp(list(range(delta_t)), table[:, 0] * 100, table[:, 1])
    expected, cuts = rvc_loop(vc, prepare_16k(audio, 16000), params, curve)
    assert len(cuts) == (n - 1) // pad.t_center  # t = t_center, 2 t_center, ... < N
    assert result.sr == (params.resample_sr or vc.sr)
    np.testing.assert_array_equal(result.audio, expected)
    np.testing.assert_array_equal(result.int16(), to_int16(expected))


def test_chunks_get_rvc_slices_and_one_seed(hubert: ContentEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """6.5 s with cuts every 5 s searched within +-2 s: one cut, searched in [48000, 104000) (cut short at N);
    the f0 of each chunk is `pitchf[s//160 : (t + 32000)//160]` cut to its 2F frames; the generator is
    seeded once, not per chunk."""
    vc = make_converter(hubert, "v2", True, SMALL_PAD)
    x = speech_like(6.5, 16000, seed=9, gaps=False) * 0.9
    x[90_000:90_400] = 0.0  # a 25 ms hole: the quietest window of the search range
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    original = vc.model.infer

    def spy(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        seen.append((args[0].shape[1], args[3].clone(), torch.get_rng_state()))
        return original(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(vc.model, "infer", spy)
    result = vc.convert(x, 16000, ConvertParams(f0_method="pm", rms_mix_rate=1.0, seed=5))
    audio = highpass(prepare_16k(x, 16000))
    assert spec_cut_points(audio, 80_000, 32_000, 96_000) == [90_200]  # inside the hole (the filter rings into it)
    audio_pad = np.pad(audio, 16000, mode="reflect")  # 136000 samples, 850 frames
    pitchf = torch.from_numpy(get_f0_extractor("pm")(audio_pad, 850).astype(np.float32))[None]
    t = 90_200 // 160 * 160  # 90080: chunks [0, 122240) and [90080, 136000), one frame of overlap
    frames = [2 * ((122_240 - 400) // 320 + 1), 2 * ((136_000 - t - 400) // 320 + 1)]
    assert [n for n, _, _ in seen] == frames == [762, 286]
    assert torch.equal(seen[0][1], pitchf[:, :762])
    assert torch.equal(seen[1][1], pitchf[:, 563 : 563 + 286])
    torch.manual_seed(5)
    assert torch.equal(seen[0][2], torch.get_rng_state())  # seeded right before the first chunk
    assert not torch.equal(seen[1][2], seen[0][2])  # and not again before the second
    assert len(result.audio) == (762 + 286) * 400 - 2 * 2 * 40000  # t_pad_tgt trimmed off both ends of each


def test_silence_converts_as_rvc_does(hubert: ContentEncoder) -> None:
    """RVC does not scale silence, and `change_rms` with rate < 1 multiplies by `rms_in^(1-rate) = 0`."""
    vc = make_converter(hubert, "v2", True, PAD_FP32)
    result = vc.convert(np.zeros(8000, np.float32), 16000, ConvertParams(rms_mix_rate=0.25, seed=1))
    assert len(result.audio) == 2 * ((8000 + 32000 - 400) // 320 + 1) * 400 - 80000
    assert not result.audio.any() and not result.int16().any()
    loud = vc.convert(np.zeros(8000, np.float32), 16000, ConvertParams(rms_mix_rate=1.0, seed=1))
    assert np.isfinite(loud.audio).all() and loud.audio.any()  # rate 1: the synthesizer's own noise


@pytest.mark.parametrize(("n", "out_len"), [(400, 800), (719, 800), (720, 1600)])
def test_shortest_input_follows_the_frame_arithmetic(hubert: ContentEncoder, n: int, out_len: int) -> None:
    """N samples at 16 kHz: `2 * ((N + 32000 - 400) // 320 + 1)` frames of 400 samples, minus 2 * 40000."""
    vc = make_converter(hubert, "v2", False, PAD_FP32)
    audio = speech_like(0.1, 16000, seed=3)[:n]
    assert len(vc.convert(audio, 16000, ConvertParams(rms_mix_rate=0.5, seed=0)).audio) == out_len


def test_input_with_empty_rvc_output_is_an_audio_error(hubert: ContentEncoder) -> None:
    vc = make_converter(hubert, "v2", False, PAD_FP32)
    with pytest.raises(AudioError, match="399 samples"):
        vc.convert(speech_like(0.1, 16000)[:399], 16000)
