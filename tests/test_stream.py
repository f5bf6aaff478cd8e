"""rvc_lora.stream: RVC's realtime algorithm against the original's reference streams, and its behaviour on
tiny code-made models (sizes, hot changes, reset, seeds, interleaving, channels, rates, gate, SOLA)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rvc_lora import ParameterError, load_synthesizer_with_lora
from rvc_lora.demo import speech_like
from rvc_lora.lora import LoRAConfig
from rvc_lora.pipeline.audio import decode_audio
from rvc_lora.pipeline.content import build_random_hubert
from rvc_lora.pipeline.converter import VoiceConverter
from rvc_lora.stream import StreamConverter, StreamParams, StreamSizes, dsp
from rvc_lora.stream.f0 import CACHE_FRAMES
from tests.conftest import LORA, SHARED_FIXTURES

REALTIME_REFERENCE = SHARED_FIXTURES / "rvc-realtime-reference"
# blocks compared per case; RVC_LORA_FULL_REFERENCE=1 compares every block (~2 min on 2 CPU cores)
REFERENCE_BLOCKS = None if os.environ.get("RVC_LORA_FULL_REFERENCE") else 12
SHORT = StreamParams(block_time=0.1, crossfade_time=0.05, extra_time=0.5, seed=3)


def reference_params(case: dict) -> StreamParams:  # type: ignore[type-arg]
    p = case["params"]
    return StreamParams(block_time=p["block_time"], crossfade_time=p["crossfade_time"], extra_time=p["extra_time"],
                        threshold=p["threshold"], f0_up_key=p["pitch"], formant=p["formant"], f0_method=p["f0method"],
                        index_rate=p["index_rate"], rms_mix_rate=p["rms_mix_rate"], seed=case["torch_seed"])


def test_equals_the_original_realtime_algorithm_on_reference_streams() -> None:
    if not (REALTIME_REFERENCE / "cases.json").is_file():
        pytest.skip(f"RVC realtime reference not found at {REALTIME_REFERENCE}")
    cases = json.loads((REALTIME_REFERENCE / "cases.json").read_text())
    expected = np.load(REALTIME_REFERENCE / "expected.npz")
    audio, sr = decode_audio(REALTIME_REFERENCE / "speech.wav")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the references were made with one thread (two move them by ~3e-6)
    try:
        for case in cases["cases"]:
            model = load_synthesizer_with_lora(REALTIME_REFERENCE / case["model"], LORA)
            vc = VoiceConverter(model, build_random_hubert(None, seed=case["hubert_seed"]), device="cpu")
            stream = StreamConverter(vc, reference_params(case), sr=case["sr"])
            assert {k: getattr(stream.sizes, k) for k in case["derived"]} == case["derived"]
            block = stream.block_frame
            n_blocks = case["n_blocks"] if REFERENCE_BLOCKS is None else min(REFERENCE_BLOCKS, case["n_blocks"])
            assert n_blocks * block <= case["output_samples"]
            x = np.zeros(case["n_blocks"] * block, np.float32)
            x[: len(audio)] = audio
            results = [stream.process(x[i * block : (i + 1) * block]) for i in range(n_blocks)]
            want_off = expected[case["expected"]["offsets"]][:n_blocks]
            np.testing.assert_array_equal([r.offset for r in results], want_off, err_msg=case["name"])
            got = np.concatenate([r.audio for r in results])
            want = expected[case["expected"]["audio"]][: n_blocks * block]
            tol = cases["tolerance"]
            assert np.abs(got - want).max() <= tol["max_abs"], case["name"]
            snr = 10 * np.log10(np.sum(want.astype(np.float64) ** 2) / max(np.sum((got - want) ** 2.0), 1e-30))
            assert snr >= tol["min_snr_db"], case["name"]
    finally:
        torch.set_num_threads(threads)


# --- sizes -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("times", "sr", "tgt_sr", "want"), [
    # spec §6.3 worked example: 40 kHz model, 48 kHz device, 0.25 / 0.05 / 2.5
    ((0.25, 0.05, 2.5), 48000, 40000, {"zc": 480, "block_frame": 12000, "block_frame_16k": 4000,
                                       "crossfade_frame": 2400, "sola_buffer_frame": 1920, "extra_frame": 120000,
                                       "input_wav_len": 134880, "input_wav_res_len": 44960, "skip_head": 250,
                                       "return_length": 30, "f0_window": 4800, "f0_window_rmvpe": 4960}),
    ((0.25, 0.05, 2.5), 40000, 40000, {"zc": 400, "block_frame": 10000, "crossfade_frame": 2000,
                                       "input_wav_len": 112400, "input_wav_res_len": 44960}),
    # second example: 0.15 / 0.08 / 2.0, 48 kHz model, 44.1 kHz device: 4 tail frames
    ((0.15, 0.08, 2.0), 44100, 48000, {"zc": 441, "block_frame": 6615, "block_frame_16k": 2400,
                                       "crossfade_frame": 3528, "sola_buffer_frame": 1764, "extra_frame": 88200,
                                       "skip_head": 200, "return_length": 20, "f0_window": 3200}),
    ((0.125, 0.05, 2.5), 48000, 40000, {"block_frame": 5760}),  # 12.5 frames round half to even: 12
])
def test_derived_sizes_follow_rvc(times: tuple[float, float, float], sr: int, tgt_sr: int, want: dict) -> None:  # type: ignore[type-arg]
    sizes = StreamSizes.derive(StreamParams(*times), sr, tgt_sr)
    assert {k: getattr(sizes, k) for k in want} == want


def test_formant_sizes() -> None:
    sizes = StreamSizes.derive(StreamParams(), 48000, 40000)
    factor, rl2, upp_res = sizes.formant(2.0)
    assert (round(factor, 6), rl2, upp_res) == (1.122462, 34, 448)
    assert sizes.formant(0.0)[1:] == (30, 400)


@pytest.mark.parametrize("sr", [22050, 0, 7900, 44100.0])
def test_rates_that_are_not_multiples_of_100_hz_are_refused(sr: int) -> None:
    with pytest.raises(ParameterError, match="multiple of 100"):
        StreamSizes.derive(StreamParams(), sr, 40000)


def test_params_bounds_and_hot_changes() -> None:
    with pytest.raises(ParameterError, match="block_time"):
        StreamParams(block_time=2.0)
    with pytest.raises(ParameterError, match="f0_method"):
        StreamParams(f0_method="yin")
    with pytest.raises(ParameterError, match="unknown stream parameter"):
        StreamParams.from_dict({"pitch": 3})
    with pytest.raises(ParameterError, match="block_time cannot change mid-stream"):
        StreamParams().with_hot(block_time=0.1)
    assert StreamParams().with_hot(f0_up_key=5, formant=1.0).f0_up_key == 5


# --- signal steps ------------------------------------------------------------------------------------------

def test_resampler_lengths_and_a_sine_passes() -> None:
    r = dsp.SincResampler(48000, 16000)
    t = np.arange(4800) / 48000
    x = torch.from_numpy(np.sin(2 * np.pi * 440 * t).astype(np.float32))
    y = r(x)
    assert y.shape == (1600,) and y.dtype == torch.float32
    ref = np.sin(2 * np.pi * 440 * np.arange(1600) / 16000)
    assert np.abs(y.numpy()[100:-100] - ref[100:-100]).max() < 2e-3  # away from the zero-padded edges
    assert dsp.SincResampler(44100, 16000)(torch.zeros(4410)).shape == (1600,)


def test_gate_zeroes_by_the_nearest_frame_and_regates_the_previous_two() -> None:
    zc, block = 100, 1000
    rng = np.random.default_rng(0)
    buffer = np.zeros(4 * zc, np.float32)
    loud = (0.3 * rng.standard_normal(block)).astype(np.float32)
    first = dsp.noise_gate(loud, buffer, zc, -40)
    assert first.shape == (block + 2 * zc,)
    np.testing.assert_array_equal(buffer, loud[-4 * zc :])  # raw samples kept
    quiet = loud.copy()
    quiet[300:] = 0  # frames centred at >= 500 (output samples, 2 zc ahead) measure nothing but the hole
    out = dsp.noise_gate(quiet, buffer, zc, -40)
    # frame i centred at i*zc measures raw [(i-2) zc, (i+2) zc) and governs samples [i zc - zc/2, i zc + zc/2)
    db = dsp.amplitude_db(dsp.frame_rms(np.concatenate([loud[-4 * zc :], quiet]), 4 * zc, zc)[2:])
    for p in range(0, len(out), 37):
        i = (p + zc // 2) // zc
        assert (out[p] == 0) == (db[i] < -40) or quiet_or_zero(p, quiet, zc)
    assert out[: 2 * zc].any() and not out[-block // 2 :].any()


def quiet_or_zero(p: int, quiet: np.ndarray, zc: int) -> bool:  # a raw zero passes the gate as zero
    return p >= 2 * zc and quiet[p - 2 * zc] == 0


def test_sola_picks_the_first_best_offset() -> None:
    template = torch.zeros(160)
    assert dsp.sola_offset(torch.randn(240), template, 80) == 0  # all scores equal: the first
    sine = torch.sin(2 * torch.pi * torch.arange(400) / 50)  # period 50 samples
    assert dsp.sola_offset(sine[7:], sine[:160], 80) in (43, 93 - 50)
    fade_in, fade_out = dsp.fade_windows(64)
    assert fade_in[0] == 0 and fade_in[-1] == 1 and torch.equal(fade_out, 1 - fade_in)


# --- behaviour on tiny models ------------------------------------------------------------------------------

TINY_LORA = LoRAConfig(r=4, lora_alpha=4, target_modules=["ups", "resblocks"])


@pytest.fixture(scope="module")
def voice(tiny_service_assets: dict[str, Path]) -> VoiceConverter:
    return VoiceConverter.from_files(tiny_service_assets["model"], tiny_service_assets["hubert"], device="cpu",
                                     lora_config=TINY_LORA)


def blocks(stream: StreamConverter, n: int, seed: int = 0, channels: int = 0) -> np.ndarray:
    """n blocks of speech-like input at the stream's rate ([n, block] or [n, block, channels])."""
    x = speech_like(n * stream.block_frame / stream.sr + 0.01, stream.sr, seed=seed)[: n * stream.block_frame]
    x = x.astype(np.float32).reshape(n, stream.block_frame)
    return np.stack([x * (1 - 0.3 * c) for c in range(channels)], axis=-1) if channels else x


