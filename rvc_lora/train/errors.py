"""Typed errors of the training package (subclasses of `RVCLoraError`, each with a stable `code`)."""

from __future__ import annotations

from rvc_lora.errors import RVCLoraError


class TrainingDataError(RVCLoraError):
    """Training data is unusable: an empty or missing folder, an unreadable file, too little audio, or a
    prepared work folder that is missing, stale or made for another model. The message names the path."""

    code = "bad_training_data"


class TrainingStateError(RVCLoraError):
    """A resumable training state is unreadable or was made with other settings (base, rank, targets)."""

    code = "bad_training_state"
