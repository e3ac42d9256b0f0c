"""Per-source limits of a chunk store: what one /24 (IPv6 /48) may hold and how fast it may store.

The store keys both by the network a STORE came from (core.node_id.network_of); the bytes each network holds live
in the index (``sources`` table), the store rate in the token buckets here. docs/STORAGE.md, "Per-source limits".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from p2pmega.core.chunking import MAX_SEALED_CHUNK_BYTES
from p2pmega.defaults import NETWORK_RATE_BYTES_PER_MIN, NETWORK_SHARE
from p2pmega.errors import BadOption, SourceLimitExceeded

# Buckets of networks that stored nothing lately are full again, the same as a new bucket: past this many
# buckets the full ones are forgotten, so a scan from many networks cannot grow the table without bound.
MAX_BUCKETS: Final = 4096


@dataclass(frozen=True)
class SourceLimits:
    """How much of a store one source network may hold, and how fast it may store.

    ``network_share`` is the fraction of the quota one network may hold (1.0: no cap of its own);
    ``rate_bytes_per_min`` the bytes a minute it may store, with a burst of as much (0: no limit).
    """

    network_share: float = NETWORK_SHARE
    rate_bytes_per_min: int = NETWORK_RATE_BYTES_PER_MIN

    def __post_init__(self) -> None:
        if not (math.isfinite(self.network_share) and 0 < self.network_share <= 1):
            raise BadOption(
                f"network share {self.network_share!r} is not a fraction in (0, 1]; pass e.g. 0.25"
            )
        if self.rate_bytes_per_min < 0:
            raise BadOption(f"store rate {self.rate_bytes_per_min!r} is negative; pass e.g. 1GiB")

    def cap_bytes(self, quota_bytes: int) -> int:
        """The most bytes one network may hold in a store of ``quota_bytes``."""
        return int(quota_bytes * self.network_share)


def describe_source(source: bytes) -> str:
    """A source network as people read it: ``203.0.113.0/24``, ``2001:db8:1::/48``, or ``unknown``."""
    if len(source) == 4:
        return ".".join(str(b) for b in source) + "/24"
    if len(source) == 16:
        groups = [source[i : i + 2].hex().lstrip("0") or "0" for i in range(0, 6, 2)]
        return ":".join(groups) + "::/48"
    return "unknown"


class StoreRates:
    """One token bucket per source network: ``rate_bytes_per_min`` refill, a minute's worth of burst.

    Not locked: the store calls it under its own lock. ``clock`` is monotonic seconds.
    """

    def __init__(self, rate_bytes_per_min: int, clock: Callable[[], float]) -> None:
        self.rate_bytes_per_min = rate_bytes_per_min
        # A bucket always holds at least the largest chunk, or that chunk could never be stored.
        self.burst_bytes = max(rate_bytes_per_min, MAX_SEALED_CHUNK_BYTES)
        self._clock = clock
        self._buckets: dict[bytes, tuple[float, float]] = {}  # network -> (tokens, when)

    def take(self, source: bytes, size: int) -> None:
        """Spend ``size`` bytes of ``source``'s bucket.

        Raises:
            SourceLimitExceeded: The bucket holds less than ``size``; nothing is spent.
        """
        if not self.rate_bytes_per_min:
            return
        now = self._clock()
        tokens = self.tokens(source, now)
        if tokens < size:
            wait_s = (size - tokens) * 60 / self.rate_bytes_per_min
            raise SourceLimitExceeded(
                f"{describe_source(source)} stored over {self.rate_bytes_per_min} bytes a minute; "
                f"retry in {wait_s:.0f} s or store elsewhere"
            )
        if len(self._buckets) >= MAX_BUCKETS and source not in self._buckets:
            self._forget_full(now)
        self._buckets[source] = (tokens - size, now)

    def refund(self, source: bytes, size: int) -> None:
        """Give back ``size`` bytes taken for a store that then failed."""
        if source in self._buckets:
            tokens, when = self._buckets[source]
            self._buckets[source] = (min(self.burst_bytes, tokens + size), when)

    def tokens(self, source: bytes, now: float) -> float:
        """Bytes ``source`` may store at ``now`` without waiting."""
        tokens, when = self._buckets.get(source, (float(self.burst_bytes), now))
        refill = max(0.0, now - when) * self.rate_bytes_per_min / 60
        return min(float(self.burst_bytes), tokens + refill)

    def _forget_full(self, now: float) -> None:
        for source in [s for s in self._buckets if self.tokens(s, now) >= self.burst_bytes]:
            del self._buckets[source]
        if len(self._buckets) >= MAX_BUCKETS:
            # Every bucket is in use: forget the fullest, which costs its network the least.
            fullest = max(self._buckets, key=lambda s: self.tokens(s, now))
            del self._buckets[fullest]
