"""The decoder's convolutions: `torch.nn`'s results through a channels-last 2-D convolution at CPU inference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rvc_lora.convs import Conv1d, ConvTranspose1d, use_torch_convolutions
from rvc_lora.pipeline.content import build_random_hubert
from tests.conftest import TINY_HUBERT, tiny_model


@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 5, 1), (1, 15, 3), (4, 2, 1)])
def test_conv1d_equals_torch_and_keeps_channels_last(stride: int, padding: int, dilation: int) -> None:
    torch.manual_seed(0)
    ours = Conv1d(6, 5, 11, stride, padding=padding, dilation=dilation)
    stock = nn.Conv1d(6, 5, 11, stride, padding=padding, dilation=dilation)
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 300)
    with torch.inference_mode():
        y = ours(x)
        torch.testing.assert_close(y, stock(x), atol=1e-5, rtol=1e-5)
        assert y.stride(1) == 1 and y.stride(2) == 5  # channels-last: the next conv reads it without a copy
    y = ours(x)  # grad enabled (training): torch's own path, the same numbers
    assert y.is_contiguous() and torch.equal(y, stock(x))


def test_conv_transpose1d_is_bit_identical_to_torch() -> None:
    torch.manual_seed(0)
    ours, stock = ConvTranspose1d(8, 4, 16, 8, padding=4), nn.ConvTranspose1d(8, 4, 16, 8, padding=4)
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(1, 8, 50)
    with torch.inference_mode():
        y = ours(x)
        assert torch.equal(y, stock(x)) and y.stride(1) == 1


def test_the_decoder_is_built_from_them() -> None:
    dec = tiny_model().dec
    kinds = {type(m) for m in dec.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))}
    assert {Conv1d, ConvTranspose1d} <= kinds


def test_the_content_encoder_uses_them_and_a_baseline_can_have_torchs_back() -> None:
    encoder = build_random_hubert(TINY_HUBERT, seed=3)
    x = torch.randn(4000, dtype=torch.float64)
    with torch.inference_mode():
        fast = encoder.extract(x, "v2")
    assert Conv1d in {type(m) for m in encoder.modules()} and nn.Conv1d not in {type(m) for m in encoder.modules()}
    use_torch_convolutions(encoder)
    assert Conv1d not in {type(m) for m in encoder.modules()}
    with torch.inference_mode():
        torch.testing.assert_close(encoder.extract(x, "v2"), fast, atol=1e-5, rtol=1e-5)
