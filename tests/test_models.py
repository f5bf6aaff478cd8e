"""Synthesizer building blocks and the properties rvc_spec §1 states (shapes, keys, draws, slicing)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from rvc_lora.config import SynthConfig
from rvc_lora.errors import ConfigError, ParameterError
from rvc_lora.models.generator import Generator, GeneratorNSF
from rvc_lora.models.nsf import SineGen
from rvc_lora.models.resblock import ResBlock1, ResBlock2
from rvc_lora.models.synthesizer import SYNTHESIZER_CLASSES, build_synthesizer, check_sid
from tests.conftest import DECODERS, randomize_, run_infer, tiny_config, tiny_inputs, tiny_model

FULL = {  # spec §1.1: (upsample_rates, kernels, sr, spec_channels)
    ("v1", "32k"): ([10, 4, 2, 2, 2], [16, 16, 4, 4, 4], 32000, 513),
    ("v1", "40k"): ([10, 10, 2, 2], [16, 16, 4, 4], 40000, 1025),
    ("v1", "48k"): ([10, 6, 2, 2, 2], [16, 16, 4, 4, 4], 48000, 1025),
    ("v2", "32k"): ([10, 8, 2, 2], [20, 16, 4, 4], 32000, 513),
    ("v2", "40k"): ([10, 10, 2, 2], [16, 16, 4, 4], 40000, 1025),
    ("v2", "48k"): ([12, 10, 2, 2], [24, 20, 4, 4], 48000, 1025),
}


def full_config(version: str, sr: str, f0: bool = True) -> SynthConfig:
    rates, kernels, hz, spec = FULL[(version, sr)]
    return SynthConfig.from_list([spec, 32, 192, 192, 768, 2, 6, 3, 0, "1", [3, 7, 11], [[1, 3, 5]] * 3, rates, 512,
                                  kernels, 109, 256, hz], version=version, f0=f0)


@pytest.mark.parametrize("block", [ResBlock1(8, 3, (1, 3, 5)), ResBlock2(8, 3, (1, 3))], ids=["rb1", "rb2"])
def test_resblock_shapes_mask_and_weight_norm_removal(block: torch.nn.Module) -> None:
    randomize_(block)
    x, mask = torch.randn(2, 8, 40), torch.ones(2, 1, 40)
    mask[1, :, 25:] = 0
    y = block(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    assert torch.count_nonzero(block(x, mask)[1, :, 25:]) == 0  # masked frames stay zero
    assert any(k.endswith("weight_g") for k in block.state_dict())
    block.remove_weight_norm()  # type: ignore[operator]
    assert not any(k.endswith(("weight_g", "weight_v")) for k in block.state_dict())
    torch.testing.assert_close(block(x), y, atol=1e-5, rtol=1e-5)


def test_resblock1_has_three_paths_with_dilation_one_second_convs() -> None:
    block = ResBlock1(4, 5, (1, 3, 5))
    assert [c.dilation[0] for c in block.convs1] == [1, 3, 5]
    assert [c.dilation[0] for c in block.convs2] == [1, 1, 1]
    assert [c.padding[0] for c in block.convs1] == [2, 6, 10]


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("resblock", ["1", "2"])
def test_generators_upsample_by_prod_rates(decoder: str, resblock: str) -> None:
    rates, kernels, sr = DECODERS[decoder]
    rb = ([3, 7], [[1, 3, 5]] * 2) if resblock == "1" else ([3, 5], [[1, 2], [2, 6]])
    args = (6, resblock, rb[0], rb[1], rates, 32, kernels, 8)
    x, g, f0 = torch.randn(1, 6, 9), torch.randn(1, 8, 1), torch.full((1, 9), 150.0)
    upp = math.prod(rates)
    assert Generator(*args)(x, g).shape == (1, 1, 9 * upp)
    nsf = GeneratorNSF(*args, sr=sr)
    assert nsf(x, f0, g).shape == (1, 1, 9 * upp)
    assert nsf(x, f0, g, n_res=12).shape == (1, 1, 12 * upp)
    assert len(nsf.resblocks) == len(rates) * 2


@pytest.mark.parametrize(("version", "sr", "f0", "full_keys", "inference_keys"), [
    ("v2", "40k", True, 560, 457), ("v2", "40k", False, 549, 446),
    ("v1", "32k", True, 619, 516), ("v1", "48k", False, 606, 503),
])
def test_full_size_state_dict_matches_rvc(version: str, sr: str, f0: bool, full_keys: int,
                                          inference_keys: int) -> None:
    with torch.device("meta"):
        model = build_synthesizer(full_config(version, sr, f0))
    state = model.state_dict()
    inference = {k: v for k, v in state.items() if not k.startswith("enc_q.")}
    assert (len(state), len(inference)) == (full_keys, inference_keys)
    if (version, sr, f0) == ("v2", "40k", True):
        assert sum(v.numel() for v in state.values()) == 36_458_818
        assert sum(v.numel() for v in inference.values()) == 27_537_346
        assert state["dec.ups.0.weight_g"].shape == (512, 1, 1)  # weight norm over the input channel
        assert state["dec.noise_convs.0.weight"].shape == (256, 1, 80)
        assert "dec.conv_post.bias" not in state
        assert state["enc_p.encoder.attn_layers.0.emb_rel_k"].shape == (1, 21, 96)
        assert [k.split(".")[0] for k in state][::100][:2] == ["dec", "dec"]
    first = next(iter(state)).split(".")[0]
    assert first == ("enc_p" if version == "v1" else "dec")  # v2 re-registers enc_p last, as RVC


class DrawRecorder(TorchFunctionMode):
    """Records every call that draws from torch's global generator, with its shape."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[tuple[str, tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in ("randn_like", "rand", "randn", "rand_like", "normal_", "uniform_"):
            self.draws.append((name, tuple(out.shape)))
        return out


