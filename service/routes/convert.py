"""POST /convert: audio + parameters -> converted audio, through the device worker."""

from __future__ import annotations

import base64
import dataclasses
import re
import time
from collections.abc import Mapping
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Form, Query, Request, Response, Security
from fastapi.responses import JSONResponse

from rvc_lora.errors import ParameterError
from rvc_lora.frames import FRAMES_PER_S
from rvc_lora.models.synthesizer import check_sid
from rvc_lora.pipeline.f0 import f0_method_problem, preferred_f0_method
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
from service.engine import ConvertOptions, ModelInfo
from service.errors import InvalidRequest
from service.schemas import AudioData, ConvertedWithF0, ConvertForm, F0Out, error_responses
from service.settings import Settings
from service.worker import ConvertWork, Job, JobResult

router = APIRouter(tags=["convert"], dependencies=[Security(bearer_scheme)])

AUDIO_HEADERS = {
    "X-Request-Id": {"description": "this request's id (in every log line about it)", "schema": {"type": "string"}},
    "Server-Timing": {"description": "milliseconds per stage: queue, decode, f0, features, index, synth, encode; "
                      "the f0 entry's desc names the f0 method that ran", "schema": {"type": "string"}},
    "X-F0-Method": {"description": "the f0 method that ran (the request's, or the server's default); 'none' for a "
                    "model without f0 input", "schema": {"type": "string"}},
    "X-Adapter": {"description": "adapter id used, or 'base'", "schema": {"type": "string"}},
    "X-Adapter-Cache": {"description": "hit: the adapter was resident in an adapter bank slot on the device; miss: "
                        "it was copied into one (from host memory, or read from disk first; the "
                        "rvc_lora_adapter_cache_lookups_total metric says which)",
                        "schema": {"type": "string", "enum": ["hit", "miss"]}},
}
_TOKEN = re.compile(r"[^A-Za-z0-9_-]")


def server_timing(timings: Mapping[str, float], descriptions: Mapping[str, str] | None = None) -> str:
    """`name;dur=ms` per stage, with `;desc=` where `descriptions` has one (a token: no quoting needed)."""
    descriptions = descriptions or {}

    def entry(name: str, seconds: float) -> str:
        desc = f";desc={_TOKEN.sub('_', descriptions[name])}" if name in descriptions else ""
        return f"{_TOKEN.sub('_', name)}{desc};dur={seconds * 1000:.1f}"

    return ", ".join(entry(name, seconds) for name, seconds in timings.items())


def resolve_f0_method(info: ModelInfo, asked: str | None, settings: Settings) -> str | None:
    """The f0 method a request runs: its own, or the server's default; None for a model without f0 input.
    An unavailable one is a 400 that says what to set or install."""
    if not info.f0:
        return None
    if asked is None:
        return preferred_f0_method(info.f0_methods)
    if asked not in info.f0_methods:
        why = f0_method_problem(asked, settings.rmvpe) or "not enabled on this server"
        raise InvalidRequest(f"f0_method: {asked!r} is not available here ({why}); available: "
                             f"{', '.join(info.f0_methods)}")
    return asked


def with_f0(body: bytes, media_type: str, result: JobResult, options: ConvertOptions) -> ConvertedWithF0:
    """The JSON answer of `?include=f0`: the encoded audio in base64 and the f0 track (Hz rounded to 0.01)."""
    audio = AudioData(media_type=media_type, sr=result.sr, samples=len(result.audio),
                      duration_s=round(len(result.audio) / result.sr, 6), data=base64.b64encode(body).decode())
    f0 = None
    if result.f0 is not None and options.f0_method is not None:
        f0 = F0Out(frame_s=1 / FRAMES_PER_S, f0_method=options.f0_method, f0_up_key=options.f0_up_key,
                   source_hz=result.f0.source_hz.round(2).tolist(), used_hz=result.f0.used_hz.round(2).tolist())
    return ConvertedWithF0(audio=audio, f0=f0)


def check_speaker(info: ModelInfo, sid: int) -> None:
    """Refused before the upload is decoded or queued (the library checks it again where a conversion starts)."""
    try:
        check_sid(sid, info.n_speakers)
    except ParameterError as exc:
        raise InvalidRequest(str(exc)) from exc


@router.post(
    "/convert",
    dependencies=[SingleValuedForm],
    response_class=Response,
    responses={200: {"content": {t: {} for t in media.MEDIA_TYPES.values()}, "model": ConvertedWithF0,
                     "description": "the converted audio; with `include=f0`, JSON holding it (base64) and the f0 track",
                     "headers": AUDIO_HEADERS},
               **error_responses(400, 401, 404, 408, 413, 415, 422, 500, 503, 504, 507)},
)
async def convert(request: Request, form: Annotated[ConvertForm, Form(media_type="multipart/form-data")],
                  worker: WorkerDep, store: StoreDep, settings: SettingsDep,
                  include: Annotated[Literal["f0"] | None, Query(
                      description="f0: answer `application/json` (ConvertedWithF0) with the audio in base64 and the "
                                  "pitch track used, 10 ms per value, for plotting")] = None) -> Response:
    """Convert `audio` to the voice of `adapter` (the base voice without one)."""
    info = (await worker.engine()).info
    check_speaker(info, form.sid)
    f0_method = resolve_f0_method(info, form.f0_method, settings)
    adapter = store.resolve(form.adapter) if form.adapter is not None else None
    worker.check_room()  # a full queue refuses before the upload is decoded: overload costs no decoding
    with store.lease(adapter):  # from the lookup on: a DELETE meanwhile (even while decoding) lets this finish
        start = time.perf_counter()
        audio16k = await decode_upload(request, settings, lambda: media.read_audio(
            form.audio.file, limit=settings.max_audio_bytes, max_s=settings.max_audio_s, work_dir=settings.work_dir))
        decode_s = time.perf_counter() - start
        options = dataclasses.replace(form.options(), f0_method=f0_method)
        job = Job(request_id(request), ConvertWork(audio16k, options), media.audio_seconds(audio16k), adapter,
                  deadline(request, settings))
        result = await worker.submit(job, lambda: disconnected(request))
    start = time.perf_counter()
    body = await anyio.to_thread.run_sync(media.encode, result.audio, result.sr, form.format)
    timings = {"queue": result.timings["queue"], "decode": decode_s,
               **{k: v for k, v in result.timings.items() if k != "queue"}, "encode": time.perf_counter() - start}
    headers = {"Server-Timing": server_timing(timings, {"f0": f0_method} if f0_method else None),
               "X-F0-Method": f0_method or "none", "X-Adapter": adapter.id if adapter else "base",
               "X-Adapter-Cache": result.cache or "hit"}
    if include == "f0":
        return JSONResponse(with_f0(body, media.MEDIA_TYPES[form.format], result, options).model_dump(),
                            headers=headers)
    return Response(body, media_type=media.MEDIA_TYPES[form.format], headers=headers)
