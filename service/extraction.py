"""Adapters from full RVC voice models, on a thread of their own.

An extraction is CPU work on copies of the base weights (a truncated SVD per layer, then two short CPU
inferences for the report): seconds and a few hundred MB for a full-size model. It runs neither on the
event loop nor on the device thread, so conversions go on meanwhile. One runs at a time; at most
`max_waiting` more wait, further ones are refused with 503 and a Retry-After.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import TypeVar

from service.errors import QueueFull
from service.threads import SerialThread

T = TypeVar("T")


class Extractor:
    """Event-loop side: `run(fn)` runs `fn` on the extraction thread and awaits its result."""

    def __init__(self, max_waiting: int) -> None:
        self._thread = SerialThread("rvc-extract")
        self._capacity = max_waiting + 1
        self._in_flight = 0  # running or waiting on the thread, including those whose client has gone
        self._last_s = 10.0  # how long the last extraction took: the Retry-After estimate

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def run(self, fn: Callable[[], T]) -> T:
        if self._in_flight >= self._capacity:
            wait = self._last_s * self._in_flight
            raise QueueFull(f"{self._in_flight} voice model extractions are running or waiting; retry in "
                            f"{math.ceil(wait)} s", retry_after=wait)
        loop = asyncio.get_running_loop()
        self._in_flight += 1
        start = time.perf_counter()

        def finished() -> None:
            self._in_flight -= 1
            self._last_s = max(time.perf_counter() - start, 1.0)

        def notify(_: object) -> None:
            try:
                loop.call_soon_threadsafe(finished)
            except RuntimeError:  # the loop closed while this ran: the app has stopped
                pass

        future = self._thread.submit(fn)
        future.add_done_callback(notify)
        return await asyncio.wrap_future(future)

    def stop(self) -> None:
        """No new work; a running extraction is abandoned with the process (daemon thread)."""
        self._thread.stop(0.0)
