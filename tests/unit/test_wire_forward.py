"""core.wire's pipelined-replication messages: round trips, addresses, and malformed frames refused."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pmega.core.chunking import ChunkId, chunk_id_of
from p2pmega.core.wire import (
    PROTOCOL_VERSION,
    ExpectRequest,
    ForwardedStoreRequest,
    ForwardOK,
    ForwardStoreRequest,
    ProtocolViolation,
    RenewReply,
    StoreOK,
)
from tests.unit.test_wire import deliver, frame, ids_strategy, pair

BODY = b"sealed chunk bytes" * 40
CID = chunk_id_of(BODY)
KEY = bytes(range(32))
TARGET_ID = bytes(range(20))


def _not_mapped(address: ipaddress.IPv6Address) -> bool:
    return (
        address.ipv4_mapped is None
    )  # the wire carries IPv4 as mapped IPv6: it reads back as IPv4


hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)).filter(_not_mapped).map(str),
)


def forward_request(rid: int, host: str = "127.3.2.1", port: int = 4242) -> ForwardStoreRequest:
    return ForwardStoreRequest(
        rid,
        CID,
        3600,
        BODY,
        renew_key=KEY,
        target_id=TARGET_ID,
        target_host=host,
        target_port=port,
    )


@given(host=hosts, port=st.integers(1, 65535), forwarding=st.booleans(), step=st.integers(1, 97))
def test_store_forward_round_trip(host: str, port: int, forwarding: bool, step: int) -> None:
    client, server = pair()
    request = forward_request(client.new_request_id(), host, port)
    [got] = deliver(client.send(request), server, step=step)
    assert isinstance(got, ForwardStoreRequest)
    assert (got.target_host, got.target_port, got.target_id) == (host, port, TARGET_ID)
    assert bytes(got.data) == BODY
    assert (got.renew_key, got.lease_s, got.chunk_id) == (KEY, 3600, CID)
    reply = ForwardOK(request.request_id, True, forwarding)
    assert deliver(server.send(reply), client) == [reply]
    assert client.outstanding == server.outstanding == 0


@given(ids=ids_strategy, flags=st.lists(st.booleans(), min_size=40, max_size=40))
def test_expect_round_trip(ids: list[ChunkId], flags: list[bool]) -> None:
    client, server = pair()
    request = ExpectRequest(client.new_request_id(), tuple(ids), 600, KEY)
    assert deliver(client.send(request), server, step=11) == [request]
    reply = RenewReply(request.request_id, tuple(flags[: len(ids)]))
    assert deliver(server.send(reply), client) == [reply]


def test_forwarded_store_round_trip_is_answered_by_store_ok() -> None:
    client, server = pair()
    request = ForwardedStoreRequest(client.new_request_id(), CID, 3600, BODY)
    [got] = deliver(client.send(request), server, step=5)
    assert isinstance(got, ForwardedStoreRequest)
    assert (got.chunk_id, got.lease_s, bytes(got.data)) == (CID, 3600, BODY)
    with pytest.raises(ValueError, match="does not answer"):
        server.send(ForwardOK(request.request_id, True, True))
    assert deliver(server.send(StoreOK(request.request_id, False)), client) == [
        StoreOK(request.request_id, False)
    ]


def test_a_forward_ok_with_a_flag_other_than_0_or_1_is_a_violation() -> None:
    client, _server = pair()
    request = forward_request(client.new_request_id())
    client.send(request)
    client.receive_data(frame(PROTOCOL_VERSION, 0x89, request.request_id, b"\x01\x02"))
    with pytest.raises(ProtocolViolation, match="two 0/1 bytes"):
        client.next_event()


def test_a_forward_ok_cannot_answer_a_plain_store() -> None:
    client, _server = pair()
    rid = client.new_request_id()
    client.send(ForwardedStoreRequest(rid, CID, 60, BODY))
    client.receive_data(frame(PROTOCOL_VERSION, 0x89, rid, b"\x01\x01"))
    with pytest.raises(ProtocolViolation, match="does not answer"):
        client.next_event()


fixed = struct.Struct(">32sI32s20s16sH")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (fixed.pack(CID, 60, KEY, TARGET_ID, bytes(16), 0) + BODY, "port must not be 0"),
        (fixed.pack(CID, 0, KEY, TARGET_ID, bytes(16), 80) + BODY, "at least 1 second"),
        (fixed.pack(CID, 60, KEY, TARGET_ID, bytes(16), 80)[:-1], "too short"),
    ],
)
def test_malformed_store_forward_is_refused(body: bytes, match: str) -> None:
    _client, server = pair()
    server.receive_data(frame(PROTOCOL_VERSION, 0x09, 1, body))
    with pytest.raises(ProtocolViolation, match=match):
        server.next_event()


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (struct.pack(">I32sH", 0, KEY, 1) + CID, "at least 1 second"),
        (struct.pack(">I32sH", 60, KEY, 2) + CID, "mismatches its frame"),
        (struct.pack(">I32sH", 60, KEY, 0), "mismatches its frame"),
        (struct.pack(">I32s", 60, KEY), "too short"),
    ],
)
def test_malformed_expect_is_refused(body: bytes, match: str) -> None:
    _client, server = pair()
    server.receive_data(frame(PROTOCOL_VERSION, 0x0A, 1, body))
    with pytest.raises(ProtocolViolation, match=match):
        server.next_event()


def test_a_sender_cannot_name_a_bad_target() -> None:
    client, _server = pair()
    with pytest.raises(ValueError, match="target port 0"):
        client.send(forward_request(client.new_request_id(), port=0))
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        client.send(forward_request(client.new_request_id(), host="example.org"))
