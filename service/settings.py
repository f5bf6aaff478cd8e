"""Service configuration: environment variables prefixed `RVC_LORA_` (or keyword arguments in tests).

There is no module-level instance: `create_app(settings)` receives one, so each test builds its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rvc_lora.host_memory import DEFAULT_MALLOC_REUSE_BYTES, INT_MAX

MiB = 1024 * 1024


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def stage_threads(cpu_threads: int | None, device: str) -> int:
    """Threads for the pipelined worker's CPU stages (`Settings.cpu_threads`); 0 runs them on the device thread.

    Unset: 0 when the model runs on the CPU, whose cores are torch's: a stage running beside it takes a core away
    in the middle of torch's parallel regions, which then wait for it (on the 2-core CPU a 30%-busy thread beside
    a conversion made it 35% slower, so overlapping the stages lost more than it won). A stage then holds the
    device thread as a one-at-a-time job does (a long input's harvest f0 delays realtime blocks until it ends);
    set 1 or more where streams matter more than throughput. On an accelerator, the cores, at most 4 (the device
    thread and the event loop need cores too)."""
    if cpu_threads is not None:
        return cpu_threads
    return 0 if device == "cpu" else max(1, min(4, usable_cores()))


def pipeline_depth(pipeline_jobs: int | None, device: str) -> int:
    """Requests in the pipelined worker at once (`Settings.pipeline_jobs`). Unset: 16 on an accelerator, where more
    requests give larger batches; 2 on a CPU, where a batch gains little (each forward already keeps every core
    busy) and requests in the pipeline share the device thread, so with 16 of them all finished together at the
    end (median latency 16 s against 13 s one at a time for 16 clients of 0.5 s); 2 still let a short request
    pass a long one."""
    if pipeline_jobs is not None:
        return pipeline_jobs
    return 2 if device == "cpu" else 16


class Settings(BaseSettings):
    """Everything an operator sets. Sizes are bytes, durations seconds."""

    model_config = SettingsConfigDict(env_prefix="RVC_LORA_", frozen=True, extra="forbid")

    # models (loaded on the device thread at start; `/readyz` is 503 until they are loaded and warm)
    model: Path | None = Field(default=None, description="base RVC checkpoint (.pth) that every adapter was made for")
    hubert: Path | None = Field(default=None, description="content encoder: hubert_base.pt or a HF folder")
    rmvpe: Path | None = Field(default=None, description="rmvpe.pt; without it f0_method=rmvpe is refused")
    device: str = Field(default="auto", description="cpu, cuda, cuda:N, or auto (cuda when available)")
    half: bool | None = Field(default=None, description="fp16 inference, RVC's is_half (its padding constants too); "
                              "unset: fp16 on CUDA only. Set false for GPUs with slow fp16 (GTX 16xx, Pascal)")
    max_rank: int = Field(default=32, ge=1, le=512, description="LoRA slot rank; larger is refused")
    warmup: bool = Field(default=True, description="run one conversion before reporting ready")

    # network (`rvc-lora serve --host/--port` win over these)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    # adapter store
    adapter_dir: Path = Path("adapters")
    seed_adapters: dict[str, Path] = Field(default_factory=dict,
                                           description="name -> adapter file added to the store at start")
    seed_indexes: dict[str, Path] = Field(default_factory=dict, description="name -> .index of that seed adapter")
    host_cache_bytes: int = Field(default=4096 * MiB, ge=1, description="host memory for adapters kept loaded "
                                  "(LRU): their tensors and their indexes' vectors as loaded (float32)")
    stale_upload_s: float = Field(default=3600.0, gt=0, description="temp files of other processes older than this "
                                  "are swept at start (the adapter folder may be shared by replicas)")

    # extraction of adapters from full voice models (POST /adapters with a .pth)
    extract_evaluate: bool = Field(default=True, description="report base+adapter vs voice SNR (two CPU inferences)")
    max_waiting_extractions: int = Field(default=2, ge=0,
                                         description="extractions waiting behind the running one; more: 503")

    # limits
    max_audio_bytes: int = Field(default=50 * MiB, gt=0, description="largest audio upload")
    max_audio_s: float = Field(default=120.0, gt=0, description="longest audio accepted (checked before decoding)")
    max_features_bytes: int = Field(default=64 * MiB, gt=0, description="largest /infer .npz upload")
    max_adapter_bytes: int = Field(default=64 * MiB, gt=0, description="largest adapter file")
    max_index_bytes: int = Field(default=1024 * MiB, gt=0, description="largest retrieval .index file")
    max_index_memory_bytes: int = Field(default=1024 * MiB, gt=0, description="largest retrieval index once loaded "
                                        "(every vector as float32: a compressed index takes far more than its file)")
    max_decoding: int = Field(default=4, ge=1, description="audio and feature uploads decoded at once (a few KB of "
                              "FLAC can decode to hundreds of MB); more wait, within their deadline")
    max_index_probes: int = Field(default=2, ge=1, description="uploaded indexes read at once (each in a child "
                                  "process of up to max_index_memory_bytes); more wait, then get 503")
    max_voice_bytes: int = Field(default=256 * MiB, gt=0,
                                 description="largest full RVC voice model (.pth) accepted for extraction")
    max_queued_audio_s: float = Field(default=300.0, gt=0, description="queue bound, in seconds of audio waiting")
    request_timeout_s: float = Field(default=120.0, gt=0, description="deadline from arrival to result (504 after it)")
    upload_idle_timeout_s: float = Field(default=30.0, gt=0,
                                         description="an upload that sends nothing for this long is 408")
    upload_timeout_s: float = Field(default=600.0, gt=0, description="an upload still arriving after this is 408")
    max_connections: int = Field(default=1000, ge=1, description="open connections (past it the oldest idle ones "
                                 "are closed) and requests in progress (past it new requests get 503 at once, "
                                 "health routes excepted)")
    send_idle_timeout_s: float = Field(default=30.0, gt=0, description="a client that reads none of its response "
                                       "for this long is disconnected (its unsent audio is dropped)")
    header_timeout_s: float = Field(default=10.0, gt=0, description="a connection that has not sent a complete "
                                    "request head this long after connecting or after its last response is closed")
    max_streams: int = Field(default=16, ge=0, description="open realtime streams (WebSocket /stream); more are "
                             "closed with code 4429")
    stream_buffer_s: float = Field(default=2.0, gt=0, description="audio a stream may have waiting for conversion; "
                                   "a client sending faster than realtime past it is closed with 4413")
    stream_send_timeout_s: float = Field(default=5.0, gt=0, description="a stream client that does not take an "
                                         "output block within this is closed with 4408")
    max_bypass: int = Field(default=4, ge=0, description="times a job may be overtaken by same-adapter jobs")

    # the pipelined worker
    batching: bool = Field(default=True, description="pipelined worker: CPU stages on `cpu_threads` threads while "
                           "the device synthesizes the chunks of several requests (and voices) in one batch; false: "
                           "one request at a time, start to end, on the device thread")
    max_batch_frames: int = Field(default=8000, ge=1, description="synthesizer frames (10 ms each) per batch; a "
                                  "single longer chunk runs alone")
    cpu_threads: int | None = Field(default=None, ge=0, description="threads for the CPU stages (high-pass, "
                                    "pm/harvest f0, index search, assembly); 0: on the device thread; unset: 0 when "
                                    "the device is the CPU (its cores run torch), else the cores, at most 4")
    bank_slots: int = Field(default=8, ge=1, le=256, description="adapter slots on the device, the device tier "
                            "of voices (LRU of unpinned slots; each a copy of the LoRA slot tensors, bytes per slot "
                            "in GET /model and metrics): a batch mixes at most this many voices; 1 keeps the memory "
                            "of one resident adapter")
    batch_way: Literal["auto", "by_voice", "vmap"] | None = Field(
        default=None, description="how a batch of several voices runs (`Strategy` in rvc_lora/voice/bank.py): "
        "by_voice, one forward per voice; vmap, one forward with each row's adapter; auto, whichever measured "
        "faster per batch shape; unset: by_voice on a CPU, auto on an accelerator")
    pipeline_jobs: int | None = Field(default=None, ge=1, description="requests in the pipeline at once (the others "
                                      "wait in the queue); more give larger batches and hold more memory; unset: 2 "
                                      "when the device is the CPU, else 16")
    torch_threads: int | None = Field(default=None, ge=1, description="torch's threads per operation; unset: "
                                      "torch's default, one per core (the CPU stages are a small share of a "
                                      "request's work, so they share the cores with torch rather than keep some "
                                      "idle: on the 2-core CPU the pipelined worker ran 1.7x faster with 2 torch "
                                      "threads than with 1)")
    malloc_reuse_bytes: int = Field(default=DEFAULT_MALLOC_REUSE_BYTES, ge=0, le=INT_MAX, description="CPU "
                                    "allocations up to this size are served from malloc's reusable heap instead of "
                                    "fresh pages (glibc; see rvc_lora/host_memory.py); 0 keeps malloc's defaults")

    # operation
    api_key: SecretStr | None = Field(default=None, description="when set, every route but health and metrics needs it")
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins; empty: CORS off")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    shutdown_grace_s: float = Field(default=30.0, gt=0, description="SIGTERM: time to finish running work, then exit")
    work_dir: Path | None = Field(default=None, description="temporary upload files (audio spools, form parts past "
                                  "1 MB); default: the system temp dir")

    @field_validator("api_key")
    @classmethod
    def _key(cls, key: SecretStr | None) -> SecretStr | None:
        """A key file's trailing newline is not part of the key (no client can send it); an empty key would let
        `Authorization: Bearer ` in, so it is refused rather than taken to mean "no key"; a non-ASCII one could
        never be presented (a UTF-8 header reads as latin-1 here), so it is refused at start."""
        if key is None:
            return None
        value = key.get_secret_value().strip()
        if not value:
            raise ValueError("api_key is empty; unset RVC_LORA_API_KEY to run without a key")
        if not all("!" <= c <= "~" for c in value):  # header bytes arrive as latin-1: others could never match
            raise ValueError("api_key must be visible ASCII characters (no spaces or accents): clients send other "
                             "characters as bytes the server cannot match reliably")
        return SecretStr(value)

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        if self.max_audio_s > self.max_queued_audio_s:
            raise ValueError(f"max_audio_s ({self.max_audio_s}) must not exceed max_queued_audio_s "
                             f"({self.max_queued_audio_s}): the longest request could never be queued")
        return self
