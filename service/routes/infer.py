"""POST /infer: the low-level path, precomputed features (phone, pitch, nsff0) -> WAV."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Form, Request, Response, Security

from rvc_lora.frames import FRAMES_PER_S
from service import media
from service.auth import bearer_scheme
from service.deps import (
    SettingsDep,
    SingleValuedForm,
    StoreDep,
    WorkerDep,
    deadline,
    decode_upload,
    disconnected,
    request_id,
)
from service.routes.convert import AUDIO_HEADERS, check_speaker, server_timing
from service.schemas import InferForm, error_responses
from service.worker import Job

router = APIRouter(tags=["convert"], dependencies=[Security(bearer_scheme)])


@router.post(
    "/infer",
    dependencies=[SingleValuedForm],
    response_class=Response,
    responses={200: {"content": {"audio/wav": {}}, "description": "the synthesized audio (WAV)",
                     "headers": AUDIO_HEADERS},
               **error_responses(400, 401, 404, 408, 413, 422, 500, 503, 504)},
)
async def infer(request: Request, form: Annotated[InferForm, Form(media_type="multipart/form-data")],
                worker: WorkerDep, store: StoreDep, settings: SettingsDep) -> Response:
    """Run the synthesizer on uploaded features, with `adapter` in its LoRA slots."""
    info = (await worker.engine()).info
    check_speaker(info, form.sid)
    adapter = store.resolve(form.adapter) if form.adapter is not None else None
    worker.check_room()
    with store.lease(adapter):  # from the lookup on: a DELETE meanwhile lets this request finish
        features = await decode_upload(request, settings, lambda: media.read_features(
            form.features.file, info=info, max_s=settings.max_audio_s, sid=form.sid, seed=form.seed))
        job = Job(request_id(request), features, len(features.phone) / FRAMES_PER_S, adapter,
                  deadline(request, settings))
        result = await worker.submit(job, lambda: disconnected(request))
    body = await anyio.to_thread.run_sync(media.encode, result.audio, result.sr, "wav")
    headers = {"Server-Timing": server_timing(result.timings), "X-Adapter": adapter.id if adapter else "base",
               "X-Adapter-Cache": result.cache or "hit"}
    return Response(body, media_type="audio/wav", headers=headers)