def run(stream: StreamConverter, x: np.ndarray) -> tuple[np.ndarray, list[int]]:
    out = [stream.process(b) for b in x]
    return np.stack([r.audio for r in out]), [r.offset for r in out]


def test_seed_decides_the_output_and_the_global_generator_is_untouched(voice: VoiceConverter) -> None:
    x = blocks(StreamConverter(voice, SHORT), 6)
    state = torch.get_rng_state()
    a, _ = run(StreamConverter(voice, SHORT), x)
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = run(StreamConverter(voice, SHORT), x)
    c, _ = run(StreamConverter(voice, StreamParams(**{**SHORT.to_dict(), "seed": 4})), x)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.shape == x.shape and np.isfinite(a).all() and np.abs(a).max() > 0


def test_interleaved_streams_equal_each_stream_alone(voice: VoiceConverter,
                                                     tiny_service_assets: dict[str, list[Path]]) -> None:
    configs = [(SHORT, tiny_service_assets["adapters"][0]),
               (StreamParams(**{**SHORT.to_dict(), "seed": 9, "f0_up_key": 5}), tiny_service_assets["adapters"][1]),
               (StreamParams(**{**SHORT.to_dict(), "rms_mix_rate": 0.5}), None)]
    inputs = [blocks(StreamConverter(voice, SHORT), 5, seed=i) for i in range(3)]
    alone = [run(StreamConverter(voice, p, adapter=a), x)[0] for (p, a), x in zip(configs, inputs, strict=True)]
    streams = [StreamConverter(voice, p, adapter=a) for p, a in configs]
    mixed: list[list[np.ndarray]] = [[], [], []]
    order = [0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 2, 0, 0, 1, 2]
    for i in order:
        mixed[i].append(streams[i].process(inputs[i][len(mixed[i])]).audio)
    for got, want in zip(mixed, alone, strict=True):
        np.testing.assert_array_equal(np.stack(got), want)
    assert not np.allclose(alone[0], alone[2])  # the adapter changes the voice


