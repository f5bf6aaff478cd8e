"""Prometheus collectors, in a registry of their own per app (tests build many apps in one process).

Labels come from small fixed sets (route templates, methods, statuses, outcomes, tiers); the adapter
id is unbounded, so it is never a label.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
BATCH_FRAMES_BUCKETS = (100, 250, 500, 1000, 2000, 4000, 8000, 16000, 32000)
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.started = time.monotonic()  # uptime in /status
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("rvc_lora_http_requests_total", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("rvc_lora_http_request_duration_seconds", "HTTP request latency",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("rvc_lora_queue_wait_seconds", "time a job waited before the device took it",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("rvc_lora_compute_seconds", "device time per job", ["kind"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.rtf = Histogram("rvc_lora_real_time_factor", "device seconds per second of audio, per job",
                             buckets=RTF_BUCKETS, registry=r)
        self.queued_audio = Gauge("rvc_lora_queued_audio_seconds", "seconds of audio waiting in the queue",
                                  registry=r)
        self.queued_jobs = Gauge("rvc_lora_queued_jobs", "jobs waiting in the queue", registry=r)
        self.throughput = Gauge("rvc_lora_throughput_audio_seconds_per_second",
                                "measured audio seconds converted per device second (Retry-After uses it)",
                                registry=r)
        self.batch_size = Histogram("rvc_lora_batch_rows", "synthesizer rows (chunks of requests) per device batch",
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_stream_rows = Histogram("rvc_lora_batch_stream_rows", "realtime stream blocks per device batch",
                                           buckets=(0, *BATCH_SIZE_BUCKETS), registry=r)
        self.stream_begin_blocks = Histogram("rvc_lora_stream_begin_blocks", "realtime stream blocks per device call "
                                             "before synthesis (one content-encoder forward per history length)",
                                             buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_frames = Histogram("rvc_lora_batch_frames", "synthesizer frames (10 ms) per device batch",
                                      buckets=BATCH_FRAMES_BUCKETS, registry=r)
        self.device_busy = Counter("rvc_lora_device_busy_seconds_total", "time the device thread spent working "
                                   "(rate() of it is the busy fraction)", registry=r)
        self.device_busy_fraction = Gauge("rvc_lora_device_busy_fraction", "share of the last 10 "
                                          "seconds the device thread spent working", registry=r)
        self.bank_slots = Gauge("rvc_lora_bank_slots", "adapter slots on the device (RVC_LORA_BANK_SLOTS)", registry=r)
        self.bank_slot_bytes = Gauge("rvc_lora_bank_slot_bytes", "device memory per adapter slot", registry=r)
        self.stage_wait = Histogram("rvc_lora_stage_queue_seconds", "time a conversion stage waited for its thread: "
                                    "prepare/row/finish (CPU threads), voice/encode/synth (device thread)",
                                    ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.jobs = Counter("rvc_lora_jobs_total", "jobs by outcome", ["outcome"], registry=r)
        self.rejected = Counter("rvc_lora_rejected_total", "requests refused at admission", ["reason"], registry=r)
        self.swaps = Counter("rvc_lora_adapter_swaps_total", "adapter changes in the model's LoRA slots",
                             registry=r)
        self.cache = Counter("rvc_lora_adapter_cache_lookups_total",
                             "adapter lookups: hit (resident in an adapter bank slot) or miss, and the tier that "
                             "served it (host: one copy into a slot; disk: read, checked, then that copy)",
                             ["result", "tier"], registry=r)
        self.resident = Gauge("rvc_lora_resident_adapters", "adapters held per tier (device: in adapter "
                              "bank slots)", ["tier"], registry=r)
        self.open_connections = Gauge("rvc_lora_http_open_connections", "open HTTP connections", registry=r)
        self.connection_limit = Gauge("rvc_lora_http_connection_limit", "max_connections: open connections "
                                      "(the oldest idle ones are closed past it) and requests in progress (503 past "
                                      "it, health routes excepted)", registry=r)
        self.in_flight = Gauge("rvc_lora_http_in_flight_requests", "HTTP requests in progress", registry=r)
        self.connections_closed = Counter("rvc_lora_http_connections_closed_total", "connections the server closed: "
                                          "head_timeout (no complete request head in time), evicted (idle, to make "
                                          "room past the limit), send_stalled (read none of its response in time)",
                                          ["reason"], registry=r)
        self.host_cache_bytes = Gauge("rvc_lora_host_cache_bytes", "host memory held by cached adapters and their "
                                      "indexes (bounded by host_cache_bytes)", registry=r)
        self.ready = Gauge("rvc_lora_ready", "1 when models are loaded and warm", registry=r)
        self.cache.labels(result="hit", tier="device")
        for tier in ("host", "disk"):
            self.cache.labels(result="miss", tier=tier)
        for reason in ("head_timeout", "evicted", "send_stalled"):
            self.connections_closed.labels(reason=reason)
        for tier in ("device", "host"):
            self.resident.labels(tier=tier).set(0)
