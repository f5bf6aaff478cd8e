"""Every request and response body. Unknown fields are refused (`extra="forbid"`); errors are
`{"error": {"code", "message"}}`. In multipart forms the files are fields of the model, because a
separate file parameter would be rejected as an extra field."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from rvc_lora.adapters import AdapterInfo
from rvc_lora.pipeline.audio import EncodeFormat
from rvc_lora.pipeline.f0 import F0Method
from rvc_lora.pipeline.params import BOUNDS, DEFAULTS, MIN_RESAMPLE_SR
from rvc_lora.voice.bank import Strategy
from service.engine import ConvertOptions
from service.store import NAME_PATTERN, StoredAdapter

FORM = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
BODY = ConfigDict(extra="forbid", frozen=True)

AdapterRef = Field(default=None, min_length=1, max_length=128, description="adapter id or name; absent: base voice")


def param_field(name: str) -> Any:
    """The form field of conversion parameter `name`: default, bounds and description from `ConvertParams`'
    `BOUNDS` and `DEFAULTS` (the only place they are written)."""
    bound = BOUNDS[name]
    return Field(default=DEFAULTS[name], ge=bound.lo, le=bound.hi, description=bound.help)


Seed = param_field("seed")
Sid = param_field("sid")


class ErrorBody(BaseModel):
    model_config = BODY
    code: str = Field(description="stable machine-readable code, e.g. adapter_not_found, queue_full")
    message: str


class ErrorResponse(BaseModel):
    model_config = BODY
    error: ErrorBody


class ConvertForm(BaseModel):
    model_config = FORM
    audio: UploadFile = Field(description="WAV, FLAC, OGG (Vorbis/Opus), MP3, M4A/AAC, WebM/Opus, or another "
                                          "format ffmpeg reads")
    adapter: str | None = AdapterRef
    sid: int = Sid
    f0_up_key: int = param_field("f0_up_key")
    f0_method: F0Method | None = Field(default=None, description="pitch extractor; default: rmvpe when the server "
                                       "has rmvpe.pt, else fcpe when installed, else pm (`GET /model` lists what "
                                       "runs here and the default)")
    index_rate: float = param_field("index_rate")
    filter_radius: int = param_field("filter_radius")
    rms_mix_rate: float = param_field("rms_mix_rate")
    protect: float = param_field("protect")
    resample_sr: int = param_field("resample_sr")
    format: EncodeFormat = Field(default="wav", description="output: wav (PCM16), flac, ogg (Vorbis), opus (Ogg), "
                                 "mp3 or m4a (AAC); the Content-Type follows it")
    seed: int | None = Seed

    @field_validator("resample_sr")
    @classmethod
    def _rate(cls, value: int) -> int:
        if 0 < value < MIN_RESAMPLE_SR:
            raise ValueError(f"must be 0 (the model's rate) or {MIN_RESAMPLE_SR}..{BOUNDS['resample_sr'].hi} Hz")
        return value

    def options(self) -> ConvertOptions:
        return ConvertOptions(**{f.name: getattr(self, f.name) for f in fields(ConvertOptions)})


class InferForm(BaseModel):
    model_config = FORM
    features: UploadFile = Field(description=".npz with phone [T, 256|768] float32, and for f0 models pitch [T] "
                                             "int (1..255) and nsff0 [T] float32 Hz")
    adapter: str | None = AdapterRef
    sid: int = Sid
    seed: int | None = Seed


class AdapterForm(BaseModel):
    model_config = FORM
    file: UploadFile = Field(description="an adapter (.safetensors), a full RVC voice model (.pth) made from the "
                                         "resident base, from which an adapter is extracted, or a voice .zip (one "
                                         ".pth and optionally its .index); told apart by content")
    index: UploadFile | None = Field(default=None, description="optional retrieval index (.index)")
    name: str | None = Field(default=None, pattern=NAME_PATTERN, description="unique name; 1-64 of A-Z a-z 0-9 . _ -")
    rank: int | None = Field(default=None, ge=1, le=512,
                             description="voice models only: the extraction rank (default 32, or the server's "
                                         "max_rank if lower; more than max_rank is refused)")


class AdapterSummary(BaseModel):
    """An adapter as `GET /adapters` lists it; `GET /adapters/{id}` gives every detail (`AdapterOut`)."""

    model_config = BODY
    id: str = Field(description="first 16 hex digits of the file's sha256")
    name: str | None
    label: str = Field(description="the name written in the adapter file's metadata")
    rank: int
    has_index: bool
    size_bytes: int
    created_at: str

    @classmethod
    def of(cls, rec: StoredAdapter) -> AdapterSummary:
        return cls(id=rec.id, name=rec.name, label=rec.info.name, rank=rec.info.r,
                   has_index=rec.index_sha256 is not None, size_bytes=rec.size_bytes, created_at=rec.created_at)


class LayerFit(BaseModel):
    model_config = BODY
    name: str
    kind: str = Field(description="Conv1d, ConvTranspose1d or Linear")
    shape: list[int]
    rank: int
    rel_error: float = Field(description="||dW - BA|| / ||dW|| as stored")
    energy_kept: float = Field(description="share of ||dW||^2 in the kept singular values")
    delta_share: float = Field(description="||dW|| / ||W_base||")


class Extraction(BaseModel):
    """How an adapter extracted from a full voice model approximates it (`ExtractionReport.summary()` of
    `rvc_lora.extract`, which the adapter file keeps in its metadata, with sizes and timings)."""

    model_config = BODY
    base_fingerprint: str
    targets: str
    rank: int = Field(description="the adapter's rank (the largest layer rank)")
    requested_rank: int | None
    energy: float | None
    dtype: str
    layer_count: int = Field(description="layers stored as low-rank pairs")
    max_rel_error: float = Field(description="the worst layer's ||dW - BA|| / ||dW||")
    mean_rel_error: float
    worst_layers: list[LayerFit] = Field(description="the layers that fit worst, worst first (at most 8)")
    full_delta_count: int = Field(description="small tensors stored whole")
    full_delta_values: int
    skipped_count: int = Field(description="parameters that differ from the base outside the extracted targets")
    adapter_bytes: int
    voice_bytes: int
    size_ratio: float = Field(description="voice model bytes per adapter byte")
    snr_db: float | None = Field(description="waveform SNR of base + adapter against the voice model, fixed input")
    base_snr_db: float | None = Field(description="the same for the plain base")
    eval_frames: int
    eval_seed: int
    notes: list[str]
    seconds: float | None = Field(description="how long the extraction took; null when read back from a stored "
                                  "adapter (its file keeps the fit, not the run)")
    eval_seconds: float | None = Field(description="how long the SNR evaluation took; null as `seconds`")

    @classmethod
    def of_stored(cls, report: Mapping[str, Any], adapter_bytes: int) -> Extraction:
        """The report an adapter file keeps, with the file's size: ValueError (pydantic's ValidationError) when it
        is not one. Fields of a newer writer are left out."""
        known = {k: v for k, v in report.items() if k in cls.model_fields}
        out = cls.model_validate({**known, "adapter_bytes": adapter_bytes, "size_ratio": 0.0, "seconds": None,
                                  "eval_seconds": None})
        return out.model_copy(update={"size_ratio": out.voice_bytes / max(adapter_bytes, 1)})


class _StoredOut(BaseModel):
    """The store's part of `AdapterOut`: where the adapter's bytes are and what they hash to."""

    model_config = BODY
    id: str = Field(description="first 16 hex digits of the file's sha256")
    name: str | None
    sha256: str
    size_bytes: int
    has_index: bool
    index_bytes: int | None
    created_at: str


# `AdapterInfo` (the one adapter record, `rvc_lora.adapters`) as HTTP shows it: its fields, under these names
# (`name` is the store's name here, so the file's own is its `label`), without the file-format bookkeeping, and
# with the extraction report parsed (`Extraction`) rather than as text.
_INFO_AS = {"name": "label", "r": "rank"}
_INFO_HIDDEN = frozenset({"full_delta", "format_version", "extraction"})
_INFO_HELP = {"name": "the name written in the adapter file's metadata"}


def _info_fields() -> dict[str, Any]:
    """`create_model` field specs from `AdapterInfo`'s dataclass fields, in their order (tuples as lists)."""
    hints = get_type_hints(AdapterInfo)
    specs: dict[str, Any] = {}
    for f in fields(AdapterInfo):
        if f.name in _INFO_HIDDEN:
            continue
        kind = hints[f.name]
        if get_origin(kind) is tuple:
            kind = list[get_args(kind)[0]]  # type: ignore[misc]
        specs[_INFO_AS.get(f.name, f.name)] = (kind, Field(description=_INFO_HELP.get(f.name)))
    return specs


