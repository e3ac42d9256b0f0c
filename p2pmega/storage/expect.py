"""Expectations: the chunks a sharer told this holder to accept from a forwarder (docs/PROTOCOL.md, "Forwarding").

A sharer that uploads a chunk once sends it to its first holder, which forwards it here. Before that, the sharer
tells this holder directly (EXPECT) which chunk, for how long and with which renewal key. The forwarded copy is
then kept as if the sharer had stored it: counted against the sharer's network, with the sharer's lease and key.
A forwarded store with no live expectation is refused, so a forwarder can neither store here on its own account
through a sharer nor fill this holder with chunks no sharer asked for. Thread-safe: workers call it at once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from p2pmega.core.ids import ChunkId

# How long an expectation waits for its forward: far beyond a chunk's forward over a slow link, short enough that
# a sharer that gave up (and stored the copy itself) leaves nothing behind for long.
EXPECT_TTL_S: Final = 120.0
# Expectations per source network and in all: a sharer keeps a few runs of chunks in flight, not thousands.
MAX_EXPECTED_PER_SOURCE: Final = 4096
MAX_EXPECTED: Final = 65536


@dataclass(frozen=True)
class Expected:
    """What a sharer asked a forwarded copy of one chunk to be kept as."""

    source: bytes  # the sharer's network (core.node_id.network_of): what the copy counts against
    lease_s: int
    renew_key: bytes
    until: float  # monotonic deadline


class Expectations:
    """Live expectations by chunk id, bounded per source network and in all, each until its deadline."""

    def __init__(
        self,
        *,
        ttl_s: float = EXPECT_TTL_S,
        per_source: int = MAX_EXPECTED_PER_SOURCE,
        total: int = MAX_EXPECTED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.per_source = per_source
        self.total = total
        self._clock = clock
        self._lock = threading.Lock()
        self._by_id: OrderedDict[ChunkId, Expected] = OrderedDict()  # oldest deadline first
        self._per_source: Counter[bytes] = Counter()

    def __len__(self) -> int:
        return len(self._by_id)

    def expect(
        self, source: bytes, ids: Sequence[ChunkId], *, lease_s: int, renew_key: bytes
    ) -> list[bool]:
        """Accept forwards of ``ids`` for ``ttl_s``; False for each id past a cap (or held for another source)."""
        now = self._clock()
        flags: list[bool] = []
        with self._lock:
            self._expire_locked(now)
            for chunk_id in ids:
                old = self._by_id.get(chunk_id)
                if old is not None and old.source != source:
                    # Another network expects it already: the first sharer's terms stand until they lapse.
                    flags.append(False)
                    continue
                if old is None and (
                    len(self._by_id) >= self.total or self._per_source[source] >= self.per_source
                ):
                    flags.append(False)
                    continue
                if old is None:
                    self._per_source[source] += 1
                else:
                    del self._by_id[chunk_id]
                self._by_id[chunk_id] = Expected(source, lease_s, renew_key, now + self.ttl_s)
                flags.append(True)
        return flags

    def take(self, chunk_id: ChunkId) -> Expected | None:
        """The live expectation of ``chunk_id``, removed (one forward fulfils it); None if there is none."""
        now = self._clock()
        with self._lock:
            self._expire_locked(now)
            expected = self._by_id.pop(chunk_id, None)
            if expected is not None:
                self._drop_count_locked(expected.source)
            return expected

    def put_back(self, chunk_id: ChunkId, expected: Expected) -> None:
        """Restore an expectation whose forward failed (bad bytes): the right bytes may still come in time."""
        with self._lock:
            if chunk_id in self._by_id:
                return
            self._by_id[chunk_id] = expected
            self._per_source[expected.source] += 1

    def _expire_locked(self, now: float) -> None:
        # Deadlines grow with insertion (a renewed id moves to the end), so expired ones lead.
        while self._by_id:
            chunk_id, expected = next(iter(self._by_id.items()))
            if expected.until > now:
                break
            del self._by_id[chunk_id]
            self._drop_count_locked(expected.source)

    def _drop_count_locked(self, source: bytes) -> None:
        self._per_source[source] -= 1
        if self._per_source[source] <= 0:
            del self._per_source[source]
