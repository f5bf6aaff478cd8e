"""The content encoder and the pitch networks batch equal-length inputs (exact) and only those."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rvc_lora.pipeline.batching import equal_length_groups, run_grouped
from rvc_lora.pipeline.content import build_random_hubert
from rvc_lora.pipeline.f0.fcpe import FCPEPitch
from rvc_lora.pipeline.f0.fcpe_net import FCPENet
from rvc_lora.pipeline.f0.rmvpe import RMVPEPitch
from rvc_lora.pipeline.f0.rmvpe_net import RMVPENet

TINY_HUBERT = {"hidden_size": 48, "num_hidden_layers": 12, "num_attention_heads": 2, "intermediate_size": 64,
               "conv_dim": (8,) * 7, "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 2,
               "classifier_proj_size": 8}
LENGTHS = [4000, 3200, 4000, 4000, 3200, 4800]


def _audios(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(max(LENGTHS)) / 16000
    return [(0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t[:n]) + 0.01 * rng.standard_normal(n)).astype(np.float64)
            for i, n in enumerate(LENGTHS)]


def test_equal_length_groups_keep_order_and_results_go_back_in_place() -> None:
    assert equal_length_groups(LENGTHS) == [[0, 2, 3], [1, 4], [5]]
    calls: list[list[str]] = []

    def run(group: list[str]) -> list[str]:
        calls.append(group)
        return [s.upper() for s in group]

    assert run_grouped(["a", "b", "c", "d"], [1, 2, 1, 3], run) == ["A", "B", "C", "D"]
    assert calls == [["a", "c"], ["b"], ["d"]]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_content_encoder_batch_equals_each_input_alone(version: str) -> None:
    encoder = build_random_hubert(TINY_HUBERT, seed=0)
    audios = [torch.from_numpy(a) for a in _audios()]
    batched = encoder.extract_batch(audios, version)  # type: ignore[arg-type]
    for audio, feats in zip(audios, batched, strict=True):
        alone = encoder.extract(audio, version)  # type: ignore[arg-type]
        assert feats.shape == alone.shape
        assert (feats - alone).abs().max() < 1e-5


def test_padding_would_change_hubert_which_is_why_lengths_are_not_mixed() -> None:
    encoder = build_random_hubert(TINY_HUBERT, seed=0)
    audio = torch.from_numpy(_audios()[1])
    alone = encoder.extract(audio, "v2")
    padded = encoder.extract(torch.cat([audio, torch.zeros(1600, dtype=audio.dtype)]), "v2")[:, : alone.shape[1]]
    assert (padded - alone).abs().max() > 1e-3


def test_fcpe_batch_equals_each_input_alone() -> None:
    torch.manual_seed(0)
    fcpe = FCPEPitch(FCPENet())
    audios = _audios(1)
    p_lens = [len(a) // 160 for a in audios]
    for f0, audio, n in zip(fcpe.batch(audios, p_lens), audios, p_lens, strict=True):
        np.testing.assert_allclose(f0, fcpe(audio, n), atol=1e-3)


def test_rmvpe_batch_equals_each_input_alone() -> None:
    torch.manual_seed(0)
    rmvpe = RMVPEPitch(RMVPENet())  # 90M random parameters (slow on a CPU): two short inputs, one batch
    audios = [a[:1600] for a in _audios(2)[:2]]
    p_lens = [len(a) // 160 for a in audios]
    for f0, audio, n in zip(rmvpe.batch(audios, p_lens), audios, p_lens, strict=True):
        np.testing.assert_allclose(f0, rmvpe(audio, n), atol=1e-3)
