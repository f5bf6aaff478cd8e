"""Adapter management: upload (validated against the resident base, stored atomically), list, get, delete."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Form, Path, Response, Security

from service.auth import bearer_scheme
from service.deps import SettingsDep, StoreDep, WorkerDep
from service.ingest import ingest_adapter
from service.schemas import AdapterForm, AdapterList, AdapterOut, error_responses

router = APIRouter(tags=["adapters"], dependencies=[Security(bearer_scheme)])
Ref = Annotated[str, Path(min_length=1, max_length=128, description="adapter id or name")]


@router.post("/adapters", status_code=201, response_model=AdapterOut,
             responses={200: {"model": AdapterOut, "description": "already stored (same bytes): the same id"},
                        **error_responses(401, 409, 413, 422, 503, 507)})
async def upload_adapter(form: Annotated[AdapterForm, Form(media_type="multipart/form-data")], response: Response,
                         worker: WorkerDep, store: StoreDep, settings: SettingsDep) -> AdapterOut:
    """Store an adapter made for the resident base. 201 when new; 200 with the same id for the same bytes."""
    engine = await worker.engine()
    index = None if form.index is None else form.index.file
    rec, created = await anyio.to_thread.run_sync(ingest_adapter, store, engine, settings, form.file.file, index,
                                                  form.name)
    response.status_code = 201 if created else 200
    return AdapterOut.of(rec)


@router.get("/adapters", response_model=AdapterList, responses=error_responses(401))
async def list_adapters(store: StoreDep) -> AdapterList:
    return AdapterList(adapters=[AdapterOut.of(rec) for rec in store.all()])


@router.get("/adapters/{ref}", response_model=AdapterOut, responses=error_responses(401, 404, 422))
async def get_adapter(ref: Ref, store: StoreDep) -> AdapterOut:
    return AdapterOut.of(store.resolve(ref))


@router.delete("/adapters/{ref}", status_code=204, response_class=Response, responses=error_responses(401, 404, 422))
async def delete_adapter(ref: Ref, store: StoreDep, worker: WorkerDep) -> Response:
    """Remove an adapter. Requests already holding it finish normally; its files go when they are done."""
    rec = store.delete(store.resolve(ref).id)
    worker.forget(rec)
    return Response(status_code=204)
