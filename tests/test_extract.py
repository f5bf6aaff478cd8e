"""SVD extraction of adapters from full voice models: each layer kind, energy ranks, full deltas, mismatched
models, and base + adapter against the full voice end to end."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rvc_lora import (
    AdapterError,
    AdapterMismatchError,
    CheckpointError,
    ConfigError,
    RVCSynthesizer,
    SynthConfig,
    SynthesizerLoRA,
    build_synthesizer,
    load_adapter,
    load_rvc_checkpoint,
    load_synthesizer_with_lora,
    save_rvc_checkpoint,
)
from rvc_lora.checkpoint import RawCheckpoint, base_fingerprint, folded_names
from rvc_lora.extract import (
    extract_adapter,
    extraction_layout,
    factorize,
    folded_weights,
    make_synthetic_voice,
    run_extract,
    snr_db,
)
from rvc_lora.lora import FULL_DELTA_PREFIX
from rvc_lora.voice import adapter_layout, serving_layout
from tests.conftest import randomize_, run_infer, tiny_config, tiny_inputs, tiny_model

V2_40K = [1025, 32, 192, 192, 768, 2, 6, 3, 0, "1", [3, 7, 11], [[1, 3, 5]] * 3, [10, 10, 2, 2], 512,
          [16, 16, 4, 4], 109, 256, 40000]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and on a shared 2-core CPU it costs several times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def raw(model: RVCSynthesizer, name: str) -> RawCheckpoint:
    """An in-memory checkpoint in fp32 (a file would round to fp16 and blur exact-recovery checks)."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = model.cfg.replace(spk_embed_dim=model.emb_g.num_embeddings)
    return RawCheckpoint(Path(name), weights, cfg, "", base_fingerprint(weights))


def copy_of(model: RVCSynthesizer) -> RVCSynthesizer:
    out = build_synthesizer(model.cfg, with_posterior=False)
    out.load_state_dict(model.state_dict())
    return out.eval()


@torch.no_grad()
def set_weight(model: RVCSynthesizer, layer: str, weight: torch.Tensor) -> None:
    """Give a layer a new effective weight, keeping weight norm where it has one."""
    m = model.get_submodule(layer)
    if hasattr(m, "weight_g"):
        m.get_parameter("weight_v").copy_(weight)
        norm = torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.dim())), keepdim=True)
        m.get_parameter("weight_g").copy_(norm)
    else:
        m.get_parameter("weight").copy_(weight)


