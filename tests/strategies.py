"""Hypothesis strategies for the pure core (ids, keys, names, peer hints, capabilities, files)."""

from __future__ import annotations

from hypothesis import strategies as st

from p2pmega.core.chunking import ChunkId
from p2pmega.core.magnet import KeepCap, ReadCap

chunk_ids = st.binary(min_size=32, max_size=32).map(ChunkId)
keys = st.binary(min_size=32, max_size=32)
# Any text without control characters or lone surrogates (which cannot be UTF-8).
names = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=40)
sizes = st.integers(min_value=0, max_value=(1 << 64) - 1)
hosts = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
peers = st.tuples(hosts, st.integers(min_value=1, max_value=65535))
peer_hints = st.lists(peers, max_size=4, unique=True).map(tuple)

read_caps = st.builds(
    ReadCap,
    root=chunk_ids,
    key=keys,
    name=st.none() | names,
    size=st.none() | sizes,
    peers=peer_hints,
)
keep_caps = st.builds(KeepCap, root=chunk_ids, verify_key=keys, peers=peer_hints)

# Small chunk sizes keep files with many chunks and deep manifest trees cheap:
# 64-byte chunks give nodes of 2 ids, 96-byte chunks nodes of 3.
small_chunk_sizes = st.sampled_from([64, 96, 160])


@st.composite
def files(draw: st.DrawFn, chunk_size: int) -> bytes:
    """File contents around the interesting boundaries of ``chunk_size``."""
    size = draw(
        st.sampled_from(
            [0, 1, chunk_size - 1, chunk_size, chunk_size + 1, 3 * chunk_size + 7, 9 * chunk_size]
        )
        | st.integers(min_value=0, max_value=12 * chunk_size)
    )
    return draw(st.binary(min_size=size, max_size=size))
