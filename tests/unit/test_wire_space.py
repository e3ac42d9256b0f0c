"""core.wire SPACE: the query for a holder's free space (issue 18), round trips, tampering, misuse."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pmega.core.chunking import chunk_id_of
from p2pmega.core.wire import (
    NEED_DATA,
    PROTOCOL_VERSION,
    ErrorCode,
    HasRequest,
    MessageType,
    ProtocolViolation,
    Role,
    SpaceReply,
    SpaceRequest,
    TransferConnection,
)
from tests.unit.test_wire import deliver, frame, pair

CID = chunk_id_of(b"hello")
U64 = 2**64 - 1


def test_space_takes_the_next_free_type() -> None:
    assert (int(MessageType.SPACE), int(MessageType.SPACE_REPLY)) == (0x08, 0x88)


@given(quota=st.integers(0, U64), data=st.data())
def test_space_round_trips(quota: int, data: st.DataObject) -> None:
    free = data.draw(st.integers(0, quota))
    client, server = pair()
    request = SpaceRequest(client.new_request_id())
    assert deliver(client.send(request), server, step=3) == [request]
    reply = SpaceReply(request.request_id, free, quota)
    assert deliver(server.send(reply), client, step=5) == [reply]
    assert client.outstanding == server.outstanding == 0


def exchange() -> tuple[bytes, bytes]:
    """A SPACE request frame and its reply frame."""
    client, server = pair()
    request = b"".join(client.send(SpaceRequest(1)))
    deliver([request], server)
    reply = b"".join(bytes(b) for b in server.send(SpaceReply(1, 5, 10)))
    return request, reply


def test_every_truncated_request_and_reply_is_refused() -> None:
    request, reply = exchange()
    for cut in range(1, len(request)):
        server = TransferConnection(role=Role.SERVER)
        server.receive_data(request[:cut])
        assert server.next_event() is NEED_DATA
        server.receive_data(b"")
        with pytest.raises(ProtocolViolation, match="middle of a frame"):
            server.next_event()
    for cut in range(1, len(reply)):
        client = TransferConnection(role=Role.CLIENT)
        client.send(SpaceRequest(1))
        client.receive_data(reply[:cut])
        assert client.next_event() is NEED_DATA
        client.receive_data(b"")
        with pytest.raises(ProtocolViolation):
            client.next_event()


@pytest.mark.parametrize("body", [b"\x00", bytes(16)])
def test_a_request_with_a_body_is_a_violation(body: bytes) -> None:
    server = TransferConnection(role=Role.SERVER)
    server.receive_data(frame(PROTOCOL_VERSION, MessageType.SPACE, 3, body))
    with pytest.raises(ProtocolViolation, match="must be empty") as info:
        server.next_event()
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.request_id == 3


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "two u64"),
        (struct.pack(">Q", 5), "two u64"),  # the quota is missing
        (struct.pack(">QQ", 5, 10)[:-1], "two u64"),  # a byte short
        (struct.pack(">QQB", 5, 10, 0), "two u64"),  # a byte too many
        (struct.pack(">QQ", 11, 10), "11 bytes free of a 10-byte quota"),  # more free than quota
        (struct.pack(">QQ", U64, 0), "free of a 0-byte quota"),  # a liar's 16 EiB on no quota
    ],
)
def test_tampered_replies_are_violations(body: bytes, match: str) -> None:
    client = TransferConnection(role=Role.CLIENT)
    client.send(SpaceRequest(1))
    client.receive_data(frame(PROTOCOL_VERSION, MessageType.SPACE_REPLY, 1, body))
    with pytest.raises(ProtocolViolation, match=match):
        client.next_event()


def test_reply_must_answer_a_space_request() -> None:
    _, reply = exchange()
    client = TransferConnection(role=Role.CLIENT)
    client.send(HasRequest(1, (CID,)))
    client.receive_data(reply)
    with pytest.raises(ProtocolViolation, match="does not answer a HAS request"):
        client.next_event()
    client = TransferConnection(role=Role.CLIENT)
    client.receive_data(reply)
    with pytest.raises(ProtocolViolation, match="unknown request 1"):
        client.next_event()


def test_local_misuse_raises_value_error() -> None:
    client, server = pair()
    deliver(client.send(SpaceRequest(1)), server)
    with pytest.raises(ValueError, match="free bytes"):
        server.send(SpaceReply(1, 11, 10))
    with pytest.raises(ValueError, match="free bytes"):
        server.send(SpaceReply(1, -1, 10))
    with pytest.raises(ValueError, match="free bytes"):
        server.send(SpaceReply(1, 0, 2**64))
    with pytest.raises(ValueError, match="cannot send"):
        client.send(SpaceReply(2, 1, 1))
