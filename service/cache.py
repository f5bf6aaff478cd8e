"""Device and host tiers of adapter voices; the disk tier is the store itself.

The device tier is an LRU of `device_slots` voices. The host tier is an LRU bounded in bytes: a voice's
host copy holds its adapter tensors and its retrieval index with every vector reconstructed as float32,
which can be hundreds of MB for a file of one (a product-quantized index). A device copy shares its
host copy's index, so a voice leaves the device tier when it leaves the host tier: the bytes counted are
the bytes held. The voice just loaded always stays, even alone above the budget.

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


class VoiceCache(Generic[H, D]):
    """`get(key)` returns the device copy and the tier it came from (device hit, host hit, or disk)."""

    def __init__(self, device_slots: int, host_bytes: int, to_device: Callable[[H], D],
                 size_of: Callable[[H], int]) -> None:
        if device_slots < 1 or host_bytes < 1:
            raise ValueError(f"cache capacities must be >= 1, got {device_slots} slots and {host_bytes} bytes")
        self.device_slots, self.host_bytes = device_slots, host_bytes
        self._device: OrderedDict[str, D] = OrderedDict()
        self._host: OrderedDict[str, tuple[H, int]] = OrderedDict()
        self._held = 0  # bytes of the host copies
        self._to_device, self._size_of = to_device, size_of

    def get(self, key: str, load: Callable[[], H]) -> tuple[D, Tier]:
        """`load` reads the voice from disk; it runs only when neither tier holds `key`."""
        tier: Tier = "device" if key in self._device else "host" if key in self._host else "disk"
        if tier == "disk":
            host = load()
            size = max(int(self._size_of(host)), 0)
            self._host[key] = (host, size)
            self._held += size
        self._host.move_to_end(key)
        while self._held > self.host_bytes and len(self._host) > 1:
            self.discard(next(iter(self._host)))  # the oldest; never `key`, which was just moved to the end
        if tier != "device":
            self._device[key] = self._to_device(self._host[key][0])
        self._device.move_to_end(key)
        while len(self._device) > self.device_slots:
            self._device.popitem(last=False)
        return self._device[key], tier

    def discard(self, key: str) -> None:
        self._device.pop(key, None)
        entry = self._host.pop(key, None)
        if entry is not None:
            self._held -= entry[1]

    def sizes(self) -> tuple[int, int]:
        """(adapters on the device, adapters in host memory)."""
        return len(self._device), len(self._host)

    @property
    def held_bytes(self) -> int:
        """Bytes of the host copies (adapter tensors and reconstructed index vectors)."""
        return self._held
