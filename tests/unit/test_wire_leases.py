"""core.wire LEASES: the query for the seconds left on leases, round trips, tampering, misuse."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pmega.core.chunking import ChunkId, chunk_id_of
from p2pmega.core.wire import (
    MAX_BATCH_IDS,
    MAX_LEASE_S,
    NEED_DATA,
    PROTOCOL_VERSION,
    ErrorCode,
    HasRequest,
    LeasesReply,
    LeasesRequest,
    MessageType,
    ProtocolViolation,
    Role,
    TransferConnection,
)
from tests.unit.test_wire import deliver, frame, ids_strategy, pair

CID = chunk_id_of(b"hello")


def test_message_types_follow_the_existing_ones() -> None:
    assert [int(t) for t in MessageType] == [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
        9,
        10,
        11,
        0x81,
        0x82,
        0x83,
        0x84,
        0x85,
        0x88,
        0x89,
        0xFF,
    ]
    assert (int(MessageType.LEASES), int(MessageType.LEASES_REPLY)) == (0x05, 0x85)


@given(ids=ids_strategy, seconds=st.lists(st.integers(0, MAX_LEASE_S), min_size=40, max_size=40))
def test_leases_round_trip(ids: list[ChunkId], seconds: list[int]) -> None:
    client, server = pair()
    request = LeasesRequest(client.new_request_id(), tuple(ids))
    assert deliver(client.send(request), server, step=7) == [request]
    reply = LeasesReply(request.request_id, tuple(seconds[: len(ids)]))
    assert deliver(server.send(reply), client, step=5) == [reply]
    assert client.outstanding == server.outstanding == 0


def test_largest_batch_round_trips() -> None:
    client, server = pair()
    ids = tuple(ChunkId(i.to_bytes(32, "big")) for i in range(MAX_BATCH_IDS))
    request = LeasesRequest(1, ids)
    assert deliver(client.send(request), server) == [request]
    reply = LeasesReply(1, (MAX_LEASE_S,) * MAX_BATCH_IDS)
    assert deliver(server.send(reply), client) == [reply]


def exchange() -> tuple[bytes, bytes]:
    """A LEASES request frame for two ids and its reply frame."""
    client, server = pair()
    request = b"".join(client.send(LeasesRequest(1, (CID, CID))))
    deliver([request], server)
    reply = b"".join(bytes(b) for b in server.send(LeasesReply(1, (5, 0))))
    return request, reply


def test_every_truncated_request_is_refused() -> None:
    request, _ = exchange()
    for cut in range(1, len(request)):
        server = TransferConnection(role=Role.SERVER)
        server.receive_data(request[:cut])
        assert server.next_event() is NEED_DATA
        server.receive_data(b"")
        with pytest.raises(ProtocolViolation, match="middle of a frame"):
            server.next_event()


def test_every_truncated_reply_is_refused() -> None:
    _, reply = exchange()
    for cut in range(1, len(reply)):
        client = TransferConnection(role=Role.CLIENT)
        client.send(LeasesRequest(1, (CID, CID)))
        client.receive_data(reply[:cut])
        assert client.next_event() is NEED_DATA
        client.receive_data(b"")
        with pytest.raises(ProtocolViolation):
            client.next_event()


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no count
        b"\x00",  # half a count
        struct.pack(">H", 0),  # empty batch
        struct.pack(">H", 2) + bytes(32),  # one id short
        struct.pack(">H", 1) + bytes(33),  # a byte too many
        struct.pack(">H", MAX_BATCH_IDS + 1) + bytes(32 * (MAX_BATCH_IDS + 1)),
    ],
)
def test_malformed_requests_are_violations(body: bytes) -> None:
    server = TransferConnection(role=Role.SERVER)
    server.receive_data(frame(PROTOCOL_VERSION, MessageType.LEASES, 3, body))
    with pytest.raises(ProtocolViolation) as info:
        server.next_event()
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.request_id == 3


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\x00", "too short"),
        (struct.pack(">HI", 2, 5), "must hold 2 u32 seconds"),  # count says 2, one value
        (struct.pack(">HII", 1, 5, 0), "must hold 1 u32 seconds"),  # count says 1, two values
        (struct.pack(">HI", 1, 5), "must hold 2 u32 seconds"),  # consistent, but not 2 answers
        (struct.pack(">HII", 2, 5, 0)[:-1], "must hold 2 u32 seconds"),  # a byte short
    ],
)
def test_tampered_replies_are_violations(body: bytes, match: str) -> None:
    client = TransferConnection(role=Role.CLIENT)
    client.send(LeasesRequest(1, (CID, CID)))
    client.receive_data(frame(PROTOCOL_VERSION, MessageType.LEASES_REPLY, 1, body))
    with pytest.raises(ProtocolViolation, match=match):
        client.next_event()


def test_reply_must_answer_a_leases_request() -> None:
    _, reply = exchange()
    client = TransferConnection(role=Role.CLIENT)
    client.send(HasRequest(1, (CID, CID)))
    client.receive_data(reply)
    with pytest.raises(ProtocolViolation, match="does not answer a HAS request"):
        client.next_event()
    client = TransferConnection(role=Role.CLIENT)
    client.receive_data(reply)
    with pytest.raises(ProtocolViolation, match="unknown request 1"):
        client.next_event()


def test_local_misuse_raises_value_error() -> None:
    client, server = pair()
    with pytest.raises(ValueError, match="batch"):
        client.send(LeasesRequest(1, ()))
    with pytest.raises(ValueError, match="batch"):
        client.send(LeasesRequest(1, (CID,) * (MAX_BATCH_IDS + 1)))
    with pytest.raises(ValueError, match="32 bytes"):
        client.send(LeasesRequest(1, (ChunkId(b"short"),)))
    deliver(client.send(LeasesRequest(1, (CID, CID))), server)
    with pytest.raises(ValueError, match="2 answers"):
        server.send(LeasesReply(1, (1,)))
    with pytest.raises(ValueError, match=r"0\.\."):
        server.send(LeasesReply(1, (1, MAX_LEASE_S + 1)))
    with pytest.raises(ValueError, match=r"0\.\."):
        server.send(LeasesReply(1, (-1, 0)))
    with pytest.raises(ValueError, match="cannot send"):
        client.send(LeasesReply(2, (1,)))
