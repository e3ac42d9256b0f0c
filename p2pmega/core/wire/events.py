"""The chunk-transfer protocol's vocabulary: message types, error codes, limits and event dataclasses.

Values only, no encoding (codec.py) and no state (connection.py); the layout is in docs/PROTOCOL.md.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from p2pmega.core.chunking import MAX_SEALED_CHUNK_BYTES, ChunkId
from p2pmega.errors import RemoteProtocolError

PROTOCOL_VERSION: Final = 2  # 2: every connection opens with the channel handshake (handshake.py)

# Frame prefix: u32 length of everything after it. The header it starts is in codec.py.
PREFIX_BYTES: Final = 4
HEADER_BYTES: Final = 10  # prefix, u8 version, u8 type, u32 request id
CHUNK_ID_BYTES: Final = 32

# 4096 ids are 128 KiB of request and 4 KiB of reply: large enough that a holder with 100 GiB of
# 1 MiB chunks renews everything in 25 round trips, small enough to stay far below one chunk frame.
MAX_BATCH_IDS: Final = 4096
# Leases travel as whole seconds in a u32 (136 years), so the largest lease is 2**32 - 1 seconds.
MAX_LEASE_S: Final = 2**32 - 1
# Error text is for logs only; 256 bytes fit one line and keep a hostile peer from sending novels.
MAX_ERROR_MESSAGE_BYTES: Final = 256
# The biggest frame is a StoreRequest with a maximum chunk: header (10) + chunk id (32) + lease (4).
# 4 KiB of slack covers that and leaves room for a future field without a version bump of the limit.
FRAME_SLACK_BYTES: Final = 4096
MAX_FRAME_BYTES: Final = MAX_SEALED_CHUNK_BYTES + FRAME_SLACK_BYTES
# What precedes the data in a ChunkData frame: header and chunk id (see send_chunk_data_in_place).
CHUNK_DATA_HEAD_BYTES: Final = HEADER_BYTES + CHUNK_ID_BYTES
# Request id 0 is reserved for errors about the whole connection (BUSY, TOO_LARGE before a header).
CONNECTION_REQUEST_ID: Final = 0
MAX_REQUEST_ID: Final = 2**32 - 1


class Role(enum.Enum):
    """Which side of a connection this state machine plays."""

    CLIENT = "client"
    SERVER = "server"


class MessageType(enum.IntEnum):
    """The type byte of a frame. Requests have the top bit clear, replies have it set."""

    STORE = 0x01
    FETCH = 0x02
    HAS = 0x03
    RENEW = 0x04
    LEASES = 0x05  # new in version 1 (docs/PROTOCOL.md, "Versioning")
    STORE_KEYED = 0x06  # a STORE carrying the file's renewal key; answered by STORE_OK
    RENEW_SIGNED = 0x07  # a renewal signed with that key; answered by RENEW_REPLY
    SPACE = (
        0x08  # how many bytes may the requester still store here (issue 18, placement by capacity)
    )
    # Pipelined replication (issue 20, docs/PROTOCOL.md "Forwarding"): a sharer uploads a chunk once.
    STORE_FORWARD = (
        0x09  # a STORE_KEYED whose holder then forwards the chunk, once, to a named holder
    )
    EXPECT = (
        0x0A  # to that second holder: accept these ids from a forwarder; answered by RENEW_REPLY
    )
    FORWARDED_STORE = 0x0B  # the forwarder's store, accepted only where an EXPECT asked for it
    STORE_OK = 0x81
    CHUNK_DATA = 0x82
    HAS_REPLY = 0x83
    RENEW_REPLY = 0x84
    LEASES_REPLY = 0x85
    SPACE_REPLY = 0x88
    FORWARD_OK = 0x89
    ERROR = 0xFF


class ErrorCode(enum.IntEnum):
    """The code of an Error reply. Unknown codes received from a peer decode as INTERNAL."""

    NOT_FOUND = 1
    QUOTA_FULL = 2
    BAD_HASH = 3
    TOO_LARGE = 4
    UNSUPPORTED_VERSION = 5
    BAD_REQUEST = 6
    BUSY = 7
    INTERNAL = 8
    BAD_CHUNK = 9  # the data is not shaped like a stored chunk (header, size)
    SOURCE_LIMIT = 10  # the sender's /24 (/48) used its share of the quota, or its store rate
    BAD_RENEWAL = 11  # a signed renewal whose signature does not verify at this holder
    NOT_EXPECTED = 12  # a FORWARDED_STORE that no live EXPECT of the chunk's sharer asked for


class Sentinel(enum.Enum):
    """Singleton values returned by next_event()."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = Sentinel.NEED_DATA


