"""Bytes a holder accepts as a stored chunk, for tests that store made-up data (holders check the header)."""

from __future__ import annotations

import os
import random

from p2pmega.core.chunking import (
    CHUNK_OVERHEAD_BYTES,
    FORMAT_VERSION,
    HEADER_BYTES,
    KIND_DATA,
    LEGACY_VERSION,
)


def shaped(data: bytes, kind: int = KIND_DATA) -> bytes:
    """``data`` with its first two bytes made a stored chunk's header (format v1 when too short for v2).

    The rest stays as it is: a holder cannot tell ciphertext from random bytes, only the header and size.
    """
    version = FORMAT_VERSION if len(data) >= CHUNK_OVERHEAD_BYTES else LEGACY_VERSION
    return bytes((version, kind)) + data[HEADER_BYTES:]


def chunk_bytes(size: int, seed: int | random.Random | None = None) -> bytes:
    """``size`` random bytes shaped as a stored chunk (``size`` at least MIN_SEALED_CHUNK_BYTES).

    Fresh random bytes each call, or reproducible ones from ``seed``.
    """
    if seed is None:
        return shaped(os.urandom(size))
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    return shaped(rng.randbytes(size))
