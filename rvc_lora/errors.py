"""Typed errors. Every error rvc_lora raises on purpose is an `RVCLoraError` with a stable `code`;
HTTP statuses are the service's business, not the library's."""

from __future__ import annotations


class RVCLoraError(Exception):
    """Base of every deliberate rvc_lora error; `code` is stable and public (clients switch on it)."""

    code = "internal"


class ConfigError(RVCLoraError, ValueError):
    """A configuration value (synthesizer config list, LoRA config, parameters) is invalid."""

    code = "invalid_config"


class CheckpointError(RVCLoraError):
    """An RVC `.pth` file is unreadable, of the wrong kind, or has missing/misshaped tensors."""

    code = "bad_checkpoint"


class AdapterError(RVCLoraError):
    """An adapter (file or state dict) is malformed or does not fit the resident base model."""

    code = "bad_adapter"


class AdapterMismatchError(AdapterError):
    """An adapter was made for another base model (fingerprint, version, sr or shapes differ)."""

    code = "adapter_mismatch"


class BankFullError(RVCLoraError):
    """Every slot of an adapter bank is pinned by batches in flight: a new voice must wait for one."""

    code = "bank_full"


class AdapterNotFoundError(AdapterError):
    """No adapter with the given id or name exists."""

    code = "adapter_not_found"


class AudioError(RVCLoraError):
    """Audio input is empty, silent, too short, non-finite or otherwise unusable."""

    code = "bad_audio"


class UnsupportedAudioError(AudioError):
    """The audio bytes cannot be decoded (unknown or broken container/codec)."""

    code = "unsupported_audio"


class AudioTooLongError(AudioError):
    """The audio is longer than the caller's duration limit."""

    code = "audio_too_long"


class ParameterError(RVCLoraError, ValueError):
    """A conversion parameter is out of range or of the wrong kind."""

    code = "invalid_parameter"


class ModelUnavailableError(RVCLoraError):
    """An optional model or dependency (rmvpe.pt, faiss, a content encoder) is not available."""

    code = "model_unavailable"


class IndexFileError(RVCLoraError):
    """A retrieval `.index` file is unreadable or does not fit the model's feature width."""

    code = "bad_index"
