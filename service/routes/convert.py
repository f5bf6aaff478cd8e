"""POST /convert: audio + parameters -> converted audio, through the device worker."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Annotated

import anyio
from fastapi import APIRouter, Form, Request, Response, Security

from service import media
from service.auth import bearer_scheme
from service.deps import SettingsDep, SingleValuedForm, StoreDep, WorkerDep, deadline, disconnected, request_id
from service.engine import ModelInfo
from service.errors import InvalidRequest
from service.schemas import ConvertForm, error_responses
from service.worker import ConvertWork, Job

router = APIRouter(tags=["convert"], dependencies=[Security(bearer_scheme)])

AUDIO_HEADERS = {
    "X-Request-Id": {"description": "this request's id (in every log line about it)", "schema": {"type": "string"}},
    "Server-Timing": {"description": "milliseconds per stage: queue, decode, f0, features, index, synth, encode",
                      "schema": {"type": "string"}},
    "X-Adapter": {"description": "adapter id used, or 'base'", "schema": {"type": "string"}},
    "X-Adapter-Cache": {"description": "hit: the adapter was already on the device; miss: it was loaded",
                        "schema": {"type": "string", "enum": ["hit", "miss"]}},
}
_TOKEN = re.compile(r"[^A-Za-z0-9_-]")


def server_timing(timings: Mapping[str, float]) -> str:
    return ", ".join(f"{_TOKEN.sub('_', name)};dur={seconds * 1000:.1f}" for name, seconds in timings.items())


def check_speaker(info: ModelInfo, sid: int) -> None:
    if sid >= info.n_speakers:
        raise InvalidRequest(f"sid: {sid} is out of range, the model has {info.n_speakers} speaker(s)")


@router.post(
    "/convert",
    dependencies=[SingleValuedForm],
    response_class=Response,
    responses={200: {"content": {t: {} for t in media.MEDIA_TYPES.values()}, "description": "the converted audio",
                     "headers": AUDIO_HEADERS},
               **error_responses(400, 401, 404, 408, 413, 415, 422, 500, 503, 504, 507)},
)
async def convert(request: Request, form: Annotated[ConvertForm, Form(media_type="multipart/form-data")],
                  worker: WorkerDep, store: StoreDep, settings: SettingsDep) -> Response:
    """Convert `audio` to the voice of `adapter` (the base voice without one)."""
    info = (await worker.engine()).info
    check_speaker(info, form.sid)
    if form.f0_method not in info.f0_methods:
        raise InvalidRequest(f"f0_method: {form.f0_method!r} is not available here (available: {info.f0_methods})")
    adapter = store.resolve(form.adapter) if form.adapter is not None else None
    worker.check_room()  # a full queue refuses before the upload is decoded: overload costs no decoding
    with store.lease(adapter):  # from the lookup on: a DELETE meanwhile (even while decoding) lets this finish
        start = time.perf_counter()
        audio16k = await anyio.to_thread.run_sync(lambda: media.read_audio(
            form.audio.file, limit=settings.max_audio_bytes, max_s=settings.max_audio_s, work_dir=settings.work_dir))
        decode_s = time.perf_counter() - start
        job = Job(request_id(request), ConvertWork(audio16k, form.options()), media.audio_seconds(audio16k), adapter,
                  deadline(request, settings))
        result = await worker.submit(job, lambda: disconnected(request))
    start = time.perf_counter()
    body = await anyio.to_thread.run_sync(media.encode, result.audio, result.sr, form.format)
    timings = {"queue": result.timings["queue"], "decode": decode_s,
               **{k: v for k, v in result.timings.items() if k != "queue"}, "encode": time.perf_counter() - start}
    headers = {"Server-Timing": server_timing(timings), "X-Adapter": adapter.id if adapter else "base",
               "X-Adapter-Cache": result.cache or "hit"}
    return Response(body, media_type=media.MEDIA_TYPES[form.format], headers=headers)
