"""The chunk-transfer protocol as a sans-I/O state machine: bytes in, events out.

It contains no networking code at all: no socket, clock or task (h11 style). Split as h11 splits
itself: events.py (the vocabulary), codec.py (paired encode/decode of each frame body), buffer.py
(the receive buffer), connection.py (TransferConnection), deadline.py (its timeouts, with `now` a
parameter). Import everything from here. The asyncio pump around it lives in p2pmega.net; the byte
layout is documented in docs/PROTOCOL.md.
"""

from p2pmega.core.wire.connection import TransferConnection
from p2pmega.core.wire.deadline import (
    ClientDeadlines,
    Expiry,
    ServerDeadlines,
    TimedOut,
    Timeouts,
)
from p2pmega.core.wire.events import (
    CHUNK_DATA_HEAD_BYTES,
    CHUNK_ID_BYTES,
    CONNECTION_REQUEST_ID,
    FRAME_SLACK_BYTES,
    HEADER_BYTES,
    MAX_BATCH_IDS,
    MAX_ERROR_MESSAGE_BYTES,
    MAX_FRAME_BYTES,
    MAX_LEASE_S,
    NEED_DATA,
    PREFIX_BYTES,
    PROTOCOL_VERSION,
    ChunkData,
    ConnectionClosed,
    Error,
    ErrorCode,
    Event,
    FetchRequest,
    HasReply,
    HasRequest,
    MessageType,
    ProtocolViolation,
    RenewReply,
    RenewRequest,
    Reply,
    Request,
    Role,
    Sentinel,
    StoreOK,
    StoreRequest,
)

__all__ = [
    "CHUNK_DATA_HEAD_BYTES",
    "CHUNK_ID_BYTES",
    "CONNECTION_REQUEST_ID",
    "FRAME_SLACK_BYTES",
    "HEADER_BYTES",
    "MAX_BATCH_IDS",
    "MAX_ERROR_MESSAGE_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_LEASE_S",
    "NEED_DATA",
    "PREFIX_BYTES",
    "PROTOCOL_VERSION",
    "ChunkData",
    "ClientDeadlines",
    "ConnectionClosed",
    "Error",
    "ErrorCode",
    "Event",
    "Expiry",
    "FetchRequest",
    "HasReply",
    "HasRequest",
    "MessageType",
    "ProtocolViolation",
    "RenewReply",
    "RenewRequest",
    "Reply",
    "Request",
    "Role",
    "Sentinel",
    "ServerDeadlines",
    "StoreOK",
    "StoreRequest",
    "TimedOut",
    "Timeouts",
    "TransferConnection",
]