_AdapterRecord: type[_StoredOut] = create_model(  # the store's part, then the info's, then the report
    "AdapterRecord", __base__=_StoredOut, **_info_fields(),
    extraction=(Extraction | None, Field(default=None, description="for an adapter extracted from a full voice "
                                         "model (on upload, or by `rvc-lora extract`): how close it comes to it")))


class AdapterOut(_AdapterRecord):  # type: ignore[misc,valid-type]  # fields made from AdapterInfo's
    """Every detail of a stored adapter: its store record and its `AdapterInfo`, field for field."""

    @classmethod
    def of(cls, rec: StoredAdapter) -> AdapterOut:
        info = rec.info
        report = info.report()
        shown = {_INFO_AS.get(f.name, f.name): getattr(info, f.name)
                 for f in fields(info) if f.name not in _INFO_HIDDEN}
        return cls(id=rec.id, name=rec.name, sha256=rec.sha256, size_bytes=rec.size_bytes,
                   has_index=rec.index_sha256 is not None, index_bytes=rec.index_bytes, created_at=rec.created_at,
                   **shown, extraction=None if report is None else Extraction.of_stored(report, rec.size_bytes))


class AdapterUpload(AdapterOut):
    """`AdapterOut`; after a voice model's extraction, `extraction` carries this run's timings too."""

    @classmethod
    def of_upload(cls, rec: StoredAdapter, extraction: Mapping[str, Any] | None) -> AdapterUpload:
        out = AdapterOut.of(rec)
        if extraction is not None:
            out = out.model_copy(update={"extraction": Extraction.model_validate(dict(extraction))})
        return cls(**dict(out))


