"""The resident base model and the limits requests must respect."""

from __future__ import annotations

from fastapi import APIRouter, Security

from rvc_lora.pipeline.f0 import preferred_f0_method
from service.auth import bearer_scheme
from service.deps import SettingsDep, WorkerDep
from service.engine import ModelInfo
from service.schemas import Limits, ModelOut, error_responses
from service.settings import Settings

router = APIRouter(tags=["model"], dependencies=[Security(bearer_scheme)])


def model_out(info: ModelInfo, settings: Settings) -> ModelOut:
    limits = Limits(max_audio_s=settings.max_audio_s, max_audio_bytes=settings.max_audio_bytes,
                    max_features_bytes=settings.max_features_bytes, max_adapter_bytes=settings.max_adapter_bytes,
                    max_index_bytes=settings.max_index_bytes, max_queued_audio_s=settings.max_queued_audio_s,
                    request_timeout_s=settings.request_timeout_s)
    return ModelOut(fingerprint=info.fingerprint, version=info.version, f0=info.f0, sr=info.sr,
                    n_speakers=info.n_speakers, content_dim=info.content_dim, max_rank=info.max_rank,
                    target_modules=list(info.target_modules), f0_methods=list(info.f0_methods),
                    default_f0_method=preferred_f0_method(info.f0_methods), device=info.device,
                    bank_slots=info.bank_slots, bank_slot_bytes=info.bank_slot_bytes,
                    batch_way=info.batch_way, limits=limits)


@router.get("/model", response_model=ModelOut, responses=error_responses(401, 503))
async def model(worker: WorkerDep, settings: SettingsDep) -> ModelOut:
    info = (await worker.engine(timeout=0.0)).info  # no waiting: 503 while loading
    return model_out(info, settings)
