"""`SerialThread`: a thread that runs callables one at a time, in order. The worker's device thread (it owns
every model object) and the extraction thread (CPU work on copies of the base weights) are two of them."""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class SerialThread:
    """A daemon thread running submitted callables one at a time, in order. Daemon: work stuck past the shutdown
    grace period cannot keep the process alive. `busy_s` is the time it has spent running them."""

    def __init__(self, name: str) -> None:
        self._queue: collections.deque[tuple[concurrent.futures.Future[Any], Callable[[], Any]] | None] = (
            collections.deque())
        self._ready = threading.Condition()
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T], *, first: bool = False) -> concurrent.futures.Future[T]:
        """Queue `fn` last, or with `first` ahead of everything waiting (realtime stream blocks)."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._ready:
            if first:
                self._queue.appendleft((fut, fn))
            else:
                self._queue.append((fut, fn))
            self._ready.notify()
        return fut

    def _next(self) -> tuple[concurrent.futures.Future[Any], Callable[[], Any]] | None:
        with self._ready:
            while not self._queue:
                self._ready.wait()
            return self._queue.popleft()

    def _loop(self) -> None:
        while (item := self._next()) is not None:
            fut, fn = item
            if not fut.set_running_or_notify_cancel():
                continue
            start = time.perf_counter()
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the awaiting coroutine, never lost
                fut.set_exception(exc)
            finally:
                self.busy_s += time.perf_counter() - start

    def stop(self, timeout: float) -> None:
        with self._ready:
            self._queue.append(None)
            self._ready.notify()
        self._thread.join(max(timeout, 0.0))
