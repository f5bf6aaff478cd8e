"""Data-aware extraction (`rvc_lora.calibration`): the weighted factorization on small known cases, the conv
patches against torch's conv, the covariances a model's run collects, and extraction with calibration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rvc_lora.calibration import (
    collect_input_covariances,
    conv_patches,
    output_error,
    prepared_inputs,
    weighted_factorize,
)
from rvc_lora.checkpoint import RawCheckpoint, base_fingerprint
from rvc_lora.errors import ConfigError
from rvc_lora.extract import extract_adapter, extraction_layout, factorize, folded_weights, make_synthetic_voice
from rvc_lora.train.errors import TrainingDataError
from tests.conftest import tiny_inputs, tiny_model


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def covariance(n: int, rank: int, seed: int) -> torch.Tensor:
    """A PSD `[n, n]` of the given rank with a spread spectrum, as real activations have."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, rank, dtype=torch.float64)
    return x @ x.T


def optimum(delta: torch.Tensor, cov: torch.Tensor, k: int) -> float:
    """The least output error of any rank-k W: the trailing eigenvalues of `M C M^T` (Eckart-Young)."""
    power = torch.linalg.eigvalsh(delta.double() @ cov @ delta.double().T).flip(0).clamp_min(0)
    return float(power[k:].sum())


@pytest.mark.parametrize("shape", [(6, 20), (20, 6)])  # wide: the [rows, rows] route; tall: through C^1/2
def test_identity_covariance_is_the_plain_svd(shape: tuple[int, int]) -> None:
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    fit = weighted_factorize(delta, torch.eye(shape[1]), rank=3, energy=None)
    assert fit is not None
    b, a, kept = fit
    b0, a0, kept0 = factorize(delta, 3, None)
    torch.testing.assert_close(b @ a, b0 @ a0, atol=1e-5, rtol=1e-5)
    assert kept == pytest.approx(kept0, abs=1e-9)


@pytest.mark.parametrize("shape, cov_rank", [((6, 20), 20), ((6, 20), 4), ((20, 6), 6), ((20, 6), 3)])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_never_worse_than_svd_on_the_output_error_and_optimal(shape: tuple[int, int], cov_rank: int, k: int) -> None:
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(k))
    cov = covariance(shape[1], cov_rank, seed=k)
    fit = weighted_factorize(delta, cov, rank=k, energy=None)
    assert fit is not None
    b, a, _ = fit
    b0, a0, _ = factorize(delta, k, None)
    weighted, plain = output_error(delta, b @ a, cov), output_error(delta, b0 @ a0, cov)
    assert weighted <= plain * (1 + 1e-6) + 1e-9
    assert weighted == pytest.approx(optimum(delta, cov, k), rel=1e-4, abs=1e-8)
    assert a.shape[0] <= k and torch.linalg.matrix_norm(b @ a, 2) <= torch.linalg.matrix_norm(delta, 2) * (1 + 1e-5)


def test_inputs_on_rows_weights_the_row_side() -> None:
    """ConvTranspose1d: the error is ||X^T (M - W)||, i.e. the cols-side problem on M^T."""
    delta = torch.randn(5, 24, generator=torch.Generator().manual_seed(3))
    cov = covariance(5, 5, seed=3)
    fit = weighted_factorize(delta, cov, rank=2, energy=None, inputs_on_rows=True)
    assert fit is not None
    b, a, _ = fit
    assert b.shape == (5, 2) and a.shape == (2, 24)
    b0, a0, _ = factorize(delta, 2, None)
    err = output_error(delta.T, (b @ a).T, cov)
    assert err <= output_error(delta.T, (b0 @ a0).T, cov) + 1e-9
    assert err == pytest.approx(optimum(delta.T, cov, 2), rel=1e-4)


def test_energy_counts_output_error_and_unseen_deltas_fall_back() -> None:
    delta = torch.zeros(4, 6)
    delta[0, 0], delta[1, 1], delta[2, 5] = 3.0, 2.0, 100.0  # the big one is on an input that never varies
    cov = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    fit = weighted_factorize(delta, cov, rank=None, energy=0.6)
    assert fit is not None
    b, a, kept = fit
    assert a.shape[0] == 1 and kept == pytest.approx(9 / 13)  # 9 of 9 + 4 output energy in one direction
    assert weighted_factorize(delta, torch.zeros(6, 6), rank=2, energy=None) is None
    with pytest.raises(ConfigError):
        weighted_factorize(delta, torch.eye(5), rank=2, energy=None)