@dataclass(frozen=True)
class StoreRequest:
    """Store ``data`` under ``chunk_id`` and keep it for at least ``lease_s`` seconds.

    A server receives a large chunk as a view of the buffer it was received into (no copy); the
    connection lets go of that buffer, so the view stays valid until the receiver lets go of it
    (the transfer server recycles it once the store call is done).
    """

    request_id: int
    chunk_id: ChunkId
    lease_s: int
    data: bytes | memoryview = field(repr=False)


@dataclass(frozen=True)
class KeyedStoreRequest(StoreRequest):
    """A StoreRequest that also hands the holder the file's renewal key (core.renewal).

    Only a RenewSignedRequest signed by that key extends the chunk's lease afterwards.
    """

    renew_key: bytes = field(default=b"", kw_only=True)


@dataclass(frozen=True)
class ForwardStoreRequest(KeyedStoreRequest):
    """A KeyedStoreRequest after which the holder forwards the chunk to the holder named here.

    The holder forwards only a chunk this request newly stored, once, with the same lease
    (FORWARDED_STORE); the second holder keeps it only if its sharer told it to (EXPECT).
    ``target_host`` is an IPv4 or IPv6 address, ``target_id`` the node id the forwarder must find
    proven there (core.node_id).
    """

    target_id: bytes = field(default=b"", kw_only=True)
    target_host: str = field(default="", kw_only=True)
    target_port: int = field(default=0, kw_only=True)


@dataclass(frozen=True)
class ForwardedStoreRequest(StoreRequest):
    """A forwarder's store of a chunk a sharer asked it to forward here.

    Kept only against a live ExpectRequest for ``chunk_id`` with the same ``lease_s``; the copy is
    then stored with the expectation's renewal key and counted against the sharer's network.
    """


@dataclass(frozen=True)
class ExpectRequest:
    """Accept FORWARDED_STORE of ``ids`` for a while, kept ``lease_s`` with ``renew_key``.

    Sent by a sharer to the second holder of each chunk: the copies count against the sharer's
    network, as if it had stored them itself. At most MAX_BATCH_IDS ids.
    """

    request_id: int
    ids: tuple[ChunkId, ...]
    lease_s: int
    renew_key: bytes


@dataclass(frozen=True)
class FetchRequest:
    """Send the bytes stored under ``chunk_id``."""

    request_id: int
    chunk_id: ChunkId


@dataclass(frozen=True)
class HasRequest:
    """Which of ``ids`` are held? At most MAX_BATCH_IDS ids."""

    request_id: int
    ids: tuple[ChunkId, ...]


@dataclass(frozen=True)
class RenewRequest:
    """Extend the lease of each held id in ``ids`` to at least ``lease_s`` seconds from now."""

    request_id: int
    ids: tuple[ChunkId, ...]
    lease_s: int


@dataclass(frozen=True)
class RenewSignedRequest:
    """Extend each held id whose renewal key is ``renew_key`` to at least ``expiry_s`` (Unix seconds).

    ``signature`` is ``renew_key``'s signature over the holder's node id, ``expiry_s`` and ``ids``
    (core.renewal.renewal_message); a holder grants at most its longest lease from now.
    """

    request_id: int
    ids: tuple[ChunkId, ...]
    expiry_s: int
    renew_key: bytes
    signature: bytes = field(repr=False)


@dataclass(frozen=True)
class LeasesRequest:
    """How long is each of ``ids`` still held? At most MAX_BATCH_IDS ids."""

    request_id: int
    ids: tuple[ChunkId, ...]