class AdapterList(BaseModel):
    model_config = BODY
    adapters: list[AdapterSummary] = Field(description="this page, oldest upload first, in brief: "
                                                       "`GET /adapters/{id}` gives the details")
    total: int = Field(description="adapters in the store")
    next_offset: int | None = Field(description="`offset` of the next page; null on the last page")


class Limits(BaseModel):
    model_config = BODY
    max_audio_s: float
    max_audio_bytes: int
    max_features_bytes: int
    max_adapter_bytes: int
    max_index_bytes: int
    max_queued_audio_s: float
    request_timeout_s: float


class ModelOut(BaseModel):
    model_config = BODY
    fingerprint: str
    version: str
    f0: bool
    sr: int
    n_speakers: int
    content_dim: int
    max_rank: int
    target_modules: list[str]
    f0_methods: list[str]
    default_f0_method: str = Field(description="what runs when a request names no f0_method")
    device: str
    bank_slots: int = Field(description="adapter slots on the device: voices one batch can mix")
    bank_slot_bytes: int = Field(description="device memory per adapter slot")
    batch_way: Strategy = Field(
        description="how a batch of several voices runs (RVC_LORA_BATCH_WAY): by_voice, one forward per voice (a "
                    "device call then takes one voice); vmap, one forward with each row's adapter; auto, whichever "
                    "measured faster per batch shape")
    limits: Limits