def test_streaming_draw_shapes_match_spec_example() -> None:
    """spec §1.4: T=57, skip_head=30, return_length=20, return_length2=25 at 40k."""
    model = build_synthesizer(full_config("v2", "40k"), with_posterior=False).eval()
    inputs = tiny_inputs(model, frames=57)
    with DrawRecorder() as rec:
        audio, x_mask, (z, z_p, m_p, _) = run_infer(model, inputs, skip_head=torch.tensor([30]),
                                                    return_length=torch.tensor([20]),
                                                    return_length2=torch.tensor([25]))
    assert rec.draws == [("randn_like", (1, 192, 51)), ("rand", (1, 1, 1)), ("randn_like", (1, 8000, 1))]
    assert audio.shape == (1, 1, 10000)
    assert z.shape[-1] == x_mask.shape[-1] == 20 and z_p.shape[-1] == m_p.shape[-1] == 51


def test_streaming_needs_both_arguments_and_nono_draws_once() -> None:
    model = tiny_model(f0=False)
    inputs = tiny_inputs(model, frames=30)
    plain = run_infer(model, inputs)[0]
    torch.testing.assert_close(run_infer(model, inputs, skip_head=5)[0], plain, atol=0, rtol=0)
    with DrawRecorder() as rec:
        out = run_infer(model, inputs, skip_head=5, return_length=10)[0]
    assert rec.draws == [("randn_like", (1, 6, 30))] and out.shape[-1] == 10 * model.cfg.upp


@pytest.mark.parametrize("f0", [True, False])
def test_infer_is_deterministic_and_n_res_equal_to_length_is_identity(f0: bool) -> None:
    model = tiny_model(f0=f0, seed=3)
    inputs = tiny_inputs(model)
    a, b = run_infer(model, inputs, seed=5)[0], run_infer(model, inputs, seed=5)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, run_infer(model, inputs, seed=6)[0])
    torch.testing.assert_close(run_infer(model, inputs, seed=5, return_length2=12)[0], a, atol=0, rtol=0)
    assert a.abs().max() < 1  # tanh-bounded