@dataclass(frozen=True)
class SpaceRequest:
    """How many bytes may the requester's network still store here? An empty body."""

    request_id: int


@dataclass(frozen=True)
class StoreOK:
    """The chunk is durably stored; ``newly_stored`` is False if it was already held."""

    request_id: int
    newly_stored: bool


@dataclass(frozen=True)
class ForwardOK:
    """A StoreOK for a ForwardStoreRequest, and whether the holder will forward the chunk.

    ``forwarding`` is False when the holder will not (the chunk was held already, so this request is
    not its sharer's first store; or its forward queue is full; or the target is refused): the
    sharer then stores the second copy itself.
    """

    request_id: int
    newly_stored: bool
    forwarding: bool


@dataclass(frozen=True)
class ChunkData:
    """The bytes of a chunk, unverified: the receiver must hash-check them before use.

    A client receives a large chunk as a view of the buffer it was received into (no copy), as a
    server receives a large StoreRequest.
    """

    request_id: int
    chunk_id: ChunkId
    data: bytes | memoryview = field(repr=False)


@dataclass(frozen=True)
class HasReply:
    """One flag per id of the HasRequest, in order."""

    request_id: int
    flags: tuple[bool, ...]


@dataclass(frozen=True)
class RenewReply:
    """One flag per id of the RenewRequest, in order: True if the lease was renewed."""

    request_id: int
    flags: tuple[bool, ...]


@dataclass(frozen=True)
class LeasesReply:
    """Per id of the LeasesRequest, in order: whole seconds left on its lease, 0 if not held."""

    request_id: int
    remaining_s: tuple[int, ...]


@dataclass(frozen=True)
class SpaceReply:
    """The holder's answer to a SpaceRequest, as it claims it (untrusted: core.capacity bounds its use).

    ``free_bytes``: what the requester's network may still store here now, within the quota and its
    share of it (expired chunks count as free: a store collects them); at most ``quota_bytes``.
    """

    request_id: int
    free_bytes: int
    quota_bytes: int


@dataclass(frozen=True)
class Error:
    """A typed refusal of one request (or of the connection when request_id is 0)."""

    request_id: int
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed its sending side at a frame boundary."""


Request = (
    StoreRequest
    | FetchRequest
    | HasRequest
    | RenewRequest
    | LeasesRequest
    | RenewSignedRequest
    | SpaceRequest
    | ExpectRequest
)
Reply = StoreOK | ForwardOK | ChunkData | HasReply | RenewReply | LeasesReply | SpaceReply | Error
Event = Request | Reply | ConnectionClosed

# The reply type that answers each request type (besides ERROR, which answers any).
REPLY_FOR: Final[dict[MessageType, MessageType]] = {
    MessageType.STORE: MessageType.STORE_OK,
    MessageType.FETCH: MessageType.CHUNK_DATA,
    MessageType.HAS: MessageType.HAS_REPLY,
    MessageType.RENEW: MessageType.RENEW_REPLY,
    MessageType.LEASES: MessageType.LEASES_REPLY,
    MessageType.STORE_KEYED: MessageType.STORE_OK,
    MessageType.RENEW_SIGNED: MessageType.RENEW_REPLY,
    MessageType.SPACE: MessageType.SPACE_REPLY,
    MessageType.STORE_FORWARD: MessageType.FORWARD_OK,
    MessageType.EXPECT: MessageType.RENEW_REPLY,
    MessageType.FORWARDED_STORE: MessageType.STORE_OK,
}
# The request types, for isinstance checks.
REQUEST_TYPES: Final = (
    StoreRequest,
    FetchRequest,
    HasRequest,
    RenewRequest,
    LeasesRequest,
    RenewSignedRequest,
    SpaceRequest,
    ExpectRequest,
)


class ProtocolViolation(RemoteProtocolError):
    """The peer broke the protocol; the connection is dead.

    ``code`` and ``request_id`` say what a server should answer (one Error frame) before closing.
    """

    def __init__(self, message: str, *, code: ErrorCode, request_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id
