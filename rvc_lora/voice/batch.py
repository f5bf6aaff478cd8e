"""Batched synthesis, the row side: `SynthRow` (one `infer` call's inputs with its random numbers drawn),
`make_row`, and `synthesize_rows` for a batch in the model's resident voice. Rows in different voices go
through an `AdapterBank` (`rvc_lora/voice/bank.py`), which runs the same padded forward per row.

Build a row when its inputs are ready, in the order a solo run would call `infer` (the rows of one request
share one `torch.Generator`): its numbers are drawn then, so the batch it later lands in does not change them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rvc_lora.errors import ConfigError
from rvc_lora.models.generator import GeneratorNSF
from rvc_lora.models.nsf import SineDraws
from rvc_lora.models.rows import PaddedRows, RowNoise, RowPlan, draw_row_noise, infer_padded, model_dtype, plan_row
from rvc_lora.voice.model import SynthesizerLoRA


@dataclass(frozen=True)
class SynthRow:
    """One synthesis row: phone `[T, D]` content features (D = 256 v1 / 768 v2), pitch `[T]` int64 coarse pitch
    1..255 and nsff0 `[T]` float32 Hz (f0 models; None otherwise), sid the speaker, plan its frame counts,
    noise its random numbers. Its audio has `samples = plan.dec_frames * upp` samples at the model rate."""

    phone: Tensor
    pitch: Tensor | None
    nsff0: Tensor | None
    sid: int
    plan: RowPlan
    noise: RowNoise
    samples: int


def make_row(model: SynthesizerLoRA, phone: Tensor, pitch: Tensor | None = None, nsff0: Tensor | None = None, *,
             sid: int = 0, generator: torch.Generator | None = None, skip_head: int | None = None,
             return_length: int | None = None, device: torch.device | str | None = None) -> SynthRow:
    """Check a row's inputs against `model` and draw its random numbers from `generator` (None: the default
    generator of the device, as an unseeded solo run). Shapes as in `SynthRow`; `skip_head`/`return_length`
    as in `infer` (streams); `sid` as checked by the caller (`check_sid`: `VoiceConverter.plan` checks a
    request's). The row's tensors go to `device` (default: the model's). `ConfigError` for bad
    shapes or a SineGen variant other than "B" (variant "A" interpolates over the whole
    row, so padding would change it)."""
    synth, cfg = model.base, model.cfg
    if phone.dim() != 2 or phone.shape[1] != cfg.content_dim or phone.shape[0] < 1:
        raise ConfigError(f"phone must be [T, {cfg.content_dim}], got {tuple(phone.shape)}")
    frames = phone.shape[0]
    if isinstance(synth.dec, GeneratorNSF):
        if synth.dec.m_source.l_sin_gen.variant != "B":
            raise ConfigError("batched synthesis needs SineGen variant 'B' (variant 'A' depends on the padding)")
        if pitch is None or nsff0 is None or pitch.shape != (frames,) or nsff0.shape != (frames,):
            shapes = [None if t is None else tuple(t.shape) for t in (pitch, nsff0)]
            raise ConfigError(f"this model uses f0: pitch and nsff0 must be [{frames}], got {shapes}")
    elif pitch is not None or nsff0 is not None:
        raise ConfigError("this model has no f0: pass neither pitch nor nsff0")
    plan = plan_row(frames, skip_head, return_length)
    target = torch.device(device) if device is not None else synth.emb_g.weight.device
    noise = draw_row_noise(synth, plan, generator, target)
    return SynthRow(phone.to(target, model_dtype(synth)), None if pitch is None else pitch.to(target, torch.long),
                    None if nsff0 is None else nsff0.to(target, torch.float32), sid, plan, noise,
                    plan.dec_frames * cfg.upp)


def _stack_padded(tensors: Sequence[Tensor], dim: int) -> Tensor:
    """Tensors equal but for `dim` (each with a leading 1 or none) -> one `[B, ...]` tensor, zero-padded on `dim`."""
    width = max(t.shape[dim] for t in tensors)
    out = tensors[0].new_zeros((len(tensors), *tensors[0].shape[:dim], width, *tensors[0].shape[dim + 1 :]))
    for i, t in enumerate(tensors):
        out[i].narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def pad_rows(rows: Sequence[SynthRow], device: torch.device) -> PaddedRows:
    """Stack rows into one padded batch on `device` (see `PaddedRows`)."""
    if not rows:
        raise ConfigError("a batch needs at least one row")

    def ints(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    plans = [r.plan for r in rows]
    f0 = rows[0].pitch is not None
    if any((r.pitch is not None) != f0 for r in rows):
        raise ConfigError("rows of one batch are all for f0 models or all for no-f0 models")
    sine = None
    if f0:
        draws = [r.noise.sine for r in rows]
        assert all(d is not None for d in draws)
        sine = SineDraws(torch.cat([d.phase for d in draws if d is not None]).to(device),
                         _stack_padded([d.noise[0] for d in draws if d is not None], 0).to(device))
    return PaddedRows(
        phone=_stack_padded([r.phone for r in rows], 0).to(device),
        pitch=_stack_padded([r.pitch for r in rows if r.pitch is not None], 0).to(device) if f0 else None,
        nsff0=_stack_padded([r.nsff0 for r in rows if r.nsff0 is not None], 0).to(device) if f0 else None,
        sid=ints([r.sid for r in rows]),
        frames=ints([p.frames for p in plans]), head=ints([p.head for p in plans]),
        flow_head=ints([p.flow_head for p in plans]), dec_head=ints([p.dec_head for p in plans]),
        prior_frames=ints([p.prior_frames for p in plans]), dec_frames=ints([p.dec_frames for p in plans]),
        prior=_stack_padded([r.noise.prior[0] for r in rows], 1).to(device),
        sine=sine, shifted=any(p.head for p in plans), dec_width=max(p.dec_frames for p in plans),
        ragged=len({p.dec_frames for p in plans}) > 1)


def split_audio(audio: Tensor, rows: Sequence[SynthRow]) -> list[Tensor]:
    """Padded output `[B, 1, T * upp]` -> each row's audio `[samples]` (views)."""
    return [audio[i, 0, : row.samples] for i, row in enumerate(rows)]


@torch.no_grad()
def synthesize_rows(model: SynthesizerLoRA, rows: Sequence[SynthRow]) -> list[Tensor]:
    """Every row in the model's resident voice (what `swap` last loaded), in one padded forward -> each row's
    audio `[samples]` in the model dtype, on the model's device."""
    batch = pad_rows(rows, model.base.emb_g.weight.device)
    return split_audio(infer_padded(model.base, batch), rows)
