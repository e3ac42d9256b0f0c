"""BufferPool: chunk-sized receive and read buffers reused between chunks, by servers and clients.

A fresh megabyte per chunk costs a zero-fill and, on a VM whose free pages go back to the host,
a page fault per 4 KiB (docs/ARCHITECTURE.md, "Memory allocator"). core.wire receives large frames
into buffers from ``BufferPool.take`` and hands their data over as views; whoever is done with such
a view gives the buffer back with `recycle`.
"""

from __future__ import annotations

import threading
from typing import Final

# Buffers kept at most; sizes are rounded up so that one buffer fits chunks of slightly different
# sizes.
SPARE_BUFFERS: Final = 8
BUFFER_STEP: Final = 64 << 10


class BufferPool:
    """Chunk-sized buffers shared by connections and worker threads (thread-safe)."""

    def __init__(self, *, spare: int = SPARE_BUFFERS) -> None:
        self._lock = threading.Lock()
        self._spare: list[bytearray] = []
        self._keep = spare

    def take(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes."""
        with self._lock:
            for i in range(len(self._spare) - 1, -1, -1):
                if len(self._spare[i]) >= size:
                    return self._spare.pop(i)
        return bytearray(-(-size // BUFFER_STEP) * BUFFER_STEP)

    def give(self, buffer: bytearray) -> None:
        """Keep ``buffer`` for reuse, unless something still has a view of it or it is kept already."""
        if not _unshared(buffer):
            return  # a view is alive (a transport still sending from it, a traceback): let it go
        with self._lock:
            if len(self._spare) < self._keep and all(b is not buffer for b in self._spare):
                self._spare.append(buffer)


def recycle(data: bytes | memoryview, pool: BufferPool) -> None:
    """Release ``data`` (a view core.wire handed over) and give its buffer back to ``pool``.

    The view is unusable afterwards; bytes, or a view of anything but a bytearray, are left alone.
    """
    if isinstance(data, memoryview) and isinstance(data.obj, bytearray):
        buffer = data.obj
        data.release()
        pool.give(buffer)  # kept only if no other view of it is alive


def _unshared(buffer: bytearray) -> bool:
    """True if no view of ``buffer`` is alive: CPython refuses to resize a bytearray with views.

    The probe grows the buffer by one byte and shrinks it back; after the first time the byte
    fits the spare room the resize left, so reused buffers are not moved again.
    """
    try:
        buffer.append(0)
    except BufferError:
        return False
    del buffer[-1]
    return True
