"""RVC's four synthesizers: one implementation (`RVCSynthesizer`), four class names for four (version, f0) pairs.

Submodule and parameter names equal RVC's state-dict keys, so checkpoints load with `strict=True`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rvc_lora.config import SynthConfig
from rvc_lora.errors import ConfigError, ParameterError
from rvc_lora.models.commons import rand_slice_segments, slice_segments
from rvc_lora.models.encoders import PosteriorEncoder, TextEncoder
from rvc_lora.models.flow import ResidualCouplingBlock
from rvc_lora.models.generator import Generator, GeneratorNSF
from rvc_lora.models.nsf import SineGenVariant

FLOW_CONTEXT = 24  # frames of flow context kept before skip_head on the streaming path
NOISE_SCALE = 0.66666  # RVC's literal (not 2/3): the prior sample's temperature

InferOutput = tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]
ForwardOutput = tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]]


def _as_int(value: Tensor | int) -> int:
    return int(value.item()) if isinstance(value, Tensor) else int(value)


def check_sid(sid: int, n_speakers: int) -> int:
    """`sid` when it names one of `n_speakers` speakers, else ParameterError. The one check of a speaker id, on
    the host int where a request enters (`VoiceConverter.plan` and `infer_features`; the service's forms before
    queueing): the forward takes the id as checked, since comparing a device tensor would wait for the device."""
    if not 0 <= sid < n_speakers:
        raise ParameterError(f"sid: {sid} is out of range, the model has {n_speakers} speaker(s)")
    return sid

class RVCSynthesizer(nn.Module):
    """The VITS-style RVC synthesizer: `enc_p` (prior), `flow`, `dec` (vocoder), `emb_g` (speakers), `enc_q`.

    `enc_q` (posterior encoder) exists only for training; `drop_posterior()` deletes it, as RVC does
    before loading an inference checkpoint.
    """

    def __init__(self, cfg: SynthConfig, *, sinegen_variant: SineGenVariant = "B",
                 with_posterior: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.segment_size = cfg.segment_size  # training crop in frames; callers set the real one (spec §1.1)
        enc_p = TextEncoder(cfg.content_dim, cfg.inter_channels, cfg.hidden_channels, cfg.filter_channels,
                            cfg.n_heads, cfg.n_layers, cfg.kernel_size, cfg.p_dropout, f0=cfg.f0)
        dec_args = (cfg.inter_channels, cfg.resblock, cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes,
                    cfg.upsample_rates, cfg.upsample_initial_channel, cfg.upsample_kernel_sizes, cfg.gin_channels)
        dec: Generator = GeneratorNSF(*dec_args, sr=cfg.sr, sinegen_variant=sinegen_variant) if cfg.f0 \
            else Generator(*dec_args)
        # RVC's v2 classes rebuild enc_p after everything else, so it comes last in their state dicts
        if cfg.version == "v1":
            self.enc_p = enc_p
        self.dec = dec
        self.enc_q: PosteriorEncoder | None = None
        if with_posterior:
            self.enc_q = PosteriorEncoder(cfg.spec_channels, cfg.inter_channels, cfg.hidden_channels, 5, 1, 16,
                                          gin_channels=cfg.gin_channels)
        self.flow = ResidualCouplingBlock(cfg.inter_channels, cfg.hidden_channels, 5, 1, 3,
                                          gin_channels=cfg.gin_channels)
        self.emb_g = nn.Embedding(cfg.spk_embed_dim, cfg.gin_channels)
        if cfg.version == "v2":
            self.enc_p = enc_p

    def drop_posterior(self) -> None:
        """Delete `enc_q` (inference needs none of its 8.9M parameters)."""
        self.enc_q = None

    def remove_weight_norm(self) -> None:
        """Fuse weight norm in dec, flow and enc_q into plain `weight` tensors (RVC's export path)."""
        self.dec.remove_weight_norm()
        self.flow.remove_weight_norm()
        if self.enc_q is not None:
            self.enc_q.remove_weight_norm()

    def _infer(self, phone: Tensor, phone_lengths: Tensor, pitch: Tensor | None, nsff0: Tensor | None,
               sid: Tensor, skip_head: Tensor | int | None, return_length: Tensor | int | None,
               return_length2: Tensor | int | None) -> InferOutput:
        g = self.emb_g(sid).unsqueeze(-1)  # [B, gin, 1]
        streaming = skip_head is not None and return_length is not None
        if streaming:
            assert skip_head is not None and return_length is not None
            head, length = _as_int(skip_head), _as_int(return_length)
            flow_head = max(head - FLOW_CONTEXT, 0)
            dec_head = head - flow_head
            m_p, logs_p, x_mask = self.enc_p(phone, pitch, phone_lengths, flow_head)
        else:
            m_p, logs_p, x_mask = self.enc_p(phone, pitch, phone_lengths)
        z_p = (m_p + torch.exp(logs_p) * torch.randn_like(m_p) * NOISE_SCALE) * x_mask  # draw #1
        z = self.flow(z_p, x_mask, g=g, reverse=True)
        if streaming:
            z = z[:, :, dec_head : dec_head + length]
            x_mask = x_mask[:, :, dec_head : dec_head + length]
            if nsff0 is not None:
                nsff0 = nsff0[:, head : head + length]
        if isinstance(self.dec, GeneratorNSF):
            assert nsff0 is not None
            o = self.dec(z * x_mask, nsff0, g, n_res=return_length2)  # draws #2 and #3 (SineGen)
        else:
            o = self.dec(z * x_mask, g, n_res=return_length2)
        return o, x_mask, (z, z_p, m_p, logs_p)

    def _forward(self, phone: Tensor, phone_lengths: Tensor, pitch: Tensor | None, pitchf: Tensor | None,
                 y: Tensor, y_lengths: Tensor, ds: Tensor) -> ForwardOutput:
        if self.enc_q is None:
            raise ConfigError("training forward needs the posterior encoder enc_q, which this model does not have "
                              "(inference checkpoints omit it; load a pretrained base such as f0G40k.pth)")
        g = self.emb_g(ds).unsqueeze(-1)
        m_p, logs_p, x_mask = self.enc_p(phone, pitch, phone_lengths)
        z, m_q, logs_q, y_mask = self.enc_q(y, y_lengths, g=g)
        z_p = self.flow(z, y_mask, g=g)
        z_slice, ids_slice = rand_slice_segments(z, y_lengths, self.segment_size)
        if isinstance(self.dec, GeneratorNSF):
            assert pitchf is not None
            o = self.dec(z_slice, slice_segments(pitchf, ids_slice, self.segment_size), g)
        else:
            o = self.dec(z_slice, g)
        return o, ids_slice, x_mask, y_mask, (z, z_p, m_p, logs_p, m_q, logs_q)


def _config_from_args(args: tuple[Any, ...], version: str, f0: bool) -> SynthConfig:
    if len(args) == 1 and isinstance(args[0], SynthConfig):
        cfg: SynthConfig = args[0]
        if (cfg.version, cfg.f0) != (version, f0):
            cfg = cfg.replace(version=version, f0=f0)
        return cfg
    return SynthConfig.from_list(list(args), version=version, f0=f0)


class _F0Synthesizer(RVCSynthesizer):
    VERSION = "v2"

    def __init__(self, *config: Any, is_half: bool | None = None, sinegen_variant: SineGenVariant = "B",
                 with_posterior: bool = True, **_: Any) -> None:
        """Build from a `SynthConfig` or RVC's 18 positional config items; `is_half` is accepted and,
        as in RVC, has no effect (precision comes from `.half()`/`.float()`)."""
        super().__init__(_config_from_args(config, self.VERSION, True), sinegen_variant=sinegen_variant,
                         with_posterior=with_posterior)

    def infer(self, phone: Tensor, phone_lengths: Tensor, pitch: Tensor, nsff0: Tensor, sid: Tensor,
              skip_head: Tensor | int | None = None, return_length: Tensor | int | None = None,
              return_length2: Tensor | int | None = None) -> InferOutput:
        """phone `[B, T, 256|768]`, phone_lengths `[B]` int64, pitch `[B, T]` int64 1..255, nsff0 `[B, T]`
        float32 Hz, sid `[B]` int64 (ids the caller checked: `check_sid`) -> (audio `[B, 1, T_out * upp]`, x_mask,
        (z, z_p, m_p, logs_p)).

        Draws, in order: randn like m_p, one rand (SineGen's initial phase), randn `[B, T_f0 * upp, 1]`.
        """
        return self._infer(phone, phone_lengths, pitch, nsff0, sid, skip_head, return_length, return_length2)

    def forward(self, phone: Tensor, phone_lengths: Tensor, pitch: Tensor, pitchf: Tensor, y: Tensor,
                y_lengths: Tensor, ds: Tensor) -> ForwardOutput:
        """Training pass: y `[B, spec, T]` linear spectrogram, ds `[B]` speaker ids
        -> (audio slice `[B, 1, seg * upp]`, ids_slice, x_mask, y_mask, (z, z_p, m_p, logs_p, m_q, logs_q))."""
        return self._forward(phone, phone_lengths, pitch, pitchf, y, y_lengths, ds)


class _NoF0Synthesizer(RVCSynthesizer):
    VERSION = "v2"

    def __init__(self, *config: Any, with_posterior: bool = True, **_: Any) -> None:
        """Build from a `SynthConfig` or RVC's 18 positional config items (extra keywords ignored, as RVC)."""
        super().__init__(_config_from_args(config, self.VERSION, False), with_posterior=with_posterior)

    def infer(self, phone: Tensor, phone_lengths: Tensor, sid: Tensor, skip_head: Tensor | int | None = None,
              return_length: Tensor | int | None = None, return_length2: Tensor | int | None = None
              ) -> InferOutput:
        """phone `[B, T, 256|768]`, phone_lengths `[B]`, sid `[B]` -> (audio, x_mask, (z, z_p, m_p, logs_p)).

        One draw: randn like m_p."""
        return self._infer(phone, phone_lengths, None, None, sid, skip_head, return_length, return_length2)

    def forward(self, phone: Tensor, phone_lengths: Tensor, y: Tensor, y_lengths: Tensor,
                ds: Tensor) -> ForwardOutput:
        """Training pass without pitch."""
        return self._forward(phone, phone_lengths, None, None, y, y_lengths, ds)


class SynthesizerTrnMs256NSFsid(_F0Synthesizer):
    """v1 (256-d content) with f0."""

    VERSION = "v1"


class SynthesizerTrnMs768NSFsid(_F0Synthesizer):
    """v2 (768-d content) with f0."""

    VERSION = "v2"


class SynthesizerTrnMs256NSFsid_nono(_NoF0Synthesizer):  # noqa: N801 - RVC's class name
    """v1 (256-d content) without f0."""

    VERSION = "v1"


class SynthesizerTrnMs768NSFsid_nono(_NoF0Synthesizer):  # noqa: N801 - RVC's class name
    """v2 (768-d content) without f0."""

    VERSION = "v2"


SYNTHESIZER_CLASSES: dict[tuple[str, bool], type[RVCSynthesizer]] = {
    ("v1", True): SynthesizerTrnMs256NSFsid,
    ("v1", False): SynthesizerTrnMs256NSFsid_nono,
    ("v2", True): SynthesizerTrnMs768NSFsid,
    ("v2", False): SynthesizerTrnMs768NSFsid_nono,
}


def build_synthesizer(cfg: SynthConfig, *, sinegen_variant: SineGenVariant = "B",
                      with_posterior: bool = True) -> RVCSynthesizer:
    """The RVC class for `(cfg.version, cfg.f0)`, built from `cfg` (random weights)."""
    cls = SYNTHESIZER_CLASSES[(cfg.version, cfg.f0)]
    if cfg.f0:
        return cls(cfg, sinegen_variant=sinegen_variant, with_posterior=with_posterior)
    return cls(cfg, with_posterior=with_posterior)
