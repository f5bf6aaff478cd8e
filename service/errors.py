"""The service's own typed errors and the one table that turns any `RVCLoraError` into an HTTP status.

Service errors carry their status; library errors are mapped by type (most specific first). Starlette
looks exception handlers up along the MRO, so one handler on `RVCLoraError` covers all of them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TypeVar

from rvc_lora.errors import (
    AdapterError,
    AdapterNotFoundError,
    AudioError,
    AudioTooLongError,
    CheckpointError,
    ConfigError,
    IndexFileError,
    ModelUnavailableError,
    ParameterError,
    RVCLoraError,
    UnsupportedAudioError,
)
from rvc_lora.voicezip import VoicePackageError, VoicePackageTooLarge

E = TypeVar("E", bound=RVCLoraError)


def relabel(exc: E, path: Path, label: str) -> E:
    """The same error with a server-side temp path replaced by what the client sent: no paths leak."""
    renamed = type(exc)(str(exc).replace(repr(str(path)), label).replace(str(path), label))
    renamed.__dict__.update(exc.__dict__)  # e.g. a ServiceError's retry_after
    renamed.__cause__ = exc
    return renamed


class ServiceError(RVCLoraError):
    """An error the HTTP layer raises itself; `status` is its HTTP status."""

    status = 500

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class MalformedBody(ServiceError):
    """The request body's framing is broken (e.g. a multipart body without its closing boundary)."""

    code, status = "bad_request", 400


class HeadTooLarge(ServiceError):
    code, status = "header_too_large", 431


class InvalidRequest(ServiceError):
    code, status = "invalid_request", 422


class BadFeatures(ServiceError):
    code, status = "bad_features", 422


class PayloadTooLarge(ServiceError):
    code, status = "payload_too_large", 413


class Unauthorized(ServiceError):
    code, status = "unauthorized", 401


class NameConflict(ServiceError):
    code, status = "conflict", 409


class StorageError(ServiceError):
    code, status = "storage_error", 507


class QueueFull(ServiceError):
    code, status = "queue_full", 503


class ServiceStopping(ServiceError):
    code, status = "shutting_down", 503


class Overloaded(ServiceError):
    """More requests in progress than the server's connection limit (`max_connections`)."""

    code, status = "overloaded", 503


class NotReady(ServiceError):
    code, status = "not_ready", 503


class DeviceOutOfMemory(ServiceError):
    code, status = "device_out_of_memory", 503


class UploadTimeout(ServiceError):
    """The request body stalled or took too long to arrive (a slow or stuck client holds a connection)."""

    code, status = "request_timeout", 408


class DeadlineExceeded(ServiceError):
    code, status = "deadline_exceeded", 504


class ClientGone(ServiceError):
    """The client disconnected before its result was ready; nobody reads this response (nginx's 499)."""

    code, status = "client_closed_request", 499


class JobCancelled(ServiceError):
    """A job stopped between chunks because its deadline passed or its client left (nobody gets this)."""

    code, status = "cancelled", 503


class ModelOutputError(ServiceError):
    """The base model's output was not finite: the server's fault, not the client's audio."""

    code, status = "bad_model_output", 500


class JobFailed(ServiceError):
    """An unexpected exception inside the worker for one job; the message names the request id only."""

    code, status = "internal", 500


LIBRARY_STATUS: tuple[tuple[type[RVCLoraError], int], ...] = (  # most specific first
    (AdapterNotFoundError, 404),
    (VoicePackageTooLarge, 413),  # a voice zip that unpacks past the limits (or a zip bomb's ratio)
    (VoicePackageError, 422),
    (AdapterError, 422),
    (AudioTooLongError, 413),
    (UnsupportedAudioError, 415),
    (AudioError, 422),
    (ParameterError, 422),
    (ConfigError, 422),
    (IndexFileError, 422),
    (ModelUnavailableError, 422),  # e.g. f0_method=rmvpe without rmvpe.pt: retrying will not help
    (CheckpointError, 422),  # an uploaded voice model (.pth) that is not a readable RVC voice
)


def status_of(exc: RVCLoraError) -> int:
    if isinstance(exc, ServiceError):
        return exc.status
    return next((status for kind, status in LIBRARY_STATUS if isinstance(exc, kind)), 500)


def retry_after_header(exc: RVCLoraError) -> dict[str, str]:
    retry_after = getattr(exc, "retry_after", None)
    return {} if retry_after is None else {"Retry-After": str(max(1, math.ceil(retry_after)))}
