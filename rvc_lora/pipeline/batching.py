"""Batching where it is exact: equal-length inputs stacked into one forward.

The content encoder and the pitch networks have no padding masks that would make a padded row equal to the row
alone: HuBERT's first conv layer group-normalises each channel over the whole time axis, RMVPE's BiGRU runs
through to the last frame and back, and FCPE's attention spans every frame. So rows are batched only with rows of
the same length (`equal_length_groups`); a batch of n lengths is n forwards, each over all rows of that length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def equal_length_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of `lengths` grouped by equal value, groups in order of first appearance, indices ascending."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return list(groups.values())


def run_grouped(items: Sequence[T], lengths: Sequence[int], run: Callable[[list[T]], list[R]]) -> list[R]:
    """`run` once per group of equal-length items (it gets the group's items, returns one result per item),
    results back in the order of `items`."""
    out: list[R | None] = [None] * len(items)
    for group in equal_length_groups(lengths):
        for i, result in zip(group, run([items[i] for i in group]), strict=True):
            out[i] = result
    assert all(r is not None for r in out)
    return out  # type: ignore[return-value]
