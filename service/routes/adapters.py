"""Adapter management: upload (validated against the resident base, stored atomically), list, get, delete."""

from __future__ import annotations

import io
from contextlib import ExitStack
from typing import Annotated

import anyio
from fastapi import APIRouter, Form, Path, Query, Response, Security

from rvc_lora.errors import RVCLoraError
from rvc_lora.voice.layout import DEFAULT_EXTRACT_RANK
from rvc_lora.voicezip import is_voice_zip
from service.auth import bearer_scheme
from service.deps import ExtractorDep, SettingsDep, SingleValuedForm, StoreDep, WorkerDep
from service.errors import InvalidRequest, relabel
from service.ingest import ingest_staged, stage_upload
from service.packages import unpack_voice_upload
from service.schemas import (
    AdapterForm,
    AdapterList,
    AdapterOut,
    AdapterRename,
    AdapterSummary,
    AdapterUpload,
    error_responses,
)
from service.spool import Readable
from service.store import check_name

router = APIRouter(tags=["adapters"], dependencies=[Security(bearer_scheme)])
Ref = Annotated[str, Path(min_length=1, max_length=128, description="adapter id or name")]
PAGE, MAX_PAGE = 100, 1000  # a page of 1000 is about 420 KB of JSON


# OpenAPI links: what a client (or a stateful API fuzzer) can do next with the id it got back
_BY_ID = {"parameters": {"ref": "$response.body#/id"}}
LINKS = {"GetAdapter": {"operationId": "get_adapter_adapters__ref__get", **_BY_ID},
         "DeleteAdapter": {"operationId": "delete_adapter_adapters__ref__delete", **_BY_ID},
         "ConvertWithAdapter": {"operationId": "convert_convert_post",
                                "requestBody": {"adapter": "$response.body#/id"}}}


@router.post("/adapters", status_code=201, response_model=AdapterUpload, dependencies=[SingleValuedForm],
             responses={201: {"description": "stored", "links": LINKS},
                        200: {"model": AdapterUpload, "description": "already stored (same bytes): the same id",
                              "links": LINKS},
                        **error_responses(400, 401, 408, 409, 413, 422, 503, 507)})
async def upload_adapter(form: Annotated[AdapterForm, Form(media_type="multipart/form-data")], response: Response,
                         worker: WorkerDep, store: StoreDep, settings: SettingsDep,
                         extractor: ExtractorDep) -> AdapterUpload:
    """Store an adapter made for the resident base. 201 when new; 200 with the same id for the same bytes.

    A full RVC voice model (`.pth`, fine-tuned from the resident base) is turned into an adapter first
    (truncated SVD of each layer's difference to the base, at `rank`; small tensors kept whole) and the
    response carries the extraction report. 422 when it is not of the base's architecture. A voice `.zip`
    (one `.pth` and optionally its `.index`, as voices are shared) is unpacked first, after checks against
    zip bombs (413), path traversal and nested archives (422)."""
    engine = await worker.engine()
    if form.name is not None:
        check_name(form.name)
    index: Readable | None = None if form.index is None else form.index.file
    with ExitStack() as package:  # a voice zip stays open until its index was read
        staged, kind = await anyio.to_thread.run_sync(stage_upload, store, settings, form.file.file)
        extraction = None
        try:
            if kind == "voice" and await anyio.to_thread.run_sync(is_voice_zip, staged.path):
                label = form.file.filename or "voice zip"
                zipped = staged
                staged, zipped_index = await anyio.to_thread.run_sync(
                    unpack_voice_upload, store, settings, zipped, label, package)
                store.discard(zipped)
                if zipped_index is not None:
                    if index is not None:
                        raise InvalidRequest(f"index: {label} holds an index already; send it in the zip or as "
                                             "`index`, not both")
                    index = zipped_index
            if kind == "voice":
                rank = DEFAULT_EXTRACT_RANK if form.rank is None else form.rank
                if form.rank is None:
                    rank = min(rank, settings.max_rank)
                elif rank > settings.max_rank:
                    raise InvalidRequest(f"rank: {rank} exceeds this server's maximum rank {settings.max_rank}")
                voice = staged
                try:
                    extracted = await extractor.run(lambda: engine.extract_voice(
                        voice.path, rank=rank, name=form.name or "extracted", evaluate=settings.extract_evaluate))
                except RVCLoraError as exc:
                    raise relabel(exc, voice.path, "voice model") from exc
                store.discard(staged)
                staged = await anyio.to_thread.run_sync(store.stage, io.BytesIO(extracted.adapter_bytes),
                                                        settings.max_adapter_bytes, "extracted adapter")
                extraction = extracted.report
            rec, created = await anyio.to_thread.run_sync(ingest_staged, store, engine, settings, staged, index,
                                                          form.name, worker.check_output)
        finally:
            store.discard(staged)
    response.status_code = 201 if created else 200
    return AdapterUpload.of_upload(rec, extraction)


@router.get("/adapters", response_model=AdapterList, responses=error_responses(401, 422))
async def list_adapters(store: StoreDep,
                        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="adapters per page")] = PAGE,
                        offset: Annotated[int, Query(ge=0, description="adapters to skip")] = 0,
                        q: Annotated[str | None, Query(max_length=128, description="only adapters whose name, id "
                                                       "or label contains this (case-insensitive)")] = None,
                        ) -> AdapterList:
    """Stored adapters, a page at a time (a store holds thousands): follow `next_offset` until it is null.
    Each entry is brief (id, name, label, rank, index, size, date); `GET /adapters/{ref}` gives the details.
    An adapter deleted between two pages shifts the later ones by one. `total` counts the matches of `q`."""
    page, total = store.page(offset, limit, q)
    after = offset + len(page)
    return AdapterList(adapters=[AdapterSummary.of(rec) for rec in page], total=total,
                       next_offset=after if after < total else None)


@router.get("/adapters/{ref}", response_model=AdapterOut, responses=error_responses(401, 404, 422))
async def get_adapter(ref: Ref, store: StoreDep) -> AdapterOut:
    """Every detail of one adapter: checksums, LoRA rank and alpha, target modules, base model, index."""
    return AdapterOut.of(store.resolve(ref))


@router.delete("/adapters/{ref}", status_code=204, response_class=Response, responses=error_responses(401, 404, 422))
async def delete_adapter(ref: Ref, store: StoreDep, worker: WorkerDep) -> Response:
    """Remove an adapter. Requests already holding it finish normally; its files go when they are done."""
    rec = store.delete(store.resolve(ref).id)
    worker.forget(rec)
    return Response(status_code=204)


@router.patch("/adapters/{ref}", response_model=AdapterOut, responses=error_responses(400, 401, 404, 409, 422, 507))
async def rename_adapter(ref: Ref, body: AdapterRename, store: StoreDep) -> AdapterOut:
    """Rename an adapter (`{"name": null}` removes its name; it stays reachable by id). 409 when the name is
    another adapter's."""
    return AdapterOut.of(store.rename(store.resolve(ref).id, body.name))
