"""Keep large CPU allocations in malloc's heap, so that a tensor op does not fault in fresh pages every call.

torch allocates CPU tensors with malloc. glibc serves a block above its mmap threshold (which it adapts up to
32 MB at most) with a fresh `mmap` and returns it to the system on free, so every op whose output is larger
than that touches new pages: the kernel faults in and zeroes each 4 KB page again, every call. The decoder's
signals reach that size quickly (at 40 kHz, 32 channels x 4 s of fp32 audio is 20 MB, and a batch of rows or a
long chunk multiplies it): measured on the 2-core CPU, `leaky_relu` + `add` over `[8, 32, 100000]` took 1,000,040
page faults and 0.26 s per row; with the threshold raised, 62,500 faults and 0.13-0.19 s per row, and a full-size
batch of 4 rows of 2.5 s spent 2.9 s per row instead of 0.9 s (elementwise ops 6x slower per element).

Raising the mmap and trim thresholds keeps freed blocks in the heap for the next op of the same size. The cost
is that the process keeps up to `max_bytes` of freed memory instead of returning it at once (its peak use is
what it holds either way). Processes that convert audio call this once at start (the service engine, the
command line); a library user may call it too. Nothing else in the package changes malloc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
INT_MAX = 2**31 - 1  # mallopt takes an int
DEFAULT_MALLOC_REUSE_BYTES = 2**30  # the command line's and the service's (RVC_LORA_MALLOC_REUSE_BYTES)


def reuse_freed_memory(max_bytes: int) -> bool:
    """Serve CPU allocations up to `max_bytes` (at most 2 GiB - 1) from the reusable heap and keep up to that
    much freed memory for reuse. True when set; False where malloc is not glibc's (nothing changes there)."""
    if not 0 < max_bytes <= INT_MAX:
        raise ValueError(f"max_bytes must be in 1..{INT_MAX}, got {max_bytes}")
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, max_bytes)) and bool(libc.mallopt(M_TRIM_THRESHOLD, max_bytes))
    if not ok:
        log.warning("malloc refused an mmap/trim threshold of %d bytes; large tensors keep faulting in pages",
                    max_bytes)
    return ok


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it; musl and macOS's libc do not)
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