def test_reset_starts_over(voice: VoiceConverter) -> None:
    stream = StreamConverter(voice, SHORT)
    x = blocks(stream, 4)
    first, offsets = run(stream, x)
    assert stream.f0_cache.pitch.any() and stream.input_wav.any()
    stream.reset()
    assert not stream.f0_cache.pitch.any() and not stream.input_wav.any() and not stream.sola_buffer.any()
    again, offsets_again = run(stream, x)
    np.testing.assert_array_equal(first, again)
    assert offsets == offsets_again


def test_hot_changes_apply_from_the_next_block_and_keep_state(voice: VoiceConverter) -> None:
    plain, changed = StreamConverter(voice, SHORT), StreamConverter(voice, SHORT)
    x = blocks(plain, 6)
    for b in x[:3]:
        np.testing.assert_array_equal(plain.process(b).audio, changed.process(b).audio)
    cache_before = changed.f0_cache.pitchf.clone()
    changed.update(f0_up_key=12, formant=1.0, rms_mix_rate=0.3)
    with pytest.raises(ParameterError, match="extra_time"):
        changed.update(extra_time=1.0)
    a, b = plain.process(x[3]), changed.process(x[3])
    assert not np.allclose(a.audio, b.audio)
    assert changed.blocks == plain.blocks == 4  # no reset
    np.testing.assert_array_equal(changed.input_wav.numpy(), plain.input_wav.numpy())
    # the cache shifted by one block; frames estimated before the change keep their values, except the 2
    # frames each block re-estimates
    shift, n_new = changed.sizes.shift, changed.sizes.f0_window // 160 + 1 - 4
    kept = slice(CACHE_FRAMES - n_new - shift - 10, CACHE_FRAMES - n_new)
    np.testing.assert_array_equal(changed.f0_cache.pitchf[kept].numpy(),
                                  cache_before[shift:][kept.start : kept.stop].numpy())
    voiced = plain.f0_cache.pitchf[-n_new:] > 0
    ratio = changed.f0_cache.pitchf[-n_new:][voiced] / plain.f0_cache.pitchf[-n_new:][voiced]
    assert voiced.any() and torch.allclose(ratio, torch.full_like(ratio, 2 ** (11 / 12)), rtol=1e-4)  # key - formant


