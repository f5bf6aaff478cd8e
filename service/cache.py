"""Device and host tiers of adapter voices (LRU each); the disk tier is the store itself.

Used from the worker's device thread only, so there is no locking: a lookup, a load and an eviction
never interleave with a conversion.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Literal, TypeVar

H = TypeVar("H")  # host copy
D = TypeVar("D")  # device copy
Tier = Literal["device", "host", "disk"]


class _LRU(Generic[H]):
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, H] = OrderedDict()

    def get(self, key: str) -> H | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: str, item: H) -> None:
        self._items[key] = item
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def discard(self, key: str) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)



class VoiceCache(Generic[H, D]):
    """`get(key)` returns the device copy and the tier it came from (device hit, host hit, or disk)."""

    def __init__(self, device_slots: int, host_slots: int, to_device: Callable[[H], D]) -> None:
        self._device: _LRU[D] = _LRU(device_slots)
        self._host: _LRU[H] = _LRU(host_slots)
        self._to_device = to_device

    def get(self, key: str, load: Callable[[], H]) -> tuple[D, Tier]:
        """`load` reads the voice from disk; it runs only when neither tier holds `key`."""
        on_device = self._device.get(key)
        if on_device is not None:
            return on_device, "device"
        host = self._host.get(key)
        tier: Tier = "host"
        if host is None:
            host, tier = load(), "disk"
            self._host.put(key, host)
        on_device = self._to_device(host)
        self._device.put(key, on_device)
        return on_device, tier

    def discard(self, key: str) -> None:
        self._device.discard(key)
        self._host.discard(key)

    def sizes(self) -> tuple[int, int]:
        """(adapters on the device, adapters in host memory)."""
        return len(self._device), len(self._host)
