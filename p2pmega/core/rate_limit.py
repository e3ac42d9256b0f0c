"""Token buckets per source network (IPv4 /24, IPv6 /48), bounded in memory (pure, no I/O).

The DHT spends them on every request it serves (issue 16: 8 211 datagrams from 3 addresses filled
every node). The caller passes the time (its event loop's clock).
"""

from __future__ import annotations

from collections import OrderedDict

from p2pmega.core.node_id import network_of


class TokenBucket:
    """At most ``rate_per_s`` cost units per second overall, with bursts of ``burst``."""

    def __init__(self, *, rate_per_s: float, burst: float) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s and burst must be positive")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = burst
        self._at: float | None = None
        self.refused = 0

    def allow(self, cost: float, *, now: float) -> bool:
        """Spend ``cost``; False (and nothing spent) if the bucket is short."""
        if self._at is not None:
            self._tokens = min(
                self.burst, self._tokens + max(0.0, now - self._at) * self.rate_per_s
            )
        self._at = now
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        self.refused += 1
        return False


class NetworkRateLimit:
    """At most ``rate_per_s`` cost units per second per source network, with bursts of ``burst``.

    Remembers at most ``max_networks`` networks; the least recently seen is forgotten first (a
    forgotten network starts again with a full bucket, which only costs one burst).
    """

    def __init__(self, *, rate_per_s: float, burst: float, max_networks: int = 4096) -> None:
        if rate_per_s <= 0 or burst < 1 or max_networks < 1:
            raise ValueError("rate_per_s, burst and max_networks must be positive")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_networks = max_networks
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()
        self.refused = 0

    def allow(self, ip: str, cost: float, *, now: float) -> bool:
        """Spend ``cost`` from the bucket of ``ip``'s network; False (and nothing spent) if short.

        Raises:
            ValueError: ``ip`` is not an IP address.
        """
        network = network_of(ip)
        tokens, at = self._buckets.pop(network, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate_per_s)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        else:
            self.refused += 1
        self._buckets[network] = (tokens, now)
        while len(self._buckets) > self.max_networks:
            self._buckets.popitem(last=False)
        return allowed
