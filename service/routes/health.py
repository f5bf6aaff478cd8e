"""Liveness, readiness and Prometheus metrics (open even when an API key is set)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import WorkerDep
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.head("/healthz", include_in_schema=False)  # load balancers probe with HEAD too
@router.get("/healthz", response_model=Health, responses={503: {"model": Health, "description": "models failed"}})
async def healthz(worker: WorkerDep) -> JSONResponse:
    """Liveness: the process answers. 503 only when the models failed to load (a restart may help)."""
    failed = worker.state == "failed"
    return JSONResponse(Health(status="failed" if failed else "ok").model_dump(), status_code=503 if failed else 200)


@router.head("/readyz", include_in_schema=False)
@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "loading, warming up, draining or failed"}})
async def readyz(request: Request, worker: WorkerDep) -> JSONResponse:
    """Readiness: 200 once the models are loaded, a warm-up conversion has run and the seed adapters are in
    the store; 503 before that and while draining."""
    ready = worker.ready and request.app.state.seeded.is_set()
    body = Readiness(ready=ready, state=worker.state, queued_audio_s=round(worker.queued_audio_s, 3))
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
