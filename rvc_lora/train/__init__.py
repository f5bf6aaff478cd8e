"""LoRA training over a frozen pretrained RVC base: data preparation, objective, discriminators, trainer."""

from rvc_lora.train.discriminators import MultiPeriodDiscriminator, discriminator_from_state_dict, load_discriminator
from rvc_lora.train.errors import TrainingDataError, TrainingStateError
from rvc_lora.train.prepare import PrepareSummary, SkippedFile, run_prepare
from rvc_lora.train.pretrained import (
    PretrainedBase,
    TrainParams,
    infer_base_config,
    load_pretrained_base,
    read_base_config,
    train_params,
)
from rvc_lora.train.trainer import LoRATraining, TrainResult, run_train

__all__ = [
    "LoRATraining",
    "MultiPeriodDiscriminator",
    "PrepareSummary",
    "PretrainedBase",
    "SkippedFile",
    "TrainParams",
    "TrainResult",
    "TrainingDataError",
    "TrainingStateError",
    "discriminator_from_state_dict",
    "infer_base_config",
    "load_discriminator",
    "load_pretrained_base",
    "read_base_config",
    "run_prepare",
    "run_train",
    "train_params",
]
