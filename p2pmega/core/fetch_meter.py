"""What a fetch knows of one holder: its rate, measured from the bytes it sends while busy, and the requests it
has under way. Pure: times and byte counts are parameters (api/fetch_schedule.py reads the client's counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from p2pmega.core.fetch_plan import MIN_RATE_BYTES_S

# A holder's rate before it is measured: optimistic (100 MiB/s), so every holder gets a first request and is
# measured. Until then it has one request at a time.
PRIOR_RATE_BYTES_S: Final = 100 * 1024 * 1024
# A holder busy this long (or that delivered a chunk) has a measured rate: at 10 Mbit/s a tenth of a second
# is ~125 KB, enough to tell it from one at 50.
MEASURE_S: Final = 0.1
# A request running this many times its expected duration (at least OVERDUE_MIN_S) counts as taking at least
# as long again: its holder may have stalled.
OVERDUE_FACTOR: Final = 2.0
OVERDUE_MIN_S: Final = 0.1


@dataclass(eq=False, kw_only=True)
class Sent:
    """One request under way at a holder."""

    size: int
    started: float
    expected_s: float
    # Asked of another holder because that one would finish it sooner: no longer counted in this holder's load.
    moved: bool = False


@dataclass
class HolderMeter:
    """One holder's measured rate and the requests it has under way, in the order asked."""

    rate_bytes_s: float = PRIOR_RATE_BYTES_S
    measured: bool = False
    requests: list[Sent] = field(default_factory=list)
    # Its rate is bytes received over time busy (some request under way): requests under way at once share its
    # link, so the time per request would count that link several times over.
    delivered_bytes: int = 0
    busy_s: float = 0.0
    busy_mark: float = 0.0
    received_mark: int = 0  # the client's byte count for it when last looked at
    # Bytes received of the requests under way (credited to them in the order asked).
    progress_bytes: int = 0
    # When we last cancelled a request of its (which closes that connection).
    dropped_at: float = -1.0

    def account(self, now: float, received: int) -> bool:
        """Take in the client's byte count for it and the time passed since the last look; True if it became
        measured."""
        # The client forgets a holder whose connections all closed as idle: its count starts again from 0.
        delta = received - self.received_mark if received >= self.received_mark else received
        self.received_mark = received
        if self.requests:
            self.busy_s += now - self.busy_mark
            self.delivered_bytes += delta
            outstanding = sum(r.size for r in self.requests)
            self.progress_bytes = min(outstanding, self.progress_bytes + delta)
        self.busy_mark = now
        newly = not self.measured and self.busy_s >= MEASURE_S
        if newly:
            self.measured = True
        if self.measured:
            self._rate()
        return newly

    def delivered(self, request: Sent) -> None:
        """``request`` arrived whole (call account first): the holder is measured now."""
        self.remove(request, delivered=True)
        self.measured = True
        self._rate()

    def _rate(self) -> None:
        self.rate_bytes_s = max(self.delivered_bytes / max(self.busy_s, 1e-3), MIN_RATE_BYTES_S)

    def remove(self, request: Sent, *, delivered: bool = False) -> None:
        """``request`` is over (call account first): its bytes no longer count as progress."""
        before = 0
        for r in self.requests:
            if r is request:
                break
            before += r.size
        self.requests.remove(request)
        if not self.requests:
            self.progress_bytes = 0
        elif delivered:
            self.progress_bytes = max(0, self.progress_bytes - request.size)
        else:
            self.progress_bytes -= min(max(self.progress_bytes - before, 0), request.size)

    def ends(self, now: float) -> dict[Sent, float]:
        """When each request under way should be done: served in the order asked, at its rate (one running far
        past its expected time counts as taking at least as long again)."""
        out: dict[Sent, float] = {}
        through = 0
        for r in self.requests:
            through += r.size
            end = now + max(0, through - self.progress_bytes) / self.rate_bytes_s
            if now - r.started > OVERDUE_FACTOR * max(r.expected_s, OVERDUE_MIN_S):
                end = max(end, now + (now - r.started))
            out[r] = end
        return out

    def load_s(self, now: float) -> float:
        """How long what it is sending still takes, moved requests left out."""
        ends = self.ends(now)
        return max((ends[r] - now for r in self.requests if not r.moved), default=0.0)

    def kept(self) -> int:
        """Requests under way that were not moved."""
        return sum(1 for r in self.requests if not r.moved)
