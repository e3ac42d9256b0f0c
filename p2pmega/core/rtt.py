"""Round-trip time estimates for timeouts that follow the network, in the spirit of RFC 6298.

Pure: samples in, estimates out; the caller measures time. A DHT lookup uses ``stall_after`` to decide when a query
no longer holds up the lookup (its answer is still used if it comes): a fixed value is either too slow for a fast
network or falsely gives up on a slow peer. Section 2 of RFC 6298: SRTT and RTTVAR from the first sample, then
exponentially weighted averages with alpha 1/8 and beta 1/4; RTO = SRTT + max(G, K x RTTVAR), K = 4.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

ALPHA = 1 / 8
BETA = 1 / 4
K = 4
# Clock granularity G: asyncio's loop clock is far finer; this keeps a run of identical samples from giving an RTO
# of exactly the RTT, which the next sample would exceed by a hair.
GRANULARITY_S = 0.005


@dataclass
class RttEstimate:
    """SRTT and RTTVAR of one path (or of all paths, for a peer not heard from yet)."""

    srtt_s: float
    rttvar_s: float

    @classmethod
    def first(cls, sample_s: float) -> RttEstimate:
        return cls(sample_s, sample_s / 2)

    def update(self, sample_s: float) -> None:
        self.rttvar_s = (1 - BETA) * self.rttvar_s + BETA * abs(self.srtt_s - sample_s)
        self.srtt_s = (1 - ALPHA) * self.srtt_s + ALPHA * sample_s

    @property
    def rto_s(self) -> float:
        return self.srtt_s + max(GRANULARITY_S, K * self.rttvar_s)


class RttTable:
    """Estimates per peer (the most recent ``max_peers`` of them) and for all peers together.

    ``stall_after(peer)`` is the peer's RTO if it has answered before, else the RTO of all answers; clamped to
    [``floor_s``, ``ceiling_s``]. Before any answer at all it is ``ceiling_s``.
    """

    def __init__(self, *, floor_s: float, ceiling_s: float, max_peers: int = 4096) -> None:
        if not 0 < floor_s <= ceiling_s:
            raise ValueError("need 0 < floor_s <= ceiling_s")
        self.floor_s = floor_s
        self.ceiling_s = ceiling_s
        self.max_peers = max_peers
        self.overall: RttEstimate | None = None
        self._peers: OrderedDict[Hashable, RttEstimate] = OrderedDict()

    def sample(self, peer: Hashable, rtt_s: float) -> None:
        """Record one answered request's round trip (retransmissions never happen here: UDP, one try)."""
        rtt_s = max(0.0, rtt_s)
        if self.overall is None:
            self.overall = RttEstimate.first(rtt_s)
        else:
            self.overall.update(rtt_s)
        known = self._peers.pop(peer, None)
        if known is None:
            known = RttEstimate.first(rtt_s)
        else:
            known.update(rtt_s)
        self._peers[peer] = known
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)

    def stall_after(self, peer: Hashable) -> float:
        estimate = self._peers.get(peer) or self.overall
        if estimate is None:
            return self.ceiling_s
        return min(self.ceiling_s, max(self.floor_s, estimate.rto_s))
