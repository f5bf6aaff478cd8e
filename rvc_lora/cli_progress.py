"""Progress on stderr for the command line, so that no step is silent for more than a second.

On a terminal a step is one line redrawn twice a second (`loading models: content encoder ... 3 s`);
elsewhere (logs, pipes) it is a line when the step starts, a line per sub-step, and a line when it ends.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

TICK_S = 0.5


class Step:
    """A running step: `note(text)` names what it is doing now; `elapsed_s` since it started."""

    def __init__(self, label: str, stream: TextIO, live: bool) -> None:
        self.label, self.stream, self.live = label, stream, live
        self.detail = ""
        self.start = time.perf_counter()
        self._lock = threading.Lock()

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def note(self, detail: str) -> None:
        with self._lock:
            changed, self.detail = detail != self.detail, detail
        if changed and not self.live:
            self.stream.write(f"  {self.label}: {detail}\n")
            self.stream.flush()

    def draw(self, end: str = "") -> None:
        with self._lock:
            detail = f": {self.detail}" if self.detail else ""
        self.stream.write(f"\r\x1b[K{self.label}{detail} ... {self.elapsed_s:.0f} s{end}")
        self.stream.flush()


@contextmanager
def step(label: str, stream: TextIO | None = None) -> Iterator[Step]:
    """Show `label` (and the notes the body gives) until the body returns, then `label: done in N s`."""
    out = stream or sys.stderr
    live = out.isatty()
    current = Step(label, out, live)
    stop = threading.Event()
    ticker = None
    if live:
        def tick() -> None:
            while not stop.wait(TICK_S):
                current.draw()

        current.draw()
        ticker = threading.Thread(target=tick, daemon=True, name="cli-progress")
        ticker.start()
    else:
        out.write(f"{label} ...\n")
        out.flush()
    ok = False
    try:
        yield current
        ok = True
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
        result = f"done in {current.elapsed_s:.1f} s" if ok else f"stopped after {current.elapsed_s:.1f} s"
        if live:
            out.write(f"\r\x1b[K{label}: {result}\n")
        else:
            out.write(f"{label}: {result}\n")
        out.flush()


def chunk_notes(current: Step, prefix: str = "") -> Callable[[int, int], None]:
    """A `VoiceConverter` progress callback that notes `chunk i/n` on `current`."""
    def progress(done: int, total: int) -> None:
        current.note(f"{prefix}chunk {done}/{total}")

    return progress
