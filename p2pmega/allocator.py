"""Keep glibc from handing chunk buffers (a few MiB) back to the kernel after every use.

Every chunk p2pmega moves is a buffer of 1-4 MiB (received, hashed, sealed or opened, written). glibc
serves such sizes with ``mmap`` or from the top of a heap, and gives them back (``munmap``, heap trim)
as soon as they are freed, so the next chunk's buffer starts as fresh pages: one page fault and one
zeroed page per 4 KiB. On the development VM that made opening a 1 MiB chunk through PyNaCl cost
2.8 ms instead of 0.4 ms, and sealing one 2.1 ms instead of 0.4 ms (docs/ARCHITECTURE.md,
"Memory allocator"). Raising the mmap threshold above the largest chunk and the trim threshold above
a working set of chunks lets freed chunk buffers be reused warm.

Process-wide, so only the command-line entry point calls `tune_allocator`; importing p2pmega as a
library changes nothing. Only glibc has ``mallopt``; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import sys

# glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Above the largest stored chunk (4 MiB + 4 KiB) with room for a frame and its header.
MMAP_THRESHOLD_BYTES = 16 << 20
# Free memory kept at the top of a heap: a few dozen chunk buffers in flight at once.
TRIM_THRESHOLD_BYTES = 64 << 20


def tune_allocator() -> bool:
    """Set glibc's mmap and trim thresholds for chunk-sized buffers.

    Returns:
        True if both were set (Linux with glibc), False where there is no such allocator.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        # dlopen(NULL): the symbols already loaded, libc's among them (find_library would run ldconfig).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt, nothing to tune
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
