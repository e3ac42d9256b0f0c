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
from collections import OrderedDict
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
    """Live expectations by chunk id, bounded per source network and in all, each until its deadline.

    When the table is full, a newcomer takes the place of the oldest expectation of the network holding most (as the
    transfer server treats connections): a few networks flooding it with ids cannot keep others' forwards out.
    """

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
        self._by_id: dict[ChunkId, Expected] = {}
        # Each network's ids, oldest first: its count, and what to drop when it is the most crowded.
        self._of_source: dict[bytes, OrderedDict[ChunkId, None]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def expect(
        self, source: bytes, ids: Sequence[ChunkId], *, lease_s: int, renew_key: bytes
    ) -> list[bool]:
        """Accept forwards of ``ids`` for ``ttl_s``; False for each id past its network's cap (or expected by another)."""
        now = self._clock()
        flags: list[bool] = []
        with self._lock:
            for chunk_id in ids:
                old = self._live_locked(chunk_id, now)
                if old is not None and old.source != source:
                    # Another network expects it already: the first sharer's terms stand until they lapse.
                    flags.append(False)
                    continue
                mine = self._of_source.get(source)
                if old is None and mine is not None and len(mine) >= self.per_source:
                    self._drop_locked(
                        next(iter(mine))
                    )  # its own oldest: a sharer moves on through a file
                elif (
                    old is None
                    and len(self._by_id) >= self.total
                    and not self._make_room_locked(source, now)
                ):
                    flags.append(False)
                    continue
                self._put_locked(chunk_id, Expected(source, lease_s, renew_key, now + self.ttl_s))
                flags.append(True)
        return flags

    def take(self, chunk_id: ChunkId) -> Expected | None:
        """The live expectation of ``chunk_id``, removed (one forward fulfils it); None if there is none."""
        with self._lock:
            expected = self._live_locked(chunk_id, self._clock())
            if expected is not None:
                self._drop_locked(chunk_id)
            return expected

    def put_back(self, chunk_id: ChunkId, expected: Expected) -> None:
        """Restore an expectation whose forward failed (bad bytes): the right bytes may still come in time."""
        with self._lock:
            now = self._clock()
            if expected.until <= now or self._live_locked(chunk_id, now) is not None:
                return
            mine = self._of_source.get(expected.source)
            if len(self._by_id) >= self.total or (
                mine is not None and len(mine) >= self.per_source
            ):
                return  # its place was taken meanwhile: the sharer uploads that copy itself
            self._put_locked(chunk_id, expected)

    def _live_locked(self, chunk_id: ChunkId, now: float) -> Expected | None:
        expected = self._by_id.get(chunk_id)
        if expected is not None and expected.until <= now:
            self._drop_locked(chunk_id)
            return None
        return expected

    def _make_room_locked(self, source: bytes, now: float) -> bool:
        """Free one place: a lapsed expectation, else the oldest of the network holding most (never ``source``'s
        own unless it holds most); False if ``source`` itself is that network (its per-network cap decides)."""
        crowded = max(self._of_source, key=lambda s: len(self._of_source[s]))
        mine = self._of_source.get(source)
        if mine is not None and len(mine) >= len(self._of_source[crowded]):
            return False
        for ids in (
            self._of_source.values()
        ):  # the oldest of each network first: a lapsed one costs nobody
            oldest = next(iter(ids))
            if self._by_id[oldest].until <= now:
                self._drop_locked(oldest)
                return True
        self._drop_locked(next(iter(self._of_source[crowded])))
        return True

    def _put_locked(self, chunk_id: ChunkId, expected: Expected) -> None:
        if chunk_id in self._by_id:
            self._drop_locked(chunk_id)
        self._by_id[chunk_id] = expected
        self._of_source.setdefault(expected.source, OrderedDict())[chunk_id] = None

    def _drop_locked(self, chunk_id: ChunkId) -> None:
        expected = self._by_id.pop(chunk_id)
        ids = self._of_source[expected.source]
        del ids[chunk_id]
        if not ids:
            del self._of_source[expected.source]
