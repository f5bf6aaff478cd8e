"""The tiers of adapter voices: the device tier is the engine's adapter bank, the host tier is here, the disk tier
is the store itself.

The host tier is an LRU bounded in bytes: a voice's host copy holds its validated adapter, laid out as the bank's
slots hold it (`PreparedAdapter`, pinned on CUDA so the copy into a slot is a plain DMA), and its retrieval index
with every vector reconstructed as float32, which can be hundreds of MB for a file of one (a product-quantized
index). The device tier is the bank's slots (`RVC_LORA_BANK_SLOTS`): a voice is resident there or is copied into
a free or the least recently used unpinned slot, one fused copy of its host copy. A request needs its voice's
index as well as its weights, so a voice leaves the bank when it leaves the host tier: every resident voice has a
host copy. The voice just loaded always stays, even alone above the budget.

Used from the worker's device thread only, so there is no locking: a lookup, a load and an eviction never
interleave with a conversion (and no slot is pinned between device calls, so a load always finds a slot).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Literal, Protocol, TypeVar

H = TypeVar("H")  # host copy
H_contra = TypeVar("H_contra", contravariant=True)
Tier = Literal["device", "host", "disk"]


class DeviceTier(Protocol[H_contra]):
    """The adapter bank as the cache sees it (`Engine` implements it)."""

    def to_device(self, voice: H_contra) -> bool:
        """Make `voice` resident in a slot unless it is; whether it was (a device hit)."""
        ...

    def device_voices(self) -> int:
        """Voices resident in the bank now (read from any thread: a gauge)."""
        ...

    def drop_device(self, voice: H_contra) -> None:
        """Free `voice`'s slot for other voices (unless a batch pins it); its weights stay until overwritten."""
        ...


class VoiceCache(Generic[H]):
    """`get(key)` makes the voice resident on the device and returns its host copy and the tier it came from
    (device hit, host hit, or disk)."""

    def __init__(self, host_bytes: int, size_of: Callable[[H], int], device: DeviceTier[H]) -> None:
        if host_bytes < 1:
            raise ValueError(f"host_cache_bytes must be >= 1, got {host_bytes}")
        self.host_bytes = host_bytes
        self._host: OrderedDict[str, tuple[H, int]] = OrderedDict()
        self._held = 0  # bytes of the host copies
        self._size_of, self._device = size_of, device

    def get(self, key: str, load: Callable[[], H]) -> tuple[H, Tier]:
        """`load` reads, validates and prepares the voice from disk; it runs only when the host tier lacks `key`.
        A load that fails leaves both tiers as they were."""
        entry = self._host.get(key)
        if entry is None:
            host = load()
            size = max(int(self._size_of(host)), 0)
            self._host[key] = (host, size)
            self._held += size
        self._host.move_to_end(key)
        while self._held > self.host_bytes and len(self._host) > 1:
            self.discard(next(iter(self._host)))  # the oldest; never `key`, which was just moved to the end
        host = self._host[key][0]
        resident = self._device.to_device(host)
        return host, "disk" if entry is None else "device" if resident else "host"

    def discard(self, key: str) -> None:
        entry = self._host.pop(key, None)
        if entry is not None:
            self._held -= entry[1]
            self._device.drop_device(entry[0])

    def sizes(self) -> tuple[int, int]:
        """(adapters resident in the bank, adapters in host memory)."""
        return self._device.device_voices(), len(self._host)

    @property
    def held_bytes(self) -> int:
        """Bytes of the host copies (adapter tensors and reconstructed index vectors)."""
        return self._held
