"""Rows of a padded synthesis batch: each row's frame plan, its random numbers drawn beforehand, and the
padded forward (`infer_padded`) that gives each row what `RVCSynthesizer.infer` gives it alone.

A row is one `infer` call of batch size 1: `frames` content frames, optionally the streaming
`skip_head`/`return_length` pair. Rows of one batch differ in length, so they are padded to the longest;
enc_p and the flow mask by length already, the decoder is masked at every resolution (`Generator._stages`),
and rows whose heads differ are shifted by a gather rather than sliced. Each row's random numbers (rvc_spec
§1.4: the prior noise, then SineGen's initial phase and noise) are drawn when the row is built, from the
row's own generator, in the shapes and order a solo `infer` draws them: a seeded row gives the same audio
whatever batch it lands in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rvc_lora.errors import ConfigError
from rvc_lora.models.commons import sequence_mask
from rvc_lora.models.generator import GeneratorNSF
from rvc_lora.models.nsf import SineDraws
from rvc_lora.models.synthesizer import FLOW_CONTEXT, NOISE_SCALE, RVCSynthesizer


@dataclass(frozen=True)
class RowPlan:
    """Frame counts of one row. frames: content frames in; head: `skip_head` (0: none); flow_head: frames
    dropped before the flow (the flow keeps `FLOW_CONTEXT` frames of context); dec_frames: frames decoded
    (`min(return_length, frames - head)`, or all)."""

    frames: int
    head: int
    flow_head: int
    dec_frames: int

    @property
    def prior_frames(self) -> int:
        """Frames of the prior sample (and of its noise): `frames - flow_head`."""
        return self.frames - self.flow_head

    @property
    def dec_head(self) -> int:
        """Frames of flow context dropped before the decoder: `head - flow_head`."""
        return self.head - self.flow_head


def plan_row(frames: int, skip_head: int | None = None, return_length: int | None = None) -> RowPlan:
    """The plan of a row of `frames` frames; `skip_head` and `return_length` go together (the streaming path)."""
    if frames < 1:
        raise ConfigError(f"a row needs at least 1 frame, got {frames}")
    if (skip_head is None) != (return_length is None):
        raise ConfigError("skip_head and return_length go together (both or neither)")
    if skip_head is None or return_length is None:
        return RowPlan(frames, 0, 0, frames)
    if not 0 <= skip_head < frames or return_length < 1:
        raise ConfigError(f"skip_head must be in [0, {frames}) and return_length >= 1, got {skip_head} and "
                          f"{return_length}")
    return RowPlan(frames, skip_head, max(skip_head - FLOW_CONTEXT, 0), min(return_length, frames - skip_head))


@dataclass(frozen=True)
class RowNoise:
    """A row's random numbers, as a solo `infer` draws them: prior `[1, inter_channels, prior_frames]` in the
    model dtype, then (f0 models) SineGen's phase `[1, 1, 1]` and noise `[1, dec_frames * upp, 1]` in float32."""

    prior: Tensor
    sine: SineDraws | None


def model_dtype(synth: RVCSynthesizer) -> torch.dtype:
    """The dtype the synthesizer computes in (its speaker table's)."""
    return synth.emb_g.weight.dtype


