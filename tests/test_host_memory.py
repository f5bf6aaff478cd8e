"""`reuse_freed_memory`: large CPU buffers come back from the heap instead of as fresh pages."""

from __future__ import annotations

import resource

import pytest
import torch

from rvc_lora.host_memory import INT_MAX, _glibc, reuse_freed_memory


def _faults(fn: object) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()  # type: ignore[operator]
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's; elsewhere the call changes nothing")
def test_a_large_tensor_allocated_again_reuses_its_pages() -> None:
    assert reuse_freed_memory(2**30)
    pages = 48 * 2**20 // 4096  # a 48 MB buffer: above glibc's own mmap threshold (32 MB at most)

    def fill() -> None:
        torch.empty(48 * 2**20 // 4, dtype=torch.float32).fill_(1.0)  # touched, then freed

    fill()
    again = _faults(fill)
    assert again < pages // 10, f"{again} page faults for {pages} pages: the buffer was mapped afresh"


@pytest.mark.parametrize("size", [0, -1, INT_MAX + 1])
def test_sizes_outside_mallopts_range_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        reuse_freed_memory(size)