def low_rank(shape: torch.Size, rank: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = shape[0]
    cols = int(torch.Size(shape[1:]).numel())
    return (torch.randn(rows, rank, generator=gen) @ torch.randn(rank, cols, generator=gen) * scale).view(shape)


@pytest.mark.parametrize(("version", "f0"), [("v1", True), ("v1", False), ("v2", True), ("v2", False)])
def test_layout_covers_every_parameter_and_the_serving_config_fits(version: str, f0: bool) -> None:
    cfg = tiny_config(version, f0)
    layers, full = extraction_layout(cfg, "all")
    with torch.device("meta"):
        names = folded_names(build_synthesizer(cfg, with_posterior=False).state_dict())
    assert sorted({f"{n}.weight" for n in layers} | set(full)) == sorted(names)
    dec_layers, dec_full = extraction_layout(cfg, "dec")
    assert all(n.startswith("dec.") for n in dec_layers + dec_full) and set(dec_layers) < set(layers)
    model = SynthesizerLoRA(build_synthesizer(cfg, with_posterior=False), serving_layout(cfg, 8).lora, max_rank=8)
    assert set(model.slot_ranks()) == set(layers) and model.full_delta_names() == set(full)


def test_full_size_rank8_layout_is_under_a_fifteenth_of_the_pth() -> None:
    """Upper bound of a rank-8 `all` adapter of a v2 40k model (every layer and small tensor changed), from
    shapes alone; `benchmarks/bench_extract.py` measures the real file."""
    cfg = SynthConfig.from_list(V2_40K)
    with torch.device("meta"):
        state = build_synthesizer(cfg, with_posterior=False).state_dict()
    shapes = {n: state[n].shape if n in state else state[f"{n}_v"].shape for n in folded_names(state)}
    layers, full = extraction_layout(cfg, "all")
    low_rank_values = sum(8 * (shapes[f"{n}.weight"][0] + shapes[f"{n}.weight"][1:].numel()) for n in layers)
    full_values = sum(shapes[n].numel() for n in full)
    pth_values = sum(t.numel() for t in state.values())
    assert pth_values / (low_rank_values + full_values) > 15


@pytest.mark.parametrize(("layer", "kind", "rank"), [
    ("dec.ups.0", "ConvTranspose1d", 3),
    ("dec.resblocks.0.convs1.1", "Conv1d", 2),
    ("flow.flows.0.enc.in_layers.0", "Conv1d", 4),
    ("enc_p.encoder.attn_layers.0.conv_q", "Conv1d", 1),
    ("enc_p.emb_phone", "Linear", 3),
])
def test_each_layer_kind_recovers_a_low_rank_delta_exactly(layer: str, kind: str, rank: int) -> None:
    base = tiny_model(seed=0)
    voice = copy_of(base)
    w = folded_weights(base.state_dict())[f"{layer}.weight"]
    delta = low_rank(w.shape, rank, seed=1)
    set_weight(voice, layer, w + delta)
    result = extract_adapter(raw(base, "base"), raw(voice, "voice"), rank=8, targets="all", dtype=torch.float32,
                             evaluate=False)
    info, tensors = result.adapter.info, result.adapter.tensors
    assert (info.target_modules, info.full_delta, info.r) == ((layer,), (), rank)
    a, b = tensors[f"{layer}.lora_A"], tensors[f"{layer}.lora_B"]
    assert a.shape == (rank, w[0].numel()) and b.shape == (w.shape[0], rank)  # ConvTranspose1d: W is [in, out, k]
    torch.testing.assert_close((b @ a).view_as(w), delta, atol=1e-5 * float(delta.abs().max()), rtol=1e-4)
    (row,) = result.report.layers
    assert (row.name, row.kind, row.rank) == (layer, kind, rank) and row.rel_error < 1e-5


@pytest.mark.parametrize(("energy", "rank", "expected"), [
    (0.7, None, 1), (0.9, None, 2), (0.95, None, 3), (0.99, None, 4), (1.0, None, 4), (0.99, 3, 3),
    (None, 2, 2), (None, 8, 4),
])
def test_factorize_picks_the_smallest_rank_keeping_the_energy(energy: float | None, rank: int | None,
                                                              expected: int) -> None:
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 4, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(30, 4, generator=gen))
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])  # energy shares 0.753, 0.941, 0.988, 1
    m = u * s @ v.T
    b, a, kept = factorize(m, rank, energy)
    assert (b.shape, a.shape) == ((12, expected), (expected, 30))
    assert kept == pytest.approx(float((s[:expected] ** 2).sum() / (s**2).sum()), rel=1e-6)
    tail = float((s[expected:] ** 2).sum().sqrt())  # Eckart-Young: the best rank-k error
    assert float((m - b @ a).norm()) == pytest.approx(tail, abs=1e-5)
    torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1))  # sqrt(S) on each side


def test_energy_mode_pads_lower_rank_layers_to_the_files_rank() -> None:
    base = tiny_model(seed=0)
    voice = copy_of(base)
    folded = folded_weights(base.state_dict())
    for layer, rank in (("dec.ups.0", 5), ("dec.resblocks.1.convs2.0", 1)):
        set_weight(voice, layer, folded[f"{layer}.weight"] + low_rank(folded[f"{layer}.weight"].shape, rank, seed=2))
    result = extract_adapter(raw(base, "base"), raw(voice, "voice"), rank=None, energy=0.999999, targets="dec",
                             evaluate=False)
    assert result.adapter.info.r == 5
    assert {x.name: x.rank for x in result.report.layers} == {"dec.ups.0": 5, "dec.resblocks.1.convs2.0": 1}
    a = result.adapter.tensors["dec.resblocks.1.convs2.0.lora_A"]
    b = result.adapter.tensors["dec.resblocks.1.convs2.0.lora_B"]
    assert a.shape[0] == b.shape[1] == 5 and not a[1:].any() and not b[:, 1:].any()
    assert a.dtype == torch.float16


FULL_DELTA_PARAMS = ["dec.ups.1.bias", "enc_p.encoder.norm_layers_1.0.gamma", "enc_p.encoder.norm_layers_2.1.beta",
                     "emb_g.weight", "enc_p.emb_pitch.weight", "dec.m_source.l_linear.weight",
                     "enc_p.encoder.attn_layers.1.emb_rel_k", "dec.conv_post.weight", "dec.noise_convs.0.weight",
                     "flow.flows.2.enc.res_skip_layers.0.bias"]