def draw_row_noise(synth: RVCSynthesizer, plan: RowPlan, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> RowNoise:
    """Draw a row's numbers in solo order from `generator` (None: the default generator of `device`, as a solo
    run does), on the generator's device, then moved to `device` (default: the model's)."""
    cfg = synth.cfg
    target = torch.device(device) if device is not None else synth.emb_g.weight.device
    where = generator.device if generator is not None else target
    prior = torch.randn(1, cfg.inter_channels, plan.prior_frames, generator=generator, device=where,
                        dtype=model_dtype(synth))
    sine = None
    if isinstance(synth.dec, GeneratorNSF):
        dim = synth.dec.m_source.l_sin_gen.dim
        phase = torch.rand(1, 1, dim, generator=generator, device=where)
        noise = torch.randn(1, plan.dec_frames * cfg.upp, dim, generator=generator, device=where)
        sine = SineDraws(phase.to(target), noise.to(target))
    return RowNoise(prior.to(target), sine)


def _shift(x: Tensor, offset: Tensor, length: int) -> Tensor:
    """x `[B, C, T]` -> `[B, C, length]`, row b read from frame `offset[b]` on (past the end: the last frame,
    which callers mask)."""
    idx = (torch.arange(length, device=x.device) + offset.unsqueeze(-1)).clamp(max=x.shape[-1] - 1)  # [B, length]
    return torch.gather(x, -1, idx.unsqueeze(1).expand(x.shape[0], x.shape[1], length))


@dataclass(frozen=True)
class PaddedRows:
    """A batch of rows padded to the longest, on one device. phone `[B, T, D]`, pitch `[B, T]` int64 and nsff0
    `[B, T]` float32 (f0 models, else None), sid `[B]`; per-row plans as `[B]` int64: frames, head, flow_head,
    dec_head, prior_frames, dec_frames; prior `[B, C, Tq]`; sine phase `[B, 1, 1]` and noise `[B, Td * upp, 1]`.
    shifted: whether any row has a head (the gathers are skipped otherwise); dec_width: max(dec_frames);
    ragged: whether rows decode different lengths (the decoder's masks are skipped otherwise)."""

    phone: Tensor
    pitch: Tensor | None
    nsff0: Tensor | None
    sid: Tensor
    frames: Tensor
    head: Tensor
    flow_head: Tensor
    dec_head: Tensor
    prior_frames: Tensor
    dec_frames: Tensor
    prior: Tensor
    sine: SineDraws | None
    shifted: bool
    dec_width: int
    ragged: bool

    def tensors(self) -> tuple[Tensor | None, ...]:
        """The fields in order, `sine` as its phase and noise (what `torch.func.vmap` maps over)."""
        sine = (None, None) if self.sine is None else (self.sine.phase, self.sine.noise)
        return (self.phone, self.pitch, self.nsff0, self.sid, self.frames, self.head, self.flow_head, self.dec_head,
                self.prior_frames, self.dec_frames, self.prior, *sine)

    @staticmethod
    def from_tensors(values: tuple[Tensor | None, ...], like: PaddedRows) -> PaddedRows:
        """The inverse of `tensors()`, static fields taken from `like`."""
        *head, phase, noise = values
        sine = None if phase is None or noise is None else SineDraws(phase, noise)
        return PaddedRows(*head, sine, like.shifted, like.dec_width, like.ragged)  # type: ignore[arg-type, call-arg]


def infer_padded(synth: RVCSynthesizer, rows: PaddedRows) -> Tensor:
    """The padded batch -> audio `[B, 1, max(dec_frames) * upp]`; row b's audio is its first
    `dec_frames[b] * upp` samples, equal (to float rounding) to what `infer` gives the row alone with the
    same numbers. No random draw, no host sync: it runs under `torch.func.vmap` (one row per call, with that
    row's adapter weights) as well as on a whole batch sharing the model's weights."""
    g = synth.emb_g(rows.sid).unsqueeze(-1)  # [B, gin, 1]
    m_p, logs_p, _ = synth.enc_p(rows.phone, rows.pitch, rows.frames)
    t_prior = rows.prior.shape[-1]
    if rows.shifted:  # enc_p's proj is per frame: shifting its output equals slicing its input
        m_p, logs_p = _shift(m_p, rows.flow_head, t_prior), _shift(logs_p, rows.flow_head, t_prior)
    else:
        m_p, logs_p = m_p[..., :t_prior], logs_p[..., :t_prior]
    x_mask = sequence_mask(rows.prior_frames, t_prior).unsqueeze(1).to(m_p.dtype)
    z_p = (m_p + torch.exp(logs_p) * rows.prior * NOISE_SCALE) * x_mask
    z = synth.flow(z_p, x_mask, g=g, reverse=True)
    t_dec = rows.dec_width
    nsff0 = rows.nsff0
    if rows.shifted:
        z = _shift(z, rows.dec_head, t_dec)
        if nsff0 is not None:
            nsff0 = _shift(nsff0.unsqueeze(1), rows.head, t_dec).squeeze(1)
    else:
        z = z[..., :t_dec]
        nsff0 = None if nsff0 is None else nsff0[..., :t_dec]
    z = z * sequence_mask(rows.dec_frames, t_dec).unsqueeze(1).to(z.dtype)
    lengths = rows.dec_frames if rows.ragged else None  # no padding to keep out when every row fills the width
    if isinstance(synth.dec, GeneratorNSF):
        assert nsff0 is not None and rows.sine is not None
        return synth.dec(z, nsff0, g, draws=rows.sine, lengths=lengths)  # type: ignore[no-any-return]
    return synth.dec(z, g, lengths=lengths)  # type: ignore[no-any-return]