@pytest.mark.parametrize("k, stride, pad, dil", [(1, 1, 0, 1), (3, 1, 1, 1), (5, 1, 6, 3), (4, 2, 1, 1)])
def test_conv_patches_are_what_the_weight_multiplies(k: int, stride: int, pad: int, dil: int) -> None:
    conv = torch.nn.Conv1d(3, 4, k, stride=stride, padding=pad, dilation=dil, bias=False)
    x = torch.randn(2, 3, 17)
    y = conv(x)  # [2, 4, T_out]
    patches = conv_patches(x, conv)  # [2 * T_out, 12]
    expected = y.permute(0, 2, 1).reshape(-1, 4)
    torch.testing.assert_close(patches @ conv.weight.reshape(4, -1).T, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError):
        conv_patches(x, torch.nn.Conv1d(3, 3, 3, groups=3))


def test_collected_covariances_are_the_layers_inputs() -> None:
    model = tiny_model(seed=0)
    layers, _ = extraction_layout(model.cfg, "all")
    seen: dict[str, torch.Tensor] = {}
    target = "enc_p.emb_phone"
    handle = model.get_submodule(target).register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    clip = tiny_inputs(model, frames=10)
    covs = collect_input_covariances(model, layers, [clip])
    handle.remove()
    x = seen["x"].reshape(-1, seen["x"].shape[-1]).double()
    torch.testing.assert_close(covs[target], x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)  # fp32 products
    up = model.dec.ups[0]
    assert covs["dec.ups.0"].shape == (up.in_channels, up.in_channels)  # ConvTranspose1d: the rows' side
    conv = model.dec.resblocks[0].convs1[0]
    assert covs["dec.resblocks.0.convs1.0"].shape == (conv.in_channels * conv.kernel_size[0],) * 2
    assert set(covs) == set(layers)  # every layer runs in inference


def raw(model: torch.nn.Module, name: str) -> RawCheckpoint:
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = model.cfg.replace(spk_embed_dim=model.emb_g.num_embeddings)  # type: ignore[operator, union-attr]
    return RawCheckpoint(Path(name), weights, cfg, "", base_fingerprint(weights))


def test_extraction_with_calibration_fits_each_layer_for_its_inputs() -> None:
    base = tiny_model(seed=0)
    voice = make_synthetic_voice(base, rank=8, noise_share=0.5, seed=1)  # not low-rank: the fit must choose
    clips = [tiny_inputs(base, frames=16, seed=s) for s in range(2)]
    plain = extract_adapter(raw(base, "base.pth"), raw(voice, "voice.pth"), rank=2, evaluate=False, progress=False,
                            method="svd")
    aware = extract_adapter(raw(base, "base.pth"), raw(voice, "voice.pth"), rank=2, evaluate=False, progress=False,
                            calibration=clips)
    assert any("data-aware" in n for n in aware.report.notes) and not plain.report.notes
    assert aware.adapter.info.target_modules == plain.adapter.info.target_modules
    layers, _ = extraction_layout(base.cfg, "all")
    covs = collect_input_covariances(voice, layers, clips)
    wb, wv = folded_weights(base.state_dict()), folded_weights(voice.state_dict())
    better = 0
    for layer in ("enc_p.emb_phone", "dec.conv_pre", "dec.resblocks.1.convs2.2", "flow.flows.0.enc.in_layers.0"):
        w = wb[f"{layer}.weight"]
        delta = (wv[f"{layer}.weight"] - w).reshape(w.shape[0], -1)

        def err(result: object, layer: str = layer, delta: torch.Tensor = delta) -> float:
            t = result.adapter.tensors  # type: ignore[attr-defined]
            approx = t[f"{layer}.lora_B"].float() @ t[f"{layer}.lora_A"].float()
            return output_error(delta, approx, covs[layer])

        assert err(aware) <= err(plain) * (1 + 1e-3)  # fp16 storage: within rounding
        better += err(aware) < err(plain) * 0.99
    assert better >= 2


def test_prepared_inputs_needs_a_prepare_folder(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match=str(tmp_path)):
        prepared_inputs(tmp_path)


def test_data_aware_is_the_default_and_needs_no_speech() -> None:
    base = tiny_model(seed=0)
    voice = make_synthetic_voice(base, rank=8, noise_share=0.5, seed=1)
    result = extract_adapter(raw(base, "base.pth"), raw(voice, "voice.pth"), rank=2, evaluate=False, progress=False)
    assert any("synthetic input" in n for n in result.report.notes)
    svd = extract_adapter(raw(base, "base.pth"), raw(voice, "voice.pth"), rank=2, evaluate=False, progress=False,
                          method="svd")
    a_keys = [k for k in result.adapter.tensors if k.endswith("lora_A")]
    differ = [k for k in a_keys if not torch.equal(result.adapter.tensors[k], svd.adapter.tensors[k])]
    assert len(differ) > len(a_keys) // 2  # most layers are fitted otherwise
    for kwargs, match in (({"method": "pca"}, "method"), ({"method": "svd", "calibration": [{}]}, "calibration"),
                          ({"calibration": []}, "no clips")):
        with pytest.raises(ConfigError, match=match):
            extract_adapter(raw(base, "base.pth"), raw(voice, "voice.pth"), rank=2, **kwargs)  # type: ignore[arg-type]