def test_gate_switched_on_mid_stream_regates_against_its_empty_buffer(voice: VoiceConverter) -> None:
    plain, gated = StreamConverter(voice, SHORT), StreamConverter(voice, SHORT)
    x = blocks(plain, 3)
    for b in x[:2]:
        plain.process(b)
        gated.process(b)
    gated.update(threshold=-50)  # -50 dB passes this speech
    plain.process(x[2])
    gated.process(x[2])
    # the previous 2 frames are re-gated against the never-filled, all-zero buffer: silent, as RVC's gate
    # does when switched on; all other history is the same
    edge, block = gated.block_frame + 2 * gated.sizes.zc, gated.block_frame
    assert not gated.input_wav[-edge:-block].any() and plain.input_wav[-edge:-block].any()
    np.testing.assert_array_equal(gated.input_wav[:-edge].numpy(), plain.input_wav[:-edge].numpy())
    np.testing.assert_array_equal(gated.input_wav[-block:].numpy(), plain.input_wav[-block:].numpy())


@pytest.mark.parametrize(("sr", "formant"), [(48000, 0.0), (16000, 2.0), (44100, -2.0)])
def test_other_rates_and_formant_give_whole_blocks(voice: VoiceConverter, sr: int, formant: float) -> None:
    stream = StreamConverter(voice, StreamParams(**{**SHORT.to_dict(), "formant": formant}), sr=sr)
    assert stream.block_frame == sr // 10
    out, offsets = run(stream, blocks(stream, 3))
    assert out.shape == (3, sr // 10) and np.isfinite(out).all() and out.any()
    assert all(0 <= o <= sr // 100 for o in offsets)


def test_stereo_is_mixed_to_mono_and_copied_back(voice: VoiceConverter) -> None:
    stereo = StreamConverter(voice, SHORT, channels=2)
    mono = StreamConverter(voice, SHORT)
    x = blocks(mono, 3, channels=2)
    out, _ = run(stereo, x)
    want, _ = run(mono, x.mean(axis=2, dtype=np.float32))
    assert out.shape == x.shape
    np.testing.assert_array_equal(out[..., 0], want)
    np.testing.assert_array_equal(out[..., 1], want)
    with pytest.raises(Exception, match="block must be float32"):
        stereo.process(x[0, :, 0])


def test_convert_emits_every_input_sample(voice: VoiceConverter) -> None:
    stream = StreamConverter(voice, SHORT)
    x = speech_like(0.73, stream.sr, seed=2)
    y = stream.convert(x)
    latency = stream.sizes.latency_samples
    assert len(y) == -(-(len(x) + latency) // stream.block_frame) * stream.block_frame


def test_index_blends_from_the_first_block_it_is_on(voice: VoiceConverter, tmp_path: Path) -> None:
    from rvc_lora.pipeline.index import build_index

    path = build_index(np.random.default_rng(0).standard_normal((400, 256)).astype(np.float32), tmp_path / "v.index")
    off, on, later = (StreamConverter(voice, SHORT, index=path) for _ in range(3))
    on.update(index_rate=0.75)
    x = blocks(off, 4)
    a, _ = run(off, x[:2])
    b, _ = run(on, x[:2])
    c, _ = run(later, x[:2])
    assert not np.allclose(a, b)  # with one IVF list every neighbour exists: the block is blended
    np.testing.assert_array_equal(a, c)
    later.update(index_rate=0.75)  # the index is read now, the stream keeps its state
    assert later.blocks == 2 and not np.allclose(later.process(x[2]).audio, off.process(x[2]).audio)


def test_blocks_of_many_streams_synthesized_as_one_batch_equal_each_stream_alone(
        tiny_service_assets: dict[str, list[Path]]) -> None:
    """The service's path: every stream's `begin`, their `row`s through one `AdapterBank.synthesize` (four voices
    and the base, distinct seeds), then each `finish`; a formant-shifted stream has no row and runs alone."""
    from rvc_lora.voice import AdapterBank

    vc = VoiceConverter.from_files(tiny_service_assets["model"], tiny_service_assets["hubert"], device="cpu",
                                   lora_config=TINY_LORA)
    bank = AdapterBank(vc.model, 4)
    adapters = [*tiny_service_assets["adapters"][:4], None]
    configs = [StreamParams(**{**SHORT.to_dict(), "seed": 10 + i, "f0_up_key": i}) for i in range(5)]
    formant = StreamParams(**{**SHORT.to_dict(), "formant": 1.5})
    inputs = [blocks(StreamConverter(vc, SHORT), 4, seed=i) for i in range(6)]
    alone = [run(StreamConverter(vc, p, adapter=a), x)[0]
             for p, a, x in zip([*configs, formant], [*adapters, None], inputs, strict=True)]
    streams = [StreamConverter(vc, p, adapter=a) for p, a in zip([*configs, formant], [*adapters, None],
                                                                 strict=True)]
    batched: list[list[np.ndarray]] = [[] for _ in streams]
    for b in range(4):
        steps = [s.begin(x[b]) for s, x in zip(streams, inputs, strict=True)]
        rows = [s.row(step) for s, step in zip(streams, steps, strict=True)]
        assert rows[-1] is None and all(r is not None for r in rows[:-1])
        with bank.hold([(str(a), None if a is None else s.adapter) for s, a in zip(streams, adapters, strict=False)]
                       ) as slots:
            audio = bank.synthesize([r for r in rows[:-1] if r is not None], slots)
        for i, (s, step) in enumerate(zip(streams[:-1], steps, strict=False)):
            batched[i].append(s.finish(step, audio[i]).audio)
        batched[-1].append(streams[-1].finish(steps[-1], streams[-1].synthesize(steps[-1])).audio)
    for got, want in zip(batched, alone, strict=True):
        diff = np.abs(np.stack(got) - want).max()
        assert diff <= 1e-5, diff  # 3.6e-7 measured (float order of the padded batch)
    np.testing.assert_array_equal(np.stack(batched[-1]), alone[-1])
    assert not np.allclose(alone[0], alone[1][: len(alone[0])])


def test_streams_sharing_one_content_forward_equal_each_stream_alone(
        tiny_service_assets: dict[str, list[Path]]) -> None:
    """`begin_blocks`: one block of each of six streams (three voices and the base, distinct seeds and keys, one at
    48 kHz: the same 16 kHz history) and a seventh with a longer extra time (a history of its own length) -> two
    content-encoder forwards per round, not seven; each stream's output equals the stream alone."""
    from rvc_lora.stream.converter import begin_blocks

    vc = VoiceConverter.from_files(tiny_service_assets["model"], tiny_service_assets["hubert"], device="cpu",
                                   lora_config=TINY_LORA)
    adapters = [*tiny_service_assets["adapters"][:3], None, None, tiny_service_assets["adapters"][0], None]
    configs = [StreamParams(**{**SHORT.to_dict(), "seed": 20 + i, "f0_up_key": i}) for i in range(6)]
    configs.append(StreamParams(**{**SHORT.to_dict(), "extra_time": 0.7}))
    rates = [16000] * 4 + [48000, 16000, 16000]

    def make() -> list[StreamConverter]:
        return [StreamConverter(vc, p, sr=sr, adapter=a) for p, sr, a in zip(configs, rates, adapters, strict=True)]

    inputs = [blocks(s, 4, seed=i) for i, s in enumerate(make())]
    alone = [run(s, x)[0] for s, x in zip(make(), inputs, strict=True)]
    streams = make()
    forward, forwards = vc.content._forward, []

    def counted(audio: torch.Tensor, *args: object) -> torch.Tensor:
        forwards.append(audio.shape[0])
        return forward(audio, *args)  # type: ignore[arg-type]

    vc.content._forward = counted  # type: ignore[method-assign]
    try:
        shared: list[list[np.ndarray]] = [[] for _ in streams]
        for b in range(4):
            steps = begin_blocks(streams, [x[b] for x in inputs])
            for out, s, step in zip(shared, streams, steps, strict=True):
                out.append(s.finish(step, s.synthesize(step)).audio)
    finally:
        del vc.content._forward
    assert forwards == [6, 1] * 4
    for got, want in zip(shared, alone, strict=True):
        diff = np.abs(np.stack(got) - want).max()
        assert diff <= 1e-5, diff  # 3e-7 measured (float order of the batched forward); the length-1 group: 0
    assert not np.allclose(alone[0], alone[1])
    with pytest.raises(ParameterError, match="streams: a stream appears twice"):
        begin_blocks([streams[0], streams[0]], [inputs[0][0], inputs[0][1]])
    with pytest.raises(ParameterError, match="blocks: 1 blocks for 2 streams"):
        begin_blocks(streams[:2], [inputs[0][0]])