def test_full_deltas_are_stored_whole_and_applied_exactly() -> None:
    base = tiny_model(seed=0)
    voice = copy_of(base)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in FULL_DELTA_PARAMS:
            p = voice.get_parameter(name)
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    result = extract_adapter(raw(base, "base"), raw(voice, "voice"), targets="all", dtype=torch.float32,
                             evaluate=False)
    info, tensors = result.adapter.info, result.adapter.tensors
    assert info.target_modules == () and sorted(info.full_delta) == sorted(FULL_DELTA_PARAMS)
    for name in FULL_DELTA_PARAMS:
        assert torch.equal(tensors[FULL_DELTA_PREFIX + name], voice.get_parameter(name) - base.get_parameter(name))
    model = SynthesizerLoRA(copy_of(base), adapter_layout(info).lora, fingerprint=info.base_fingerprint)
    model.load_adapter(result.adapter)
    adapted = dict(model.base.named_parameters())
    for name in FULL_DELTA_PARAMS:  # none of them inside a wrapped layer: same names as in the voice
        torch.testing.assert_close(adapted[name], voice.get_parameter(name), atol=1e-7, rtol=0)
    inputs = tiny_inputs(base)
    torch.testing.assert_close(run_infer(model, inputs)[0], run_infer(voice, inputs)[0], atol=1e-5, rtol=1e-4)


def _other(**changes: object) -> RVCSynthesizer:
    cfg = tiny_config().replace(**changes)
    return randomize_(build_synthesizer(cfg, with_posterior=False), seed=1).eval()  # type: ignore[return-value]


@pytest.mark.parametrize(("voice", "match"), [
    (lambda: tiny_model("v1", seed=1), "version is 'v1', the base's is 'v2'"),
    (lambda: tiny_model(f0=False, seed=1), "f0 is False, the base's is True"),
    (lambda: _other(sr=48000), "config.sr is 48000, the base's is 40000"),
    (lambda: _other(filter_channels=24), "config.filter_channels is 24, the base's is 16"),
    (lambda: tiny_model(resblock="2", seed=1), "config.resblock is '2', the base's is '1'"),
    (lambda: _other(spk_embed_dim=5), "the voice has 5 speakers"),
])
def test_mismatched_models_say_what_differs(voice: object, match: str) -> None:
    assert callable(voice)
    with pytest.raises(AdapterMismatchError, match=match):
        extract_adapter(raw(tiny_model(seed=0), "base"), raw(voice(), "voice"), evaluate=False)


def test_missing_key_and_identical_voice_are_refused(tmp_path: Path) -> None:
    base = tiny_model(seed=0)
    base_path = save_rvc_checkpoint(tmp_path / "base.pth", base)
    cpt = torch.load(base_path, weights_only=True)
    del cpt["weight"]["dec.ups.1.bias"]
    torch.save(cpt, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="missing key 'dec.ups.1.bias'"):
        extract_adapter(base_path, tmp_path / "broken.pth")
    with pytest.raises(AdapterError, match="nothing to extract"):
        extract_adapter(base_path, base_path, evaluate=False)


@pytest.mark.parametrize("kwargs", [dict(rank=0), dict(rank=None), dict(energy=1.5), dict(targets="enc_p")])
def test_bad_arguments(kwargs: dict[str, object]) -> None:
    base = raw(tiny_model(seed=0), "base")
    with pytest.raises(ConfigError):
        extract_adapter(base, base, **kwargs)  # type: ignore[arg-type]


def test_a_voice_with_fewer_speakers_keeps_the_bases_extra_rows() -> None:
    base = tiny_model(seed=0)
    voice = build_synthesizer(base.cfg.replace(spk_embed_dim=2), with_posterior=False).eval()
    voice.load_state_dict({**base.state_dict(), "emb_g.weight": base.emb_g.weight[:2] + 0.1}, strict=True)
    result = extract_adapter(raw(base, "base"), raw(voice, "voice"), dtype=torch.float32, targets="all",
                             evaluate=False)
    delta = result.adapter.tensors["full_delta.emb_g.weight"]
    assert delta.shape == base.emb_g.weight.shape and not delta[2:].any()
    torch.testing.assert_close(delta[:2], torch.full_like(delta[:2], 0.1))
    assert "speaker ids >= 2 keep the base's embedding" in result.report.format()


@pytest.fixture(scope="module")
def voice_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("extract")
    base = tiny_model(seed=0)
    voice = make_synthetic_voice(base, rank=8, seed=1)
    return save_rvc_checkpoint(tmp / "base.pth", base), save_rvc_checkpoint(tmp / "voice.pth", voice)


