"""Which DHT contacts a lookup should not wait on: "never wait on the dead twice" (issue 15, docs/DHT.md).

Pure: the caller passes the time (its event loop's clock) and node ids and addresses. A contact is *suspect* when
it has left a request unanswered for longer than its measured stall time (``core.rtt``), or when a request to it
timed out less than ``failed_ttl_s`` ago; any answer clears it. Failures are kept by node id and by address (the
saved-contacts file, which has no ids, carries them from one command to the next).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

from p2pmega.core.rtt import RttTable

Address = tuple[str, int]
_K = TypeVar("_K")

# A contact whose request timed out is skipped this long; bounded, the oldest forgotten first.
FAILED_TTL_S = 60.0
MAX_FAILED = 10_000


class Liveness:
    """Unanswered and failed requests per contact, and the round-trip estimates that say how long is too long."""

    def __init__(
        self, rtt: RttTable, *, failed_ttl_s: float = FAILED_TTL_S, max_failed: int = MAX_FAILED
    ) -> None:
        self.rtt = rtt
        self.failed_ttl_s = failed_ttl_s
        self.max_failed = max_failed
        self._unanswered: dict[
            bytes, tuple[float, Address]
        ] = {}  # node id -> oldest unanswered send
        self._failed: OrderedDict[bytes, float] = OrderedDict()
        self._failed_at: OrderedDict[Address, float] = OrderedDict()

    def sent(self, node_id: bytes, address: Address, now: float) -> None:
        self._unanswered.setdefault(node_id, (now, address))

    def answered(self, node_id: bytes, address: Address) -> None:
        self._unanswered.pop(node_id, None)
        self._failed.pop(node_id, None)
        self._failed_at.pop(address, None)

    def forget(self, node_id: bytes) -> None:
        """A request was withdrawn before its answer could come: it proves nothing either way."""
        self._unanswered.pop(node_id, None)

    def missed(self, node_id: bytes, address: Address, now: float) -> None:
        """A request timed out (or its reply was malformed)."""
        self._unanswered.pop(node_id, None)
        self.remember_failed(address, now, node_id)

    def remember_failed(self, address: Address, at: float, node_id: bytes | None = None) -> None:
        if node_id is not None:
            self._put(self._failed, node_id, at)
        self._put(self._failed_at, address, at)

    def suspect(self, node_id: bytes, address: Address, now: float) -> bool:
        if self._recent(self._failed, node_id, now) or self._recent(self._failed_at, address, now):
            return True
        sent = self._unanswered.get(node_id)
        return sent is not None and now - sent[0] >= self.rtt.stall_after(sent[1])

    def failed_contacts(self, now: float) -> dict[Address, float]:
        """Addresses that failed within the TTL or are silent past their stall time, with when (clock time)."""
        found = {a: at for a, at in self._failed_at.items() if now - at < self.failed_ttl_s}
        for sent_at, address in self._unanswered.values():
            if now - sent_at >= self.rtt.stall_after(address):
                found.setdefault(address, sent_at)
        return found

    def _put(self, table: OrderedDict[_K, float], key: _K, at: float) -> None:
        table.pop(key, None)
        table[key] = at
        while len(table) > self.max_failed:
            table.popitem(last=False)

    def _recent(self, table: OrderedDict[_K, float], key: _K, now: float) -> bool:
        at = table.get(key)
        if at is None:
            return False
        if now - at < self.failed_ttl_s:
            return True
        del table[key]
        return False
