"""LoRA training: preparation, batching, objective, discriminators, trainer guarantees (tiny 8 kHz models, CPU)."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.signal
import soundfile as sf
import torch
from safetensors.torch import load_file

from rvc_lora import SynthConfig, build_synthesizer, load_adapter, save_rvc_checkpoint
from rvc_lora.errors import CheckpointError
from rvc_lora.lora import base_state_dict
from rvc_lora.pipeline.content import ContentEncoder, build_random_hubert
from rvc_lora.train import (
    LoRATraining,
    MultiPeriodDiscriminator,
    TrainingDataError,
    TrainingStateError,
    discriminator_from_state_dict,
    infer_base_config,
    load_discriminator,
    load_pretrained_base,
    run_prepare,
    run_train,
    train_params,
)
from rvc_lora.train.data import BucketBatchSampler, PreparedInfo, Sample, SegmentDataset, bucket_length, collate
from rvc_lora.train.losses import adversarial_loss, discriminator_loss, feature_matching_loss, kl_loss
from rvc_lora.train.mel import MelScale, spectrogram
from rvc_lora.train.prepare import highpass, normalize
from rvc_lora.train.pretrained import VARIANTS, TrainParams
from rvc_lora.train.slicer import Slicer, segment
from rvc_lora.train.step import lora_param_groups
from rvc_lora.voice import SynthesizerLoRA, adapter_layout, load_synthesizer_with_lora
from rvc_lora.voice.layout import DEFAULT_TRAIN_RANK
from tests.conftest import randomize_

SR = 8000  # 80 samples per 10 ms frame: the decoder is two upsample stages, so a step takes milliseconds
TINY = SynthConfig.from_list([65, 32, 6, 8, 16, 2, 2, 3, 0, "1", [3, 5], [[1, 3, 5]] * 2, [10, 8], 16, [20, 16], 3, 8,
                              SR], version="v1", f0=True)
TINY_HUBERT: dict[str, Any] = {"hidden_size": 48, "num_hidden_layers": 12, "num_attention_heads": 2,
                               "intermediate_size": 64, "conv_dim": (8,) * 7, "num_conv_pos_embeddings": 8,
                               "num_conv_pos_embedding_groups": 2, "classifier_proj_size": 256}
TRAIN = {"batch_size": 2, "segment_frames": 8, "n_mels": 40, "progress": False}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny convs are dominated by thread hand-offs on a shared 2-core machine: one thread is ~10x faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tone(seconds: float, sr: int, f0: float, wobble: float, seed: int) -> np.ndarray:
    """A harmonic tone (7 partials, 1/k) whose pitch follows a slow sine contour, with 50 ms fades."""
    t = np.arange(int(seconds * sr)) / sr
    contour = f0 + wobble * np.sin(2 * np.pi * (0.5 + 0.1 * seed) * t)
    phase = 2 * np.pi * np.cumsum(contour) / sr
    y = sum(0.3 / k * np.sin(k * phase) for k in range(1, 8))
    return np.asarray(y * np.clip(np.minimum(t, t[-1] - t) * 20, 0, 1), dtype=np.float32)


@pytest.fixture(scope="module")
def hubert() -> ContentEncoder:
    return build_random_hubert(TINY_HUBERT, seed=0)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory, hubert: ContentEncoder) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    for i in range(3):
        sf.write(data / f"tone{i}.wav", tone(1.5, SR, 140 + 40 * i, 30, i), SR, subtype="PCM_16")
    stereo = np.stack([tone(1.5, 16000, 220, 50, 3)] * 2, axis=1)  # another rate, two channels
    sf.write(data / "sub" / "tone3.flac", stereo, 16000)
    (data / "notes.txt").write_text("not audio")
    model = build_synthesizer(TINY, with_posterior=True)
    randomize_(model, seed=0)
    with torch.no_grad():  # fp16-exact weights: the served fp16 file then holds the very same values
        for p in model.parameters():
            p.copy_(p.half().float())
    torch.save({"model": model.state_dict(), "config": TINY.to_list(), "version": "v1", "f0": 1}, root / "base.pth")
    save_rvc_checkpoint(root / "served.pth", model)  # RVC's inference file: fp16, no enc_q
    torch.save({"model": MultiPeriodDiscriminator("v1", width_div=16).state_dict()}, root / "D.pth")
    work = root / "work"
    run_prepare(data, work, root / "base.pth", hubert, "pm", min_total_s=3, progress=False)
    return {"root": root, "data": data, "base": root / "base.pth", "served": root / "served.pth",
            "D": root / "D.pth", "work": work}


@pytest.fixture
def work(assets: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the prepared folder (training writes checkpoints into it)."""
    return Path(shutil.copytree(assets["work"], tmp_path / "work"))