def test_end_to_end_base_plus_adapter_sounds_like_the_voice(voice_files: tuple[Path, Path], tmp_path: Path) -> None:
    base_path, voice_path = voice_files
    result = extract_adapter(base_path, voice_path, rank=8, targets="all", eval_frames=24)
    report = result.report
    assert report.snr_db is not None and report.base_snr_db is not None
    assert report.snr_db >= 30 and report.snr_db > report.base_snr_db + 20
    out = result.save(tmp_path / "voice.safetensors")
    assert out.stat().st_size == report.adapter_bytes == len(result.to_bytes())
    assert report.voice_bytes == voice_path.stat().st_size
    adapter = load_adapter(out)
    assert adapter.info == result.adapter.info and adapter.info.base_fingerprint == load_rvc_checkpoint(
        base_path).fingerprint
    assert all(torch.equal(adapter.tensors[k], t) for k, t in result.adapter.tensors.items())

    voice = load_rvc_checkpoint(voice_path).model
    inputs = tiny_inputs(voice, frames=20)
    expected = run_infer(voice, inputs)[0]
    exact = load_synthesizer_with_lora(base_path, adapter_layout(adapter.info).lora)
    exact.load_adapter(out)
    assert snr_db(expected, run_infer(exact, inputs)[0]) >= 30
    serving = load_synthesizer_with_lora(base_path, serving_layout(voice.cfg, 16).lora, max_rank=16)
    serving.load_adapter(out)  # one resident layout for any extracted adapter
    torch.testing.assert_close(run_infer(serving, inputs)[0], run_infer(exact, inputs)[0], atol=1e-5, rtol=1e-4)
    assert set(serving.slot_ranks()) >= set(adapter.info.target_modules)

    text = report.format()
    assert "waveform SNR" in text and "dec.ups.0" in text and "1/" in text
    assert json.loads(json.dumps(report.to_dict()))["rank"] == 8


def test_dec_targets_touch_the_decoder_only_and_list_the_rest(voice_files: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    base_path, voice_path = voice_files
    report = run_extract(base_path, voice_path, 4, tmp_path / "dec.safetensors", targets="dec")
    info = load_adapter(tmp_path / "dec.safetensors").info
    assert info.r == 4 and info.name == "voice"
    assert all(n.startswith("dec.") for n in info.target_modules + info.full_delta)
    assert report.skipped and not any(n.startswith("dec.") for n in report.skipped)


def test_the_report_travels_in_the_adapter_file(voice_files: tuple[Path, Path], tmp_path: Path) -> None:
    base_path, voice_path = voice_files
    first = run_extract(base_path, voice_path, 2, tmp_path / "a.safetensors", targets="all")
    again = run_extract(base_path, voice_path, 2, tmp_path / "b.safetensors", targets="all")
    data = (tmp_path / "a.safetensors").read_bytes()
    assert data == (tmp_path / "b.safetensors").read_bytes()  # no timings in it: the same id in a store
    assert again.snr_db == first.snr_db and str(voice_path.parent) not in data.decode("latin-1")  # nor paths
    kept = load_adapter(tmp_path / "a.safetensors").info.report()
    assert kept == json.loads(json.dumps(first.summary()))
    assert kept is not None and kept["snr_db"] == first.snr_db and kept["layer_count"] == len(first.layers) > 8
    worst = sorted(first.layers, key=lambda x: x.rel_error, reverse=True)[:8]
    assert [x["name"] for x in kept["worst_layers"]] == [x.name for x in worst]
    assert kept["max_rel_error"] == worst[0].rel_error and first.adapter_bytes == len(data)


def test_synthetic_voice_has_the_asked_delta_shares() -> None:
    base = tiny_model(seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    voice = make_synthetic_voice(base, rank=2, delta_share=0.05, noise_share=0.01, seed=4)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    w_base, w_voice = folded_weights(base.state_dict()), folded_weights(voice.state_dict())
    for key in ("dec.ups.0.weight", "enc_p.emb_phone.weight", "dec.ups.0.bias"):
        share = float((w_voice[key] - w_base[key]).norm() / w_base[key].norm())
        assert share == pytest.approx(0.05, rel=0.01)
    delta = (w_voice["dec.ups.0.weight"] - w_base["dec.ups.0.weight"]).flatten(1)
    s = torch.linalg.svdvals(delta)
    assert float(s[2:].norm() / s.norm()) == pytest.approx(0.01, rel=0.3)  # the noise, beyond rank 2
    again = make_synthetic_voice(base, rank=2, delta_share=0.05, noise_share=0.01, seed=4)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in voice.state_dict().items())
