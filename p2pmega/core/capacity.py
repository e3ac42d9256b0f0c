"""A storage peer's placement weight from the free space it reports: pure, bounded, deterministic.

A seed answers a SPACE request (docs/PROTOCOL.md) with the bytes the asking network may still store there.
Placement (core.placement, weighted rendezvous hashing) gives each candidate new chunks in proportion to its
weight, so the weight follows the reported free space, within bounds (docs/PLACEMENT.md has the why):

    weight = clamp(free_bytes / REFERENCE_FREE_BYTES, MIN_WEIGHT, MAX_WEIGHT)

and a peer with less room than one chunk is no candidate at all (``is_full``). The report is the peer's own
word: a liar can claim up to MAX_WEIGHT, never more (docs/THREATS.md, "Placement").
"""

from __future__ import annotations

from typing import Final

# What a fresh seed with the default quota (10 GB) offers one sharer's network (its default share, a
# quarter): it weighs 1.0, the same as a peer whose free space is unknown (an older holder, or a crawled
# peer that was not asked), so known and unknown peers mix on one scale.
REFERENCE_FREE_BYTES: Final = 2_500_000_000
# The most a report can be worth: 16 reference seeds (40 GB free and more). A peer claiming 10 PB gets no
# more than this, so it attracts at most what 16 honest default seeds would; a genuinely larger seed is
# under-used rather than one liar taking everything.
MAX_WEIGHT: Final = 16.0
# The least a peer with room for a chunk weighs (about 10 MB free and less): keeps every weight positive
# and the spread bounded (4096:1), so the last few megabytes of a seed are not split into ever smaller
# shares; such a peer already gets 1/256 of a reference seed's load.
MIN_WEIGHT: Final = 1.0 / 256


def is_full(free_bytes: int, chunk_bytes: int) -> bool:
    """Whether a peer reporting ``free_bytes`` cannot take a chunk of ``chunk_bytes``: then it is no candidate.

    Args:
        free_bytes: the free space the peer reported (>= 0).
        chunk_bytes: the size of the stored chunk to place (> 0).

    Returns:
        True if the chunk does not fit.
    """
    return free_bytes < chunk_bytes


def capacity_weight(free_bytes: int) -> float:
    """The placement weight of a peer that reports ``free_bytes`` free: proportional, floored and capped.

    Args:
        free_bytes: the free space the peer reported (any int; negative reads as 0).

    Returns:
        ``free_bytes / REFERENCE_FREE_BYTES`` clamped to [MIN_WEIGHT, MAX_WEIGHT]; monotonic in
        ``free_bytes`` and the same for the same report.
    """
    return min(MAX_WEIGHT, max(MIN_WEIGHT, max(0, free_bytes) / REFERENCE_FREE_BYTES))