def train(assets: dict[str, Path], work: Path, out: Path, **kwargs: Any) -> LoRATraining:
    return LoRATraining.create(work, assets["base"], out, discriminator=assets["D"],
                               **{k: v for k, v in {**TRAIN, **kwargs}.items() if k != "progress"})


# --- preparation -----------------------------------------------------------------------------------------------


def test_prepare_summary_and_segments(assets: dict[str, Path], hubert: ContentEncoder) -> None:
    info = PreparedInfo.read(assets["work"])
    assert (info.sr, info.version, info.f0, info.hop, info.n_fft) == (SR, "v1", True, 80, 128)
    assert sorted({s.source for s in info.segments}) == ["sub/tone3.flac", "tone0.wav", "tone1.wav", "tone2.wav"]
    assert info.mute is not None and len(info.training_items()) == len(info.segments) + 2
    seg = next(s for s in info.segments if s.source == "tone0.wav")
    with np.load(seg.path) as z:
        wav, spec, phone, pitch, pitchf = z["wav"], z["spec"], z["phone"], z["pitch"], z["pitchf"]
    assert wav.dtype == np.float32 and len(wav) == int(1.5 * SR)
    assert spec.shape == (65, len(wav) // 80)
    assert phone.shape == (hubert.num_frames(len(wav) * 2), 256)  # 16 kHz piece, 20 ms frames
    assert pitch.dtype == np.int64 and pitch.min() >= 1 and pitch.max() <= 255 and len(pitch) == len(wav) * 2 // 160
    voiced = pitchf[pitchf > 0]
    assert len(voiced) > 0.7 * len(pitchf) and 110 < np.median(voiced) < 170  # tone0: 140 +- 30 Hz
    sample = SegmentDataset([seg], True, info.hop)[0]  # RVC's alignment: x2 features, cut to the spec
    assert sample.phone.shape[0] == sample.spec.shape[1] == min(2 * len(phone), spec.shape[1])


def test_prepare_reuses_its_cache(assets: dict[str, Path], hubert: ContentEncoder, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    work = Path(shutil.copytree(assets["work"], tmp_path / "work"))
    before = (work / "dataset.json").read_text()

    def boom(*_: object, **__: object) -> None:
        raise AssertionError("a cached recording was processed again")

    monkeypatch.setattr(ContentEncoder, "extract", boom)
    summary = run_prepare(assets["data"], work, assets["base"], hubert, "pm", min_total_s=3, progress=False)
    assert (summary.files, summary.reused) == (4, 4)
    assert summary.skipped[0].path.endswith("notes.txt") and "not an audio file" in summary.skipped[0].reason
    assert json.loads((work / "dataset.json").read_text())["segments"] == json.loads(before)["segments"]
    assert str(summary).startswith("4 files -> 4 segments")


@pytest.mark.parametrize(("case", "match"), [
    ("missing", "no such folder"),
    ("empty", "no audio files"),
    ("unreadable", "broken.wav: cannot be used"),
    ("too_little", r"too little usable audio: .*short\.wav"),
])
def test_prepare_bad_data(assets: dict[str, Path], hubert: ContentEncoder, tmp_path: Path, case: str,
                          match: str) -> None:
    data = tmp_path / "data"
    if case != "missing":
        data.mkdir()
    if case == "unreadable":
        sf.write(data / "good.wav", tone(1.5, SR, 150, 20, 0), SR)
        (data / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 10)
    if case == "too_little":
        sf.write(data / "short.wav", tone(0.5, SR, 150, 20, 0), SR)
    with pytest.raises(TrainingDataError, match=match):
        run_prepare(data, tmp_path / "work", assets["base"], hubert, "pm", min_total_s=1, progress=False)


def test_prepare_skip_bad_lists_the_file(assets: dict[str, Path], hubert: ContentEncoder, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    sf.write(data / "good.wav", tone(1.5, SR, 150, 20, 0), SR)
    (data / "broken.wav").write_bytes(b"not a wav at all")
    summary = run_prepare(data, tmp_path / "work", assets["base"], hubert, "pm", min_total_s=1, skip_bad=True,
                          progress=False)
    assert (summary.files, summary.segments) == (1, 1)
    assert [Path(s.path).name for s in summary.skipped] == ["broken.wav"]


def test_highpass_is_rvcs_causal_butterworth() -> None:
    b, a = scipy.signal.butter(5, 48, btype="high", fs=40000)  # spec §4.1 lists these to 12 s.f.
    np.testing.assert_allclose(b[:3], [0.987874390359, -4.93937195179, 9.87874390359], rtol=1e-10)
    np.testing.assert_allclose(a[1:], [-4.97560063914, 9.90269995606, -9.85449379546, 4.90329028969,
                                       -0.975895811127], rtol=1e-10)
    impulse = np.zeros(64)
    impulse[10] = 1.0
    assert not highpass(impulse, 40000)[:10].any()  # causal: nothing before the impulse


def test_normalize_rule() -> None:
    y, _ = normalize(np.array([0.5, -2.0, 1.0]))
    assert y is not None
    np.testing.assert_allclose(y, np.array([0.5, -2.0, 1.0]) / 2.0 * 0.675 + 0.25 * np.array([0.5, -2.0, 1.0]))
    assert normalize(np.array([0.1, 3.0]))[0] is None and normalize(np.zeros(4))[1] == "silent"


def test_slicer_cuts_at_silence_and_segments_overlap() -> None:
    sr = 8000
    audio = np.concatenate([tone(2.0, sr, 150, 0, 0), np.zeros(sr), tone(2.0, sr, 150, 0, 0)])
    chunks = Slicer(sr).slice(audio)
    assert len(chunks) == 2
    assert all(2 * sr <= len(c) < 3 * sr for c in chunks)  # each keeps its tone and at most ~0.5 s of the pause
    assert sum(len(c) for c in chunks) < 4.6 * sr  # part of the pause is gone
    assert Slicer(sr).slice(tone(2.0, sr, 150, 0, 0))[0].shape == (2 * sr,)  # no silence: one chunk
    pieces = segment(np.arange(int(10.0 * sr), dtype=np.float64), sr)  # 3.7 s every 3.4 s, the rest last
    assert [len(p) for p in pieces] == [int(3.7 * sr)] * 2 + [int(10.0 * sr) - int(2 * 3.4 * sr)]
    assert pieces[1][0] == int(3.4 * sr)


# --- data, batching ---------------------------------------------------------------------------------------------


def test_bucket_sampler_is_rvcs() -> None:
    hop = 400  # lengths in RVC's units (bytes // (3 hop)): 150, 150, 150, 250, 50 (dropped), 950 (dropped)
    lengths = [bucket_length(n * 3 * hop // 4, hop) for n in (150, 150, 150, 250, 50, 950)]
    sampler = BucketBatchSampler(lengths, batch_size=2, seed=1)
    assert sampler.dropped == 2 and len(sampler) == 3  # bucket (100, 200] padded 3 -> 4, bucket (200, 300] 1 -> 2
    sampler.set_epoch(1)
    first = list(sampler)
    assert all(len(b) == 2 and len({lengths[i] for i in b}) == 1 for b in first)  # batches never mix buckets
    assert sorted(i for b in first for i in b if i != 3) in ([0, 0, 1, 2], [0, 1, 1, 2], [0, 1, 2, 2])
    assert list(sampler) == first  # same epoch, same batches
    again = BucketBatchSampler(lengths, batch_size=2, seed=1)
    again.set_epoch(1)
    assert list(again) == first


def test_collate_sorts_and_pads() -> None:
    def sample(t: int) -> Sample:
        return Sample(torch.ones(t, 4), torch.ones(t, dtype=torch.long), torch.ones(t), torch.ones(3, t),
                      torch.ones(t * 2), 0)

    batch = collate([sample(3), sample(5)])
    assert batch.spec_lengths.tolist() == [5, 3] and batch.phone.shape == (2, 5, 4)
    assert batch.wave.shape == (2, 1, 10) and batch.wave[1, 0, 6:].abs().sum() == 0
    assert batch.pitch is not None and batch.pitch[1].tolist() == [1, 1, 1, 0, 0]


# --- objective --------------------------------------------------------------------------------------------------


def test_spectrogram_and_mel_numbers() -> None:
    params = TrainParams(sr=40000, n_fft=2048, hop=400, n_mels=125, segment_frames=32)
    y = torch.sin(2 * math.pi * 1000 * torch.arange(12800) / 40000)[None]
    spec = spectrogram(y, 2048, 400, 2048)
    assert spec.shape == (1, 1025, 32)
    assert int(spec[0, :, 16].argmax()) == round(1000 * 2048 / 40000)  # the 1 kHz bin
    assert float(spec.min()) >= 1e-3 - 1e-9  # sqrt(0 + 1e-6)
    mel = MelScale(params)
    assert mel.basis.shape == (125, 1025)
    out = mel(y)
    assert out.shape == (1, 125, 32) and float(out.min()) >= math.log(1e-5) - 1e-6
    torch.testing.assert_close(out, mel.spec_to_mel(spec))


def test_losses_match_their_formulas() -> None:
    real, fake = [torch.full((2, 3), 0.5)], [torch.full((2, 3), 0.25)]
    assert float(discriminator_loss(real, fake)) == pytest.approx(0.25 + 0.0625)
    assert float(adversarial_loss(fake)) == pytest.approx(0.5625)
    fm = feature_matching_loss([[torch.ones(2, 2), torch.zeros(3)]], [[torch.zeros(2, 2), torch.ones(3)]])
    assert float(fm) == pytest.approx(2 * (1 + 1))
    z_p, m_p = torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)
    logs_p, logs_q = torch.zeros(1, 2, 4), torch.full((1, 2, 4), -1.0)
    mask = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    assert float(kl_loss(z_p, logs_q, m_p, logs_p, mask)) == pytest.approx(2 * 2 * 0.5 / 2)  # (0 + 1 - 0.5) per bin


def test_lora_groups_train_effective_b_like_standard_lora() -> None:
    """One AdamW step on (A, B_eff) with our groups == standard LoRA's step on (A, B_raw), B_eff = s B_raw."""
    gen = torch.Generator().manual_seed(0)
    x, target = torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen)
    a0, b_raw0 = torch.randn(2, 5, generator=gen), torch.randn(3, 2, generator=gen)
    s = 16 / 2
    a1, b1 = a0.clone().requires_grad_(), (b_raw0 * s).requires_grad_()
    a2, b2 = a0.clone().requires_grad_(), b_raw0.clone().requires_grad_()
    opt1 = torch.optim.AdamW(lora_param_groups([a1], [b1], 1e-2, s), betas=(0.8, 0.99))
    opt2 = torch.optim.AdamW([a2, b2], lr=1e-2, betas=(0.8, 0.99), eps=1e-9)
    for _ in range(3):
        for opt, a, b, scale in ((opt1, a1, b1, 1.0), (opt2, a2, b2, s)):
            opt.zero_grad()
            torch.autograd.backward(((x @ a.t() @ (scale * b).t() - target) ** 2).mean())
            opt.step()
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(b1, b2 * s)


# --- discriminators, pretrained bases ---------------------------------------------------------------------------


def rvc_discriminator_layout(version: str) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of RVC's pretrained D files, written out from spec §4.6 (not from our module)."""
    shapes: dict[str, tuple[int, ...]] = {}
    s_v = [(16, 1, 15), (64, 4, 41), (256, 4, 41), (1024, 4, 41), (1024, 4, 41), (1024, 1024, 5)]
    for j, v in enumerate(s_v):
        shapes |= {f"discriminators.0.convs.{j}.weight_v": v, f"discriminators.0.convs.{j}.weight_g": (v[0], 1, 1),
                   f"discriminators.0.convs.{j}.bias": (v[0],)}
    shapes |= {"discriminators.0.conv_post.weight_v": (1, 1024, 3), "discriminators.0.conv_post.weight_g": (1, 1, 1),
               "discriminators.0.conv_post.bias": (1,)}
    periods = 6 if version == "v1" else 8
    for k in range(1, periods + 1):
        for j, (o, i) in enumerate([(32, 1), (128, 32), (512, 128), (1024, 512), (1024, 1024)]):
            name = f"discriminators.{k}.convs.{j}"
            shapes |= {f"{name}.weight_v": (o, i, 5, 1), f"{name}.weight_g": (o, 1, 1, 1), f"{name}.bias": (o,)}
        shapes |= {f"discriminators.{k}.conv_post.weight_v": (1, 1024, 3, 1),
                   f"discriminators.{k}.conv_post.weight_g": (1, 1, 1, 1), f"discriminators.{k}.conv_post.bias": (1,)}
    return shapes


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_discriminator_loads_rvc_layout_strictly(version: str) -> None:
    layout = rvc_discriminator_layout(version)
    with torch.device("meta"):
        model = MultiPeriodDiscriminator(version)
        model.load_state_dict({k: torch.empty(v) for k, v in layout.items()}, strict=True, assign=True)
    d = model.discriminators
    assert sum(p.numel() for p in d[0].parameters()) == 5_641_362  # spec §4.6
    assert sum(p.numel() for p in d[1].parameters()) == 8_221_154
    assert [m.period for m in d[1:]] == ([2, 3, 5, 7, 11, 17] + ([23, 37] if version == "v2" else []))


def test_discriminator_from_file_reads_its_layout(tmp_path: Path) -> None:
    narrow = MultiPeriodDiscriminator("v2", width_div=16)
    randomize_(narrow, seed=1)
    torch.save({"model": narrow.state_dict()}, tmp_path / "D.pth")
    loaded = load_discriminator(tmp_path / "D.pth")
    assert loaded.version == "v2" and len(loaded.discriminators) == 9
    y, y_hat = torch.randn(1, 1, 401), torch.randn(1, 1, 401)  # 401: every period pads
    for a, b in zip(narrow(y, y_hat)[0], loaded(y, y_hat)[0], strict=True):
        torch.testing.assert_close(a, b)
    bad = {k: v for k, v in narrow.state_dict().items() if not k.startswith("discriminators.8.")}
    with pytest.raises(CheckpointError, match="8 sub-discriminators"):
        discriminator_from_state_dict(bad)


@pytest.mark.parametrize(("version", "sr"), sorted(VARIANTS))
@pytest.mark.parametrize("f0", [True, False])
def test_pretrained_config_is_recognised_from_shapes(version: str, sr: int, f0: bool) -> None:
    v = VARIANTS[(version, sr)]
    cfg = SynthConfig.from_list([v.spec_channels, 32, 192, 192, 768, 2, 6, 3, 0, "1", [3, 7, 11], [[1, 3, 5]] * 3,
                                 list(v.upsample_rates), 512, list(v.upsample_kernel_sizes), 109, 256, sr],
                                version=version, f0=f0)
    with torch.device("meta"):
        state = build_synthesizer(cfg).state_dict()
    assert infer_base_config(state) == cfg
    p = train_params(cfg)
    assert (p.n_fft, p.hop, p.n_mels, p.segment_samples) == (2 * v.spec_channels - 2, sr // 100, v.n_mels,
                                                             v.segment_samples)


def test_pretrained_base_without_config_and_without_enc_q(assets: dict[str, Path], tmp_path: Path) -> None:
    sd = torch.load(assets["base"], weights_only=True)["model"]
    torch.save({"model": sd}, tmp_path / "f0G.pth")  # RVC's layout, but the tiny shapes are no shipped variant
    with pytest.raises(CheckpointError, match="pass the config explicitly"):
        load_pretrained_base(tmp_path / "f0G.pth")
    base = load_pretrained_base(tmp_path / "f0G.pth", TINY)
    assert base.model.enc_q is not None and base.config == TINY
    with pytest.raises(CheckpointError, match=r"served\.pth: has no posterior encoder \(enc_q"):
        load_pretrained_base(assets["served"])
    with pytest.raises(CheckpointError, match="posterior encoder"):
        run_train(assets["work"], assets["served"], tmp_path / "x.safetensors", discriminator=assets["D"],
                  segment_frames=8)


# --- training ---------------------------------------------------------------------------------------------------


def test_only_lora_trains_and_the_base_stays_bit_identical(assets: dict[str, Path], work: Path) -> None:
    job = train(assets, work, work / "voice.safetensors")
    before = {k: v.clone() for k, v in base_state_dict(job.model.base).items()}
    lora_before = {k: v.clone() for k, v in job.model.get_lora_state_dict().items()}
    assert {id(p) for p in job.model.parameters() if p.requires_grad} == {id(p) for p in job.gan.g_params}
    result = job.fit(2, save_every=1, progress=False)
    after = base_state_dict(job.model.base)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    lora_after = job.model.get_lora_state_dict()
    assert all(not torch.equal(lora_before[k], lora_after[k]) for k in lora_after)  # every A and B moved
    info = PreparedInfo.read(work)
    per_epoch = len(BucketBatchSampler(SegmentDataset(info.training_items(), True, 80).lengths(), 2))
    assert result.epochs == 2 and result.steps == 2 * per_epoch
    assert result.trainable_parameters == sum(v.numel() for v in lora_after.values())
    lines = [json.loads(ln) for ln in result.log.read_text().splitlines()]
    assert [ln["step"] for ln in lines] == list(range(1, result.steps + 1))
    assert {"loss_g", "loss_d", "loss_mel", "loss_kl", "loss_fm", "loss_adv", "lr", "steps_per_s"} <= lines[0].keys()
    assert lines[-1]["lr"] == pytest.approx(1e-4 * 0.999875)  # ExponentialLR, stepped once per epoch
    assert [p.name for p in result.samples] == ["voice_e0001.wav", "voice_e0002.wav"]
    audio, sr = sf.read(result.samples[0])
    frames = SegmentDataset(info.segments[:1], True, 80)[0].phone.shape[0]
    assert sr == SR and len(audio) == frames * 80 and np.abs(audio).max() > 0
    assert (work / "checkpoints" / "voice_e0001.safetensors").is_file() and result.state.is_file()
    assert "2 epochs, " in str(result) and "loss_mel" in str(result)


def test_trained_adapter_loads_into_the_served_base(assets: dict[str, Path], work: Path) -> None:
    job = train(assets, work, work / "voice.safetensors", rank=4, alpha=8)
    result = job.fit(1, progress=False)
    adapter = load_adapter(result.adapter)
    assert (adapter.info.r, adapter.info.sr, adapter.info.version, adapter.info.f0) == (4, SR, "v1", True)
    served = load_synthesizer_with_lora(assets["served"], adapter_layout(adapter.info).lora)
    served.load_adapter(result.adapter)
    inputs = (torch.randn(1, 20, 256), torch.tensor([20]), torch.randint(1, 256, (1, 20)),
              torch.full((1, 20), 150.0), torch.tensor([0]))
    outs = []
    for model in (served, job.model.eval()):
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(model.infer(*inputs)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    served.reset_adapter()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(served.infer(*inputs)[0], outs[0])  # the adapter changes the voice


def test_full_deltas_train_with_the_lora_and_travel_in_the_adapter(assets: dict[str, Path], work: Path) -> None:
    job = train(assets, work, work / "voice.safetensors", rank=4, alpha=8, full_delta=True, b_lr_ratio=4.0)
    a_group, b_group, full_group = job.gan.opt_g.param_groups
    assert b_group["lr"] == pytest.approx(a_group["lr"] * 2 * 4)  # scale alpha/r = 2, then B's ratio
    assert full_group["weight_decay"] == 0  # decay would shrink the base's own biases, not their delta
    trained = {id(p) for p in full_group["params"]}
    before = {n: p.detach().clone() for n, p in job.model.base.named_parameters() if id(p) in trained}
    assert any(n.endswith(".bias") for n in before) and "emb_g.weight" in before
    result = job.fit(1, progress=False)
    adapter = load_adapter(result.adapter)
    assert "emb_g.weight" in adapter.info.full_delta and adapter.info.target_modules
    moved = {n for n, p in job.model.base.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert moved and all(bool(adapter.tensors[f"full_delta.{n.replace('.base.', '.')}"].any()) for n in moved)
    served = load_synthesizer_with_lora(assets["served"], adapter_layout(adapter.info).lora)
    served.load_adapter(result.adapter)  # the served base + adapter is the trained model
    inputs = (torch.randn(1, 20, 256), torch.tensor([20]), torch.randint(1, 256, (1, 20)),
              torch.full((1, 20), 150.0), torch.tensor([0]))
    outs = []
    for model in (served, job.model.eval()):
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(model.infer(*inputs)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_resume_is_exact(assets: dict[str, Path], tmp_path: Path) -> None:
    runs = {}
    for name in ("once", "split"):
        work = Path(shutil.copytree(assets["work"], tmp_path / name))
        out = work / "voice.safetensors"
        if name == "split":
            train(assets, work, out).fit(2, save_every=5, progress=False)  # stops after 2 (saves at its end)
            result = train(assets, work, out).fit(4, save_every=5, resume=True, progress=False)
        else:
            result = train(assets, work, out).fit(4, save_every=5, progress=False)
        runs[name] = (result, load_file(out), torch.load(result.state, weights_only=True))
    (once, a_once, s_once), (split, a_split, s_split) = runs["once"], runs["split"]
    assert split.steps == once.steps and split.epochs == 4
    assert a_once.keys() == a_split.keys() and all(torch.equal(a_once[k], a_split[k]) for k in a_once)
    d_once, d_split = s_once["discriminator"], s_split["discriminator"]
    assert all(torch.equal(d_once[k], d_split[k]) for k in d_once)
    logs = [[{k: v for k, v in json.loads(ln).items() if k != "steps_per_s"} for ln in r.log.read_text().splitlines()]
            for r in (once, split)]
    assert len(logs[0]) == once.steps and logs[0] == logs[1]  # the same losses, step for step


def test_resume_refuses_other_settings(assets: dict[str, Path], work: Path) -> None:
    train(assets, work, work / "v.safetensors").fit(1, progress=False)
    with pytest.raises(TrainingStateError, match=f"rank={DEFAULT_TRAIN_RANK}, this run has 4"):
        train(assets, work, work / "v.safetensors", rank=4).fit(2, resume=True, progress=False)


def test_prepared_data_must_fit_the_base(assets: dict[str, Path], work: Path, tmp_path: Path) -> None:
    other = TINY.replace(spec_channels=129)
    torch.save({"model": build_synthesizer(other, with_posterior=True).state_dict(), "config": other.to_list(),
                "version": "v1", "f0": 1}, tmp_path / "other.pth")
    with pytest.raises(TrainingDataError, match="prepare again"):
        LoRATraining.create(work, tmp_path / "other.pth", tmp_path / "v.safetensors", segment_frames=8)


def mel_curve(result_log: Path) -> np.ndarray:
    return np.array([json.loads(ln)["loss_mel"] for ln in result_log.read_text().splitlines()])


def test_losses_go_down_fast(assets: dict[str, Path], work: Path) -> None:
    result = train(assets, work, work / "v.safetensors", lr=1e-3).fit(12, save_every=100, progress=False)
    mel = mel_curve(result.log)  # 12 epochs x 3 batches
    assert mel[-6:].mean() < 0.9 * mel[:6].mean()


@pytest.mark.slow
def test_losses_go_down_over_a_few_hundred_steps(assets: dict[str, Path], work: Path,
                                                 request: pytest.FixtureRequest) -> None:
    if "slow" not in str(request.config.getoption("markexpr")) and not os.environ.get("RVC_LORA_SLOW"):
        pytest.skip("300 steps (~30 s on 2 cores): run with -m slow or RVC_LORA_SLOW=1")
    result = train(assets, work, work / "v.safetensors").fit(100, save_every=100, progress=False)  # RVC's lr
    log = [json.loads(ln) for ln in result.log.read_text().splitlines()]
    assert len(log) >= 300
    for key in ("loss_mel", "loss_g", "loss_d"):
        values = np.array([x[key] for x in log])
        assert values[-50:].mean() < 0.95 * values[:50].mean(), key


def test_sampler_rejects_an_all_short_dataset(assets: dict[str, Path], work: Path) -> None:
    manifest = json.loads((work / "dataset.json").read_text())
    for s in manifest["segments"]:
        s["samples"] = 100
    manifest["mute"] = None
    (work / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainingDataError, match="nothing to train on"):
        train(assets, work, work / "v.safetensors").fit(1, progress=False)


def test_synthesizer_lora_type_is_what_the_service_uses(assets: dict[str, Path], work: Path) -> None:
    job = train(assets, work, work / "v.safetensors")
    assert isinstance(job.model, SynthesizerLoRA) and job.model.fingerprint == load_pretrained_base(
        assets["base"]).fingerprint
    assert job.model.base.segment_size == 8 and job.gan.params.n_mels == 40


def test_voice_index_is_built_from_the_prepared_features(work: Path, tmp_path: Path) -> None:
    from rvc_lora.pipeline.index import RetrievalIndex
    from rvc_lora.train.data import PreparedInfo
    from rvc_lora.train.voice_index import build_voice_index

    info = PreparedInfo.read(work)
    frames = sum(len(np.load(ref.path)["phone"]) for ref in info.segments)
    path = build_voice_index(work, tmp_path / "voice.safetensors")
    assert path == tmp_path / "voice.index"
    index = RetrievalIndex.from_path(path)
    assert index.ntotal == frames and index.dim == (768 if info.version == "v2" else 256)
