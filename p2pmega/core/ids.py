"""The kinds of id p2pmega handles, their sizes, the DHT key of a chunk, and how ids are shown to people.

Pure and import-free (within p2pmega), so every layer can name ids the same way.
"""

from __future__ import annotations

import base64
from typing import NewType

ChunkId = NewType("ChunkId", bytes)
"""SHA-256 of the exact stored bytes of a chunk (32 bytes); anyone can check it without a key."""

NodeId = NewType("NodeId", bytes)
"""A peer's Kademlia id: 20 bytes derived from its Ed25519 key (core.crypto.node_id_of)."""

Address = tuple[str, int]
"""A peer's (host, port) as we connect to it; its country comes from this host, never from the peer."""

# SHA-256, core.crypto.HASH_BYTES (tests/unit/test_chunking.py checks they agree).
CHUNK_ID_BYTES = 32
# Kademlia's 160-bit id space (section 2 of the paper; kademlia 2.2.3 uses 20-byte ids).
NODE_ID_BYTES = 20
DHT_KEY_BYTES = NODE_ID_BYTES  # a chunk is looked up under a key of the node-id space


def dht_key_of(chunk_id: bytes) -> bytes:
    """The 160-bit Kademlia key under which holders of a chunk announce themselves.

    Args:
        chunk_id: A chunk id.

    Returns:
        Its first ``DHT_KEY_BYTES`` bytes (SHA-256 prefixes are uniform, as Kademlia needs).

    Raises:
        ValueError: ``chunk_id`` is not ``CHUNK_ID_BYTES`` bytes.
    """
    if not isinstance(chunk_id, bytes) or len(chunk_id) != CHUNK_ID_BYTES:
        raise ValueError(f"a chunk id is {CHUNK_ID_BYTES} bytes")
    return chunk_id[:DHT_KEY_BYTES]


def format_id(any_id: bytes) -> str:
    """An id as people see it everywhere: unpadded lower-case base32, the alphabet of a link's ``xt``.

    So the root a user reads in ``check`` or an error is the one in their link.
    """
    return base64.b32encode(any_id).decode("ascii").rstrip("=").lower()


def short_id(chunk_id: bytes) -> str:
    """A chunk id abbreviated for messages, e.g. ``3kvq7mbx2fpa…e4xq``.

    Args:
        chunk_id: Any id.

    Returns:
        The first 12 and last 4 characters of ``format_id``.
    """
    text = format_id(chunk_id)
    return f"{text[:12]}…{text[-4:]}" if len(text) > 16 else text
