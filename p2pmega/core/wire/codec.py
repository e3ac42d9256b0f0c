"""Paired encode/decode of every frame body of the chunk-transfer protocol, with no state.

A decoder checks what one frame says on its own (lengths, counts, flag bytes); whether a reply fits
its request is the connection's business (connection.py). The layout is in docs/PROTOCOL.md.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from typing import Any, Final

from p2pmega.core.chunking import MAX_SEALED_CHUNK_BYTES, ChunkId
from p2pmega.core.wire.events import (
    CHUNK_ID_BYTES,
    HEADER_BYTES,
    MAX_BATCH_IDS,
    MAX_ERROR_MESSAGE_BYTES,
    MAX_LEASE_S,
    PREFIX_BYTES,
    ChunkData,
    Error,
    ErrorCode,
    Event,
    ExpectRequest,
    FetchRequest,
    ForwardedStoreRequest,
    ForwardOK,
    ForwardStoreRequest,
    HasReply,
    HasRequest,
    KeyedStoreRequest,
    LeasesReply,
    LeasesRequest,
    MessageType,
    ProtocolViolation,
    RenewReply,
    RenewRequest,
    RenewSignedRequest,
    Reply,
    Request,
    SpaceReply,
    SpaceRequest,
    StoreOK,
    StoreRequest,
)

# Frame header: u32 length of everything after the prefix, u8 version, u8 type, u32 request id.
HEADER: Final = struct.Struct(">IBBI")
STORE_FIXED: Final = struct.Struct(">32sI")  # chunk id, lease seconds
STORE_KEYED_FIXED: Final = struct.Struct(">32sI32s")  # chunk id, lease seconds, renewal key
_RENEW_SIGNED_FIXED: Final = struct.Struct(">Q32s64sH")  # expiry, renewal key, signature, count
_RENEW_FIXED: Final = struct.Struct(">IH")  # lease seconds, id count
_COUNT: Final = struct.Struct(">H")
_SECONDS: Final = struct.Struct(">I")
_ERROR_FIXED: Final = struct.Struct(">B")
_SPACE: Final = struct.Struct(">QQ")  # free bytes, quota bytes
# STORE_KEYED's fields, then the target: node id, IPv6 address (IPv4 mapped), port.
STORE_FORWARD_FIXED: Final = struct.Struct(">32sI32s20s16sH")
_EXPECT_FIXED: Final = struct.Struct(">I32s")  # lease seconds, renewal key; then the ids
_FORWARD_OK: Final = struct.Struct(">BB")  # newly stored, forwarding
TARGET_ID_BYTES: Final = 20
assert HEADER.size == HEADER_BYTES  # noqa: S101 - events.py states the size without struct
assert PREFIX_BYTES == 4  # noqa: S101 - the u32 that opens HEADER

Body = tuple[bytes, bytes | memoryview]  # the fixed part, then any chunk data written apart


def bad(
    message: str, request_id: int, code: ErrorCode = ErrorCode.BAD_REQUEST
) -> ProtocolViolation:
    """The violation a malformed frame of ``request_id`` earns (raise it)."""
    return ProtocolViolation(message, code=code, request_id=request_id)


def check_chunk_id(chunk_id: bytes) -> None:
    """Refuse to send a chunk id of the wrong size.

    Raises:
        ValueError: ``chunk_id`` is not CHUNK_ID_BYTES long.
    """
    if len(chunk_id) != CHUNK_ID_BYTES:
        raise ValueError(f"chunk ids are {CHUNK_ID_BYTES} bytes, got {len(chunk_id)}")


def check_ids(ids: tuple[ChunkId, ...]) -> None:
    """Refuse to send a batch that is empty, too large or holds a malformed id.

    Raises:
        ValueError: the batch breaks one of these rules.
    """
    if not 1 <= len(ids) <= MAX_BATCH_IDS:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH_IDS} ids, got {len(ids)}")
    for chunk_id in ids:
        check_chunk_id(chunk_id)


def check_lease(lease_s: int) -> None:
    """Refuse to send a lease a u32 of whole seconds cannot carry.

    Raises:
        ValueError: ``lease_s`` is not 1..MAX_LEASE_S.
    """
    if not 0 < lease_s <= MAX_LEASE_S:
        raise ValueError(f"lease_s must be 1..{MAX_LEASE_S} whole seconds, got {lease_s}")


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _encode_ids(ids: tuple[ChunkId, ...]) -> bytes:
    return _COUNT.pack(len(ids)) + b"".join(ids)


def _decode_ids(
    kind: MessageType, request_id: int, body: memoryview, offset: int
) -> tuple[ChunkId, ...]:
    (count,) = _COUNT.unpack_from(body, offset)
    offset += _COUNT.size
    if not 1 <= count <= MAX_BATCH_IDS or len(body) != offset + count * CHUNK_ID_BYTES:
        raise bad(
            f"{kind.name} batch of {count} ids mismatches its frame or exceeds {MAX_BATCH_IDS}",
            request_id,
        )
    return tuple(
        ChunkId(bytes(body[i : i + CHUNK_ID_BYTES]))
        for i in range(offset, offset + count * CHUNK_ID_BYTES, CHUNK_ID_BYTES)
    )


def _encode_flags(flags: tuple[bool, ...]) -> bytes:
    return _COUNT.pack(len(flags)) + bytes(flags)


def _decode_flags(kind: MessageType, request_id: int, body: memoryview) -> tuple[bool, ...]:
    if len(body) < _COUNT.size:
        raise bad(f"{kind.name} frame is too short", request_id)
    (count,) = _COUNT.unpack_from(body)
    flags = body[_COUNT.size :]
    if len(flags) != count or any(b > 1 for b in flags):
        raise bad(f"{kind.name} must hold {count} 0/1 flags", request_id)
    return tuple(b == 1 for b in flags)


# Requests. A decoder with ``data=False`` leaves a chunk's data out (the caller hands it over).


def encode_store_request(event: StoreRequest) -> Body:
    check_chunk_id(event.chunk_id)
    check_lease(event.lease_s)
    if len(event.data) > MAX_SEALED_CHUNK_BYTES:
        raise ValueError(f"chunk of {len(event.data)} bytes exceeds {MAX_SEALED_CHUNK_BYTES} bytes")
    return STORE_FIXED.pack(event.chunk_id, event.lease_s), event.data


def _store_fields(
    name: str, fixed: struct.Struct, request_id: int, body: memoryview, data: bool
) -> tuple[tuple[Any, ...], bytes]:
    """The fixed fields (chunk id and lease first) and the chunk of a store-shaped frame, checked."""
    if len(body) < fixed.size:
        raise bad(f"{name} frame is too short", request_id)
    fields = fixed.unpack_from(body)
    if fields[1] == 0:
        raise bad(f"{name} lease must be at least 1 second", request_id)
    if len(body) - fixed.size > MAX_SEALED_CHUNK_BYTES:
        raise bad(
            f"chunk of {len(body) - fixed.size} bytes exceeds the maximum",
            request_id,
            ErrorCode.TOO_LARGE,
        )
    return fields, bytes(body[fixed.size :]) if data else b""


def decode_store_request(request_id: int, body: memoryview, data: bool = True) -> StoreRequest:
    (chunk_id, lease_s), chunk = _store_fields("STORE", STORE_FIXED, request_id, body, data)
    return StoreRequest(request_id, ChunkId(chunk_id), lease_s, chunk)


def encode_keyed_store_request(event: KeyedStoreRequest) -> Body:
    fixed, data = encode_store_request(event)
    if len(event.renew_key) != 32:
        raise ValueError(f"a renewal key is 32 bytes, got {len(event.renew_key)}")
    return fixed + event.renew_key, data


def decode_keyed_store_request(
    request_id: int, body: memoryview, data: bool = True
) -> KeyedStoreRequest:
    fields, chunk = _store_fields("STORE_KEYED", STORE_KEYED_FIXED, request_id, body, data)
    chunk_id, lease_s, renew_key = fields
    return KeyedStoreRequest(request_id, ChunkId(chunk_id), lease_s, chunk, renew_key=renew_key)


def _pack_host(host: str) -> bytes:
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed).packed
    return address.packed


def _unpack_host(packed: bytes) -> str:
    address = ipaddress.IPv6Address(packed)
    return str(address.ipv4_mapped or address)


def encode_store_forward_request(event: ForwardStoreRequest) -> Body:
    fixed, data = encode_keyed_store_request(event)
    if len(event.target_id) != TARGET_ID_BYTES:
        raise ValueError(f"a target node id is {TARGET_ID_BYTES} bytes, got {len(event.target_id)}")
    if not 0 < event.target_port < 2**16:
        raise ValueError(f"target port {event.target_port} is not 1..65535")
    target = event.target_id + _pack_host(event.target_host)
    return fixed + target + event.target_port.to_bytes(2, "big"), data


def decode_store_forward_request(
    request_id: int, body: memoryview, data: bool = True
) -> ForwardStoreRequest:
    fields, chunk = _store_fields("STORE_FORWARD", STORE_FORWARD_FIXED, request_id, body, data)
    chunk_id, lease_s, renew_key, target_id, host, port = fields
    if port == 0:
        raise bad("STORE_FORWARD target port must not be 0", request_id)
    return ForwardStoreRequest(
        request_id,
        ChunkId(chunk_id),
        lease_s,
        chunk,
        renew_key=renew_key,
        target_id=target_id,
        target_host=_unpack_host(host),
        target_port=port,
    )


def encode_forwarded_store_request(event: ForwardedStoreRequest) -> Body:
    return encode_store_request(event)


def decode_forwarded_store_request(
    request_id: int, body: memoryview, data: bool = True
) -> ForwardedStoreRequest:
    (chunk_id, lease_s), chunk = _store_fields(
        "FORWARDED_STORE", STORE_FIXED, request_id, body, data
    )
    return ForwardedStoreRequest(request_id, ChunkId(chunk_id), lease_s, chunk)


def encode_expect_request(event: ExpectRequest) -> Body:
    check_ids(event.ids)
    check_lease(event.lease_s)
    if len(event.renew_key) != 32:
        raise ValueError(f"a renewal key is 32 bytes, got {len(event.renew_key)}")
    return _EXPECT_FIXED.pack(event.lease_s, event.renew_key) + _encode_ids(event.ids), b""


def decode_expect_request(request_id: int, body: memoryview, data: bool = True) -> ExpectRequest:
    if len(body) < _EXPECT_FIXED.size + _COUNT.size:
        raise bad("EXPECT frame is too short", request_id)
    lease_s, renew_key = _EXPECT_FIXED.unpack_from(body)
    if lease_s == 0:
        raise bad("EXPECT lease must be at least 1 second", request_id)
    ids = _decode_ids(MessageType.EXPECT, request_id, body, _EXPECT_FIXED.size)
    return ExpectRequest(request_id, ids, lease_s, renew_key)


def encode_fetch_request(event: FetchRequest) -> Body:
    check_chunk_id(event.chunk_id)
    return bytes(event.chunk_id), b""


def decode_fetch_request(request_id: int, body: memoryview, data: bool = True) -> FetchRequest:
    if len(body) != CHUNK_ID_BYTES:
        raise bad("FETCH frame must hold exactly one chunk id", request_id)
    return FetchRequest(request_id, ChunkId(bytes(body)))


def encode_has_request(event: HasRequest) -> Body:
    check_ids(event.ids)
    return _encode_ids(event.ids), b""


def decode_has_request(request_id: int, body: memoryview, data: bool = True) -> HasRequest:
    if len(body) < _COUNT.size:
        raise bad("HAS frame is too short", request_id)
    return HasRequest(request_id, _decode_ids(MessageType.HAS, request_id, body, 0))


def encode_renew_request(event: RenewRequest) -> Body:
    check_ids(event.ids)
    check_lease(event.lease_s)
    return _RENEW_FIXED.pack(event.lease_s, len(event.ids)) + b"".join(event.ids), b""


def decode_renew_request(request_id: int, body: memoryview, data: bool = True) -> RenewRequest:
    if len(body) < _RENEW_FIXED.size:
        raise bad("RENEW frame is too short", request_id)
    lease_s, _ = _RENEW_FIXED.unpack_from(body)
    if lease_s == 0:
        raise bad("RENEW lease must be at least 1 second", request_id)
    ids = _decode_ids(MessageType.RENEW, request_id, body, _RENEW_FIXED.size - _COUNT.size)
    return RenewRequest(request_id, ids, lease_s)


def encode_renew_signed_request(event: RenewSignedRequest) -> Body:
    check_ids(event.ids)
    if not 0 <= event.expiry_s < 2**64:
        raise ValueError(f"expiry_s must be a u64, got {event.expiry_s}")
    if len(event.renew_key) != 32 or len(event.signature) != 64:
        raise ValueError("a renewal key is 32 bytes and its signature 64")
    fixed = _RENEW_SIGNED_FIXED.pack(
        event.expiry_s, event.renew_key, event.signature, len(event.ids)
    )
    return fixed + b"".join(event.ids), b""


def decode_renew_signed_request(
    request_id: int, body: memoryview, data: bool = True
) -> RenewSignedRequest:
    if len(body) < _RENEW_SIGNED_FIXED.size:
        raise bad("RENEW_SIGNED frame is too short", request_id)
    expiry_s, renew_key, signature, _ = _RENEW_SIGNED_FIXED.unpack_from(body)
    offset = _RENEW_SIGNED_FIXED.size - _COUNT.size
    ids = _decode_ids(MessageType.RENEW_SIGNED, request_id, body, offset)
    return RenewSignedRequest(request_id, ids, expiry_s, renew_key, signature)


def encode_leases_request(event: LeasesRequest) -> Body:
    check_ids(event.ids)
    return _encode_ids(event.ids), b""


def decode_leases_request(request_id: int, body: memoryview, data: bool = True) -> LeasesRequest:
    if len(body) < _COUNT.size:
        raise bad("LEASES frame is too short", request_id)
    return LeasesRequest(request_id, _decode_ids(MessageType.LEASES, request_id, body, 0))


def encode_space_request(event: SpaceRequest) -> Body:
    return b"", b""


def decode_space_request(request_id: int, body: memoryview, data: bool = True) -> SpaceRequest:
    if len(body):
        raise bad("SPACE frame must be empty", request_id)
    return SpaceRequest(request_id)


# Replies.


def encode_store_ok(event: StoreOK) -> Body:
    return (b"\x01" if event.newly_stored else b"\x00"), b""


def decode_store_ok(request_id: int, body: memoryview, data: bool = True) -> StoreOK:
    if len(body) != 1 or body[0] > 1:
        raise bad("STORE_OK must hold one 0/1 byte", request_id)
    return StoreOK(request_id, body[0] == 1)


def encode_forward_ok(event: ForwardOK) -> Body:
    return _FORWARD_OK.pack(event.newly_stored, event.forwarding), b""


def decode_forward_ok(request_id: int, body: memoryview, data: bool = True) -> ForwardOK:
    if len(body) != _FORWARD_OK.size or body[0] > 1 or body[1] > 1:
        raise bad("FORWARD_OK must hold two 0/1 bytes", request_id)
    return ForwardOK(request_id, body[0] == 1, body[1] == 1)


def encode_chunk_data(event: ChunkData) -> Body:
    check_chunk_id(event.chunk_id)
    return bytes(event.chunk_id), event.data


def decode_chunk_data(request_id: int, body: memoryview, data: bool = True) -> ChunkData:
    if len(body) < CHUNK_ID_BYTES:
        raise bad("CHUNK_DATA carries a chunk id that was not asked for", request_id)
    chunk = bytes(body[CHUNK_ID_BYTES:]) if data else b""
    return ChunkData(request_id, ChunkId(bytes(body[:CHUNK_ID_BYTES])), chunk)


def encode_has_reply(event: HasReply) -> Body:
    return _encode_flags(event.flags), b""


def decode_has_reply(request_id: int, body: memoryview, data: bool = True) -> HasReply:
    return HasReply(request_id, _decode_flags(MessageType.HAS_REPLY, request_id, body))


def encode_renew_reply(event: RenewReply) -> Body:
    return _encode_flags(event.flags), b""


def decode_renew_reply(request_id: int, body: memoryview, data: bool = True) -> RenewReply:
    return RenewReply(request_id, _decode_flags(MessageType.RENEW_REPLY, request_id, body))


def encode_leases_reply(event: LeasesReply) -> Body:
    if not all(0 <= s <= MAX_LEASE_S for s in event.remaining_s):
        raise ValueError(f"remaining seconds must be 0..{MAX_LEASE_S}")
    count = len(event.remaining_s)
    return _COUNT.pack(count) + struct.pack(f">{count}I", *event.remaining_s), b""


def decode_leases_reply(request_id: int, body: memoryview, data: bool = True) -> LeasesReply:
    if len(body) < _COUNT.size:
        raise bad("LEASES_REPLY frame is too short", request_id)
    (count,) = _COUNT.unpack_from(body)
    if len(body) != _COUNT.size + count * _SECONDS.size:
        raise bad(f"LEASES_REPLY must hold {count} u32 seconds", request_id)
    return LeasesReply(request_id, struct.unpack_from(f">{count}I", body, _COUNT.size))


def encode_space_reply(event: SpaceReply) -> Body:
    if not 0 <= event.free_bytes <= event.quota_bytes < 2**64:
        raise ValueError(
            f"free bytes {event.free_bytes} must be 0..quota bytes {event.quota_bytes} < 2**64"
        )
    return _SPACE.pack(event.free_bytes, event.quota_bytes), b""


def decode_space_reply(request_id: int, body: memoryview, data: bool = True) -> SpaceReply:
    if len(body) != _SPACE.size:
        raise bad(f"SPACE_REPLY must hold two u64, got {len(body)} bytes", request_id)
    free_bytes, quota_bytes = _SPACE.unpack_from(body)
    if free_bytes > quota_bytes:
        raise bad(
            f"SPACE_REPLY claims {free_bytes} bytes free of a {quota_bytes}-byte quota", request_id
        )
    return SpaceReply(request_id, free_bytes, quota_bytes)


def encode_error(event: Error) -> Body:
    message = event.message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE_BYTES]
    return _ERROR_FIXED.pack(event.code) + message, b""


def decode_error(request_id: int, body: memoryview, data: bool = True) -> Error:
    if not _ERROR_FIXED.size <= len(body) <= _ERROR_FIXED.size + MAX_ERROR_MESSAGE_BYTES:
        raise bad("ERROR frame has a bad length", request_id)
    try:
        code = ErrorCode(body[0])
    except ValueError:
        code = ErrorCode.INTERNAL
    return Error(request_id, code, _printable(bytes(body[1:]).decode("utf-8", "replace")))


Decoder = Callable[[int, memoryview, bool], Event]

# Each event type, its message type and its encoder; each message type, its decoder.
ENCODERS: Final[dict[type[Request | Reply], tuple[MessageType, Callable[[Any], Body]]]] = {
    StoreRequest: (MessageType.STORE, encode_store_request),
    FetchRequest: (MessageType.FETCH, encode_fetch_request),
    HasRequest: (MessageType.HAS, encode_has_request),
    RenewRequest: (MessageType.RENEW, encode_renew_request),
    LeasesRequest: (MessageType.LEASES, encode_leases_request),
    KeyedStoreRequest: (MessageType.STORE_KEYED, encode_keyed_store_request),
    RenewSignedRequest: (MessageType.RENEW_SIGNED, encode_renew_signed_request),
    SpaceRequest: (MessageType.SPACE, encode_space_request),
    ForwardStoreRequest: (MessageType.STORE_FORWARD, encode_store_forward_request),
    ExpectRequest: (MessageType.EXPECT, encode_expect_request),
    ForwardedStoreRequest: (MessageType.FORWARDED_STORE, encode_forwarded_store_request),
    ForwardOK: (MessageType.FORWARD_OK, encode_forward_ok),
    StoreOK: (MessageType.STORE_OK, encode_store_ok),
    ChunkData: (MessageType.CHUNK_DATA, encode_chunk_data),
    HasReply: (MessageType.HAS_REPLY, encode_has_reply),
    RenewReply: (MessageType.RENEW_REPLY, encode_renew_reply),
    LeasesReply: (MessageType.LEASES_REPLY, encode_leases_reply),
    SpaceReply: (MessageType.SPACE_REPLY, encode_space_reply),
    Error: (MessageType.ERROR, encode_error),
}
DECODERS: Final[dict[MessageType, Decoder]] = {
    MessageType.STORE: decode_store_request,
    MessageType.FETCH: decode_fetch_request,
    MessageType.HAS: decode_has_request,
    MessageType.RENEW: decode_renew_request,
    MessageType.LEASES: decode_leases_request,
    MessageType.STORE_KEYED: decode_keyed_store_request,
    MessageType.RENEW_SIGNED: decode_renew_signed_request,
    MessageType.SPACE: decode_space_request,
    MessageType.STORE_FORWARD: decode_store_forward_request,
    MessageType.EXPECT: decode_expect_request,
    MessageType.FORWARDED_STORE: decode_forwarded_store_request,
    MessageType.FORWARD_OK: decode_forward_ok,
    MessageType.STORE_OK: decode_store_ok,
    MessageType.CHUNK_DATA: decode_chunk_data,
    MessageType.HAS_REPLY: decode_has_reply,
    MessageType.RENEW_REPLY: decode_renew_reply,
    MessageType.LEASES_REPLY: decode_leases_reply,
    MessageType.SPACE_REPLY: decode_space_reply,
    MessageType.ERROR: decode_error,
}
# How many bytes of a hand-over frame's body precede its data (see buffer.py).
DATA_OFFSET: Final[dict[MessageType, int]] = {
    MessageType.STORE: STORE_FIXED.size,
    MessageType.STORE_KEYED: STORE_KEYED_FIXED.size,
    MessageType.STORE_FORWARD: STORE_FORWARD_FIXED.size,
    MessageType.FORWARDED_STORE: STORE_FIXED.size,
    MessageType.CHUNK_DATA: CHUNK_ID_BYTES,
}
