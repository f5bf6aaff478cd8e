"""GET /status: what the service is doing now, as one small JSON object (the web console's Status view).

Every number comes from the Prometheus collectors that `/metrics` exports, so the two never disagree.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Security

from service.auth import bearer_scheme
from service.deps import SettingsDep, StoreDep, WorkerDep
from service.metrics import Metrics
from service.routes.model import model_out
from service.schemas import QueueStatus, Status, error_responses

router = APIRouter(tags=["model"], dependencies=[Security(bearer_scheme)])


def _value(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


@router.get("/status", response_model=Status, responses=error_responses(401))
async def status(request: Request, worker: WorkerDep, store: StoreDep, settings: SettingsDep) -> Status:
    """State, queue depth in seconds of audio, recent throughput and real-time factor, adapters stored and
    resident. Answers while the models load (`model` is null then)."""
    metrics: Metrics = request.app.state.metrics
    engine = await worker.engine(timeout=0.0) if worker.state not in ("loading", "failed") else None
    throughput = _value(metrics, "rvc_lora_throughput_audio_seconds_per_second") or None
    queued_s = worker.queued_audio_s
    rtf_count = _value(metrics, "rvc_lora_real_time_factor_count")
    jobs = {sample.labels["outcome"]: int(sample.value)
            for family in metrics.jobs.collect() for sample in family.samples if sample.name.endswith("_total")}
    return Status(
        state=worker.state, uptime_s=round(time.monotonic() - metrics.started, 3),
        model=None if engine is None else model_out(engine.info, settings),
        queue=QueueStatus(jobs=int(_value(metrics, "rvc_lora_queued_jobs")), audio_s=round(queued_s, 3),
                          max_audio_s=settings.max_queued_audio_s,
                          wait_s=None if throughput is None else round(queued_s / throughput, 3)),
        throughput=throughput, rtf=None if throughput is None else 1 / throughput,
        rtf_mean=_value(metrics, "rvc_lora_real_time_factor_sum") / rtf_count if rtf_count else None,
        jobs=jobs, adapters_stored=store.page(0, 0)[1],
        adapters_on_device=int(_value(metrics, "rvc_lora_resident_adapters", {"tier": "device"})),
        adapters_in_host_memory=int(_value(metrics, "rvc_lora_resident_adapters", {"tier": "host"})))
