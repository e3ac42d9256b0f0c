"""One table between exceptions and the wire's error codes, for both sides of a transfer.

A holder turns what its store raised into a typed Error reply (`error_reply`); a client turns that
reply back into the exception its caller expects (`raise_for`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, NoReturn

from p2pmega import errors
from p2pmega.core.chunking import short_id
from p2pmega.core.ids import Address
from p2pmega.core.wire import Error, ErrorCode, Request, StoreRequest

# What the store raised -> the code and log text of the reply, first match wins (QuotaExceeded is a
# StorageError). The text names the exception's type only: paths and values stay on the holder.
_REPLIES: Final[tuple[tuple[type[Exception], ErrorCode, Callable[[Exception], str]], ...]] = (
    (errors.ChunkNotStored, ErrorCode.NOT_FOUND, lambda _: "chunk not stored here"),
    (errors.BadChunk, ErrorCode.BAD_CHUNK, lambda _: "not a stored chunk (header or size)"),
    (
        errors.SourceLimitExceeded,
        ErrorCode.SOURCE_LIMIT,
        lambda _: "your network's share of the quota or store rate is used up",
    ),
    (errors.BadSignature, ErrorCode.BAD_RENEWAL, lambda _: "renewal signature does not verify"),
    (
        errors.ForwardNotExpected,
        ErrorCode.NOT_EXPECTED,
        lambda _: "no sharer asked this holder to accept that forward",
    ),
    (errors.QuotaExceeded, ErrorCode.QUOTA_FULL, lambda _: "store quota is full"),
    (errors.UsageError, ErrorCode.BAD_REQUEST, lambda exc: f"refused: {type(exc).__name__}"),
    (errors.StorageError, ErrorCode.INTERNAL, lambda exc: f"store failed: {type(exc).__name__}"),
    (
        OSError,
        ErrorCode.INTERNAL,
        lambda exc: f"disk error: {getattr(exc, 'strerror', None) or type(exc).__name__}",
    ),
)

# A code -> the exception a client raises for it; any other code means the holder refused.
EXCEPTION_OF: Final[dict[ErrorCode, type[errors.P2PMegaError]]] = {
    ErrorCode.NOT_FOUND: errors.ChunkNotStored,
    ErrorCode.QUOTA_FULL: errors.QuotaExceeded,
    ErrorCode.BAD_HASH: errors.ChunkHashMismatch,
    ErrorCode.BAD_CHUNK: errors.BadChunk,
    ErrorCode.SOURCE_LIMIT: errors.SourceLimitExceeded,
    ErrorCode.BAD_RENEWAL: errors.BadSignature,
    ErrorCode.NOT_EXPECTED: errors.ForwardNotExpected,
}


def error_reply(request: Request, exc: Exception) -> Error | None:
    """The Error reply for ``request`` whose store call raised ``exc``; None if unexpected (a bug)."""
    rid = request.request_id
    if isinstance(exc, errors.ChunkHashMismatch):
        if isinstance(request, StoreRequest):
            return Error(rid, ErrorCode.BAD_HASH, "data does not hash to the chunk id")
        # ChunkStore.get found the file rotten and dropped it: we no longer hold the chunk.
        return Error(rid, ErrorCode.NOT_FOUND, "chunk was corrupt on disk and dropped")
    for kind, code, message in _REPLIES:
        if isinstance(exc, kind):
            return Error(rid, code, message(exc))
    return None


def raise_for(reply: Error, addr: Address, chunk_id: bytes = b"") -> NoReturn:
    """Raise the exception a client's caller expects for ``reply`` from ``addr``.

    Raises:
        errors.ChunkNotStored: NOT_FOUND.
        errors.QuotaExceeded: QUOTA_FULL.
        errors.ChunkHashMismatch: BAD_HASH.
        errors.BadChunk: BAD_CHUNK.
        errors.SourceLimitExceeded: SOURCE_LIMIT (a QuotaExceeded: store elsewhere).
        errors.BadSignature: BAD_RENEWAL.
        errors.ForwardNotExpected: NOT_EXPECTED.
        errors.RequestUnknown: BAD_REQUEST (a message type newer than the holder, say).
        errors.PeerUnreachable: any other code (the holder refused the request).
    """
    what = f"chunk {short_id(chunk_id)}" if chunk_id else "request"
    where = f"{addr[0]}:{addr[1]}"
    kind = EXCEPTION_OF.get(reply.code)
    if kind is errors.ChunkNotStored:
        raise kind(f"peer {where} does not hold {what}; try another holder")
    if kind is errors.QuotaExceeded:
        raise kind(f"peer {where} refused {what}: its quota is full; pick another holder")
    if kind is errors.ChunkHashMismatch:
        raise kind(f"peer {where} says the bytes of {what} do not match its id")
    if kind is errors.BadChunk:
        raise kind(f"peer {where} refused {what}: not shaped like a stored chunk")
    if kind is errors.SourceLimitExceeded:
        raise kind(
            f"peer {where} refused {what}: this network's share of its quota or store rate is used "
            "up; pick another holder"
        )
    if kind is errors.BadSignature:
        raise kind(f"peer {where} refused the renewal of {what}: its signature does not verify")
    if reply.code is ErrorCode.BAD_REQUEST:
        # A request the holder does not understand: most often a message type newer than it.
        raise errors.RequestUnknown(f"peer {where} refused {what}: BAD_REQUEST {reply.message}")
    if kind is errors.ForwardNotExpected:
        raise kind(f"peer {where} refused the forward of {what}: its sharer did not ask it to")
    raise errors.PeerUnreachable(f"peer {where} refused {what}: {reply.code.name} {reply.message}")