def test_remove_weight_norm_keeps_output_and_renames_keys() -> None:
    model = tiny_model(seed=4, with_posterior=True)
    inputs = tiny_inputs(model)
    before = run_infer(model, inputs)[0]
    model.remove_weight_norm()
    assert not any("weight_g" in k for k in model.state_dict())
    torch.testing.assert_close(run_infer(model, inputs)[0], before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sid", [3, -1])
def test_sid_out_of_range_is_a_parameter_error(sid: int) -> None:
    with pytest.raises(ParameterError, match=rf"sid: {sid} is out of range, the model has 3 speaker\(s\)"):
        check_sid(sid, tiny_model().cfg.spk_embed_dim)
    assert check_sid(2, 3) == 2


class _Watched(torch.Tensor):
    """A sid tensor that records every operation applied to it (reading it on the host would wait for the
    device)."""

    ops: list[str] = []

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        cls.ops.append(getattr(func, "__name__", str(func)))
        with torch._C.DisableTorchFunctionSubclass():  # results are plain tensors: only sid itself is watched
            return func(*args, **(kwargs or {}))


def test_the_forward_never_reads_sid_back() -> None:
    """The forward only looks sid up in the speaker table: no comparison, `.item()` or `bool()` of it."""
    model = tiny_model()
    inputs = tiny_inputs(model)
    _Watched.ops = []
    inputs["sid"] = inputs["sid"].as_subclass(_Watched)
    run_infer(model, inputs)
    assert _Watched.ops == ["embedding"]


@pytest.mark.parametrize("variant", ["A", "B"])
def test_sinegen_phase_starts_at_f0_over_sr_and_variants_agree(variant: str) -> None:
    sr, upp, f = 40000, 400, 220.0
    gen = SineGen(sr, variant=variant)  # type: ignore[arg-type]
    torch.manual_seed(0)
    f0 = torch.full((1, 50), f)
    excitation, uv, noise = gen(f0, upp)
    sine = (excitation - noise)[0, :, 0].double().numpy()
    n = np.arange(1, 50 * upp + 1)
    np.testing.assert_allclose(sine, 0.1 * np.sin(2 * np.pi * f * n / sr), atol=2e-5)
    assert bool(uv.all())


def test_sinegen_unvoiced_is_noise_with_rvc_amplitude() -> None:
    torch.manual_seed(0)
    excitation, uv, _ = SineGen(40000)(torch.zeros(1, 100), 400)
    assert not bool(uv.any())
    assert abs(float(excitation.std()) - 0.1 / 3) < 1e-3


def test_training_forward_slices_segments() -> None:
    model = tiny_model(with_posterior=True)
    model.train()
    model.segment_size = 4
    inputs = tiny_inputs(model, frames=12)
    spec = torch.randn(2, 17, 12)
    out = model(inputs["phone"].repeat(2, 1, 1), torch.tensor([12, 10]), inputs["pitch"].repeat(2, 1),
                inputs["nsff0"].repeat(2, 1), spec, torch.tensor([12, 10]), torch.tensor([0, 2]))
    audio, ids, x_mask, y_mask, (z, z_p, m_p, logs_p, m_q, logs_q) = out
    assert audio.shape == (2, 1, 4 * model.cfg.upp)
    assert ids.dtype == torch.long and bool((ids <= torch.tensor([8, 6])).all())
    assert z.shape == z_p.shape == m_q.shape == (2, 6, 12) and y_mask[1, 0, 10:].sum() == 0


def test_training_forward_without_posterior_explains() -> None:
    model = tiny_model(f0=False, with_posterior=False)
    with pytest.raises(ConfigError, match="enc_q"):
        model(torch.randn(1, 12, 768), torch.tensor([12]), torch.randn(1, 17, 12), torch.tensor([12]),
              torch.tensor([0]))


def test_constructors_accept_rvc_positional_config_and_is_half() -> None:
    cfg = tiny_config("v1", True)
    for (version, f0), cls in SYNTHESIZER_CLASSES.items():
        model = cls(*cfg.to_list(), is_half=False)
        assert (model.cfg.version, model.cfg.f0) == (version, f0)
        assert model.enc_p.emb_phone.in_features == (256 if version == "v1" else 768)
        assert (model.enc_p.emb_pitch is not None) == f0