class Health(BaseModel):
    model_config = BODY
    status: Literal["ok", "failed"]


class Readiness(BaseModel):
    model_config = BODY
    ready: bool
    state: Literal["loading", "ready", "draining", "stopped", "failed"]
    queued_audio_s: float


_DESCRIPTIONS = {
    400: "malformed request body (e.g. broken multipart framing)",
    401: "missing or wrong API key (`Authorization: Bearer <key>`)",
    404: "unknown adapter",
    408: "the upload stalled (no bytes for `upload_idle_timeout_s`) or took longer than `upload_timeout_s`",
    409: "name taken by other bytes, or the same adapter stored with another name or index",
    413: "upload larger than its limit, or audio longer than the maximum duration",
    415: "audio that cannot be decoded",
    422: "invalid parameter, audio, features, adapter or voice model (another base or architecture, bad shapes, "
         "rank above the maximum)",
    499: "the client disconnected (nobody receives this)",
    500: "unexpected failure of this request (the message carries the request id)",
    503: "queue full (conversions, or voice model extractions), models not ready or shutting down "
         "(`Retry-After` says when to retry)",
    504: "deadline passed before the result was ready",
    507: "the server could not write the upload to disk (adapter store full, or no room to buffer audio)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the given error statuses, all with the error envelope."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _DESCRIPTIONS[status]}
        if status == 503:
            entry["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
        out[status] = entry
    return out


# --- the web console's additions: POST /convert?include=f0, GET /status, PATCH /adapters/{ref} ---

class AudioData(BaseModel):
    model_config = BODY
    media_type: str = Field(description="of the decoded `data`: audio/wav, audio/flac or audio/ogg (`format`)")
    sr: int = Field(description="sample rate, Hz")
    samples: int
    duration_s: float
    data: str = Field(description="the encoded audio file, base64 (RFC 4648, with padding)")


class F0Out(BaseModel):
    model_config = BODY
    frame_s: float = Field(description="seconds per frame: value i is the pitch of the input at i * frame_s")
    f0_method: str
    f0_up_key: int
    source_hz: list[float] = Field(description="f0 extracted from the input, Hz per frame; 0 = unvoiced")
    used_hz: list[float] = Field(description="f0 fed to the synthesizer: source_hz * 2^(f0_up_key/12); 0 = unvoiced")


class ConvertedWithF0(BaseModel):
    """`POST /convert?include=f0`: the converted audio and the pitch track it was made with, in one JSON body."""

    model_config = BODY
    audio: AudioData
    f0: F0Out | None = Field(description="null when the base model does not use f0")


class AdapterRename(BaseModel):
    model_config = BODY
    name: str | None = Field(pattern=NAME_PATTERN, description="the new unique name; null removes the name")


class QueueStatus(BaseModel):
    model_config = BODY
    jobs: int = Field(description="requests waiting for the device")
    audio_s: float = Field(description="seconds of audio waiting (what admission is bounded by)")
    max_audio_s: float = Field(description="the bound: beyond it requests get 503")
    wait_s: float | None = Field(description="estimated seconds to clear the queue at the measured throughput")


class Status(BaseModel):
    """What the service is doing now, from the same numbers `/metrics` exports."""

    model_config = BODY
    state: Literal["loading", "ready", "draining", "stopped", "failed"]
    uptime_s: float
    model: ModelOut | None = Field(description="null while the models load (or after they failed)")
    queue: QueueStatus
    throughput: float | None = Field(description="seconds of audio converted per device second, recently measured")
    rtf: float | None = Field(description="real-time factor: device seconds per second of audio (1 / throughput)")
    rtf_mean: float | None = Field(description="mean real-time factor of the jobs since start")
    jobs: dict[str, int] = Field(description="jobs since start by outcome (ok, error, failed, dropped, abandoned)")
    adapters_stored: int
    adapters_on_device: int = Field(description="adapters held on the device (LRU)")
    adapters_in_host_memory: int = Field(description="adapters held in host memory (LRU)")
