"""How far a TCP transport's writes have got, for timeouts that measure progress instead of size.

Not a timer: the client and the server poll `unacknowledged_bytes` from their own timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import struct
import termios
from typing import Final

# SIOCOUTQ (Linux, man 7 tcp): bytes in the socket's send queue the peer has not acknowledged yet.
# It has the same number as TIOCOUTQ; platforms without it count only asyncio's own buffer.
_OUTQ: Final = getattr(termios, "TIOCOUTQ", None)
_INT: Final = struct.Struct("i")


def unacknowledged_bytes(transport: asyncio.WriteTransport) -> int:
    """Bytes written to ``transport`` that the peer's TCP has not acknowledged yet.

    asyncio's write buffer is only part of it: the kernel takes megabytes into its send buffer
    (Linux autotunes it up to ``tcp_wmem``, 4 MiB by default), which a 1 Mbit/s uplink takes half
    a minute to send. Bytes written minus this count is what the link has carried so far.
    """
    queued = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if _OUTQ is not None and sock is not None:
        # A closed or non-TCP socket has no send queue to report: count asyncio's buffer only.
        with contextlib.suppress(OSError, ValueError):
            queued += _INT.unpack(fcntl.ioctl(sock.fileno(), _OUTQ, bytes(_INT.size)))[0]
    return queued
