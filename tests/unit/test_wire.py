"""core.wire: two sans-I/O endpoints wired together, no sockets (h11 ConnectionPair style)."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pmega.core.chunking import MAX_SEALED_CHUNK_BYTES, ChunkId, chunk_id_of
from p2pmega.core.wire import (
    CHUNK_DATA_HEAD_BYTES,
    HEADER_BYTES,
    MAX_BATCH_IDS,
    MAX_FRAME_BYTES,
    NEED_DATA,
    PROTOCOL_VERSION,
    ChunkData,
    ConnectionClosed,
    Error,
    ErrorCode,
    Event,
    FetchRequest,
    HasReply,
    HasRequest,
    ProtocolViolation,
    RenewReply,
    RenewRequest,
    Role,
    StoreOK,
    StoreRequest,
    TransferConnection,
)

CID = chunk_id_of(b"hello")
ids_strategy = st.lists(st.binary(min_size=32, max_size=32).map(ChunkId), min_size=1, max_size=40)


def pair() -> tuple[TransferConnection, TransferConnection]:
    return TransferConnection(role=Role.CLIENT), TransferConnection(role=Role.SERVER)


def deliver(
    buffers: Sequence[bytes | memoryview], to: TransferConnection, *, step: int = 0
) -> list[Event]:
    """Feed ``buffers`` to ``to`` (in pieces of ``step`` bytes if given) and drain its events."""
    data = b"".join(buffers)
    pieces = [data[i : i + step] for i in range(0, len(data), step)] if step else [data]
    events: list[Event] = []
    for piece in pieces:
        to.receive_data(piece)
        while (event := to.next_event()) is not NEED_DATA:
            events.append(event)
    return events


def frame(version: int, kind: int, request_id: int, body: bytes) -> bytes:
    return struct.pack(">IBBI", 6 + len(body), version, kind, request_id) + body


def test_store_round_trip_in_one_byte_pieces() -> None:
    client, server = pair()
    request = StoreRequest(client.new_request_id(), CID, 3600, b"hello")
    buffers = client.send(request)
    assert buffers[-1] == b"hello"  # the chunk body is passed through, not concatenated
    assert deliver(buffers, server, step=1) == [request]
    assert server.outstanding == 1
    assert deliver(server.send(StoreOK(request.request_id, True)), client) == [
        StoreOK(request.request_id, True)
    ]
    assert client.outstanding == 0
    assert server.outstanding == 0


@given(data=st.binary(max_size=4096))
def test_fetch_round_trip(data: bytes) -> None:
    client, server = pair()
    cid = chunk_id_of(data)
    rid = client.new_request_id()
    assert deliver(client.send(FetchRequest(rid, cid)), server) == [FetchRequest(rid, cid)]
    assert deliver(server.send(ChunkData(rid, cid, data)), client) == [ChunkData(rid, cid, data)]


@given(ids=ids_strategy, flags_seed=st.integers(0, 2**40 - 1), lease=st.integers(1, 2**32 - 1))
def test_has_and_renew_round_trip(ids: list[ChunkId], flags_seed: int, lease: int) -> None:
    client, server = pair()
    flags = tuple(bool(flags_seed >> i & 1) for i in range(len(ids)))
    has = HasRequest(client.new_request_id(), tuple(ids))
    renew = RenewRequest(client.new_request_id(), tuple(ids), lease)
    assert deliver(client.send(has) + client.send(renew), server) == [has, renew]
    # Replies may come back in any order.
    replies = server.send(RenewReply(renew.request_id, flags)) + server.send(
        HasReply(has.request_id, flags)
    )
    assert deliver(replies, client) == [
        RenewReply(renew.request_id, flags),
        HasReply(has.request_id, flags),
    ]


def test_error_reply_round_trip_and_sanitised_message() -> None:
    client, server = pair()
    rid = client.new_request_id()
    deliver(client.send(FetchRequest(rid, CID)), server)
    events = deliver(server.send(Error(rid, ErrorCode.NOT_FOUND, "no\nsuch\x00chunk")), client)
    assert events == [Error(rid, ErrorCode.NOT_FOUND, "no?such?chunk")]


def test_peer_close_at_boundary_is_an_event() -> None:
    _, server = pair()
    server.receive_data(b"")
    assert isinstance(server.next_event(), ConnectionClosed)


def test_peer_close_mid_frame_is_a_violation() -> None:
    client, server = pair()
    data = b"".join(client.send(StoreRequest(1, CID, 10, b"hello")))
    server.receive_data(data[:20])
    assert server.next_event() is NEED_DATA
    assert server.receiving_frame
    server.receive_data(b"")
    with pytest.raises(ProtocolViolation, match="middle of a frame"):
        server.next_event()
    assert server.failed


def test_oversized_length_prefix_refused_from_four_bytes() -> None:
    _, server = pair()
    server.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(ProtocolViolation) as info:
        server.next_event()
    assert info.value.code is ErrorCode.TOO_LARGE
    assert server.buffered_bytes == 0
    # A failed server may still send its one final Error, then nothing else.
    final = b"".join(server.send(Error(0, ErrorCode.TOO_LARGE, str(info.value))))
    assert final[5] == 0xFF


def test_unknown_version_refused_before_body_arrives() -> None:
    _, server = pair()
    server.receive_data(frame(PROTOCOL_VERSION + 1, 0x02, 1, bytes(32))[:5])
    with pytest.raises(ProtocolViolation) as info:
        server.next_event()
    assert info.value.code is ErrorCode.UNSUPPORTED_VERSION
    assert f"version {PROTOCOL_VERSION + 1}" in str(info.value)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(PROTOCOL_VERSION, 0x77, 1, b""), ErrorCode.BAD_REQUEST),  # unknown type
        (
            frame(PROTOCOL_VERSION, 0x81, 1, b"\x01"),
            ErrorCode.BAD_REQUEST,
        ),  # a reply sent to a server
        (frame(PROTOCOL_VERSION, 0x02, 0, bytes(32)), ErrorCode.BAD_REQUEST),  # reserved id 0
        (frame(PROTOCOL_VERSION, 0x02, 1, bytes(31)), ErrorCode.BAD_REQUEST),  # short chunk id
        (frame(PROTOCOL_VERSION, 0x03, 1, struct.pack(">H", 2) + bytes(32)), ErrorCode.BAD_REQUEST),
        (
            frame(PROTOCOL_VERSION, 0x03, 1, struct.pack(">H", 0)),
            ErrorCode.BAD_REQUEST,
        ),  # empty batch
        (frame(PROTOCOL_VERSION, 0x01, 1, bytes(32) + b"\x00\x00\x00\x00x"), ErrorCode.BAD_REQUEST),
        (b"\x00\x00\x00\x02\x01\x01", ErrorCode.BAD_REQUEST),  # shorter than a header
    ],
)
def test_malformed_frames_are_violations(data: bytes, code: ErrorCode) -> None:
    _, server = pair()
    server.receive_data(data)
    with pytest.raises(ProtocolViolation) as info:
        server.next_event()
    assert info.value.code is code
    with pytest.raises(ProtocolViolation):
        server.next_event()


def test_duplicate_in_flight_request_id_is_a_violation() -> None:
    client, server = pair()
    deliver(client.send(FetchRequest(7, CID)), server)
    server.receive_data(frame(PROTOCOL_VERSION, 0x02, 7, bytes(CID)))
    with pytest.raises(ProtocolViolation, match="already in flight"):
        server.next_event()


def test_client_rejects_unsolicited_and_mismatched_replies() -> None:
    client, server = pair()
    client.receive_data(frame(PROTOCOL_VERSION, 0x81, 5, b"\x01"))
    with pytest.raises(ProtocolViolation, match="unknown request 5"):
        client.next_event()

    client, server = pair()
    deliver(client.send(FetchRequest(1, CID)), server)
    wrong = chunk_id_of(b"other")
    client.receive_data(frame(PROTOCOL_VERSION, 0x82, 1, wrong + b"other"))
    with pytest.raises(ProtocolViolation, match="not asked for"):
        client.next_event()

    client, server = pair()
    deliver(client.send(HasRequest(1, (CID, CID))), server)
    client.receive_data(frame(PROTOCOL_VERSION, 0x83, 1, struct.pack(">H", 1) + b"\x01"))
    with pytest.raises(ProtocolViolation, match="2 0/1 flags"):
        client.next_event()


def test_connection_level_error_reaches_client() -> None:
    client, _ = pair()
    client.receive_data(frame(PROTOCOL_VERSION, 0xFF, 0, bytes([ErrorCode.BUSY]) + b"busy"))
    assert client.next_event() == Error(0, ErrorCode.BUSY, "busy")


def test_unknown_error_code_decodes_as_internal() -> None:
    client, _ = pair()
    client.new_request_id()
    client.send(FetchRequest(1, CID))
    client.receive_data(frame(PROTOCOL_VERSION, 0xFF, 1, b"\xee" + b"?"))
    assert client.next_event() == Error(1, ErrorCode.INTERNAL, "?")


def test_local_misuse_raises_value_error() -> None:
    client, server = pair()
    with pytest.raises(ValueError, match="cannot send"):
        client.send(StoreOK(1, True))
    with pytest.raises(ValueError, match="awaits"):
        server.send(StoreOK(1, True))
    with pytest.raises(ValueError, match="exceeds"):
        client.send(StoreRequest(1, CID, 10, bytes(MAX_SEALED_CHUNK_BYTES + 1)))
    with pytest.raises(ValueError, match="batch"):
        client.send(HasRequest(1, (CID,) * (MAX_BATCH_IDS + 1)))
    with pytest.raises(ValueError, match="lease"):
        client.send(RenewRequest(1, (CID,), 0))


def test_largest_chunk_fits_the_frame_limit() -> None:
    client, server = pair()
    data = bytes(MAX_SEALED_CHUNK_BYTES)
    buffers = client.send(StoreRequest(1, chunk_id_of(data), 1, data))
    assert sum(map(len, buffers)) <= MAX_FRAME_BYTES
    assert len(buffers[0]) == HEADER_BYTES + 32 + 4
    [event] = deliver(buffers, server, step=65536)
    assert isinstance(event, StoreRequest)
    assert event.data == data


def test_smaller_frame_limit_is_enforced() -> None:
    client = TransferConnection(role=Role.CLIENT)
    server = TransferConnection(role=Role.SERVER, max_frame_bytes=1024)
    buffers = client.send(StoreRequest(1, CID, 1, bytes(2000)))
    server.receive_data(buffers[0])
    with pytest.raises(ProtocolViolation) as info:
        server.next_event()
    assert info.value.code is ErrorCode.TOO_LARGE


def test_request_ids_skip_zero_and_in_use() -> None:
    client, _ = pair()
    client._next_request_id = 2**32 - 1
    assert client.new_request_id() == 2**32 - 1
    assert client.new_request_id() == 1
    client.send(FetchRequest(2, CID))
    assert client.new_request_id() == 3


def test_data_repr_hides_chunk_bytes() -> None:
    assert "secret" not in repr(StoreRequest(1, CID, 1, b"secret"))
    assert "secret" not in repr(ChunkData(1, CID, b"secret"))


def test_golden_frames_match_protocol_md() -> None:
    """The examples of docs/PROTOCOL.md; a diff here means the format changed: bump the version."""
    client, server = pair()
    chunk_id = ChunkId(b"\xab" * 32)
    fetch = b"".join(client.send(FetchRequest(1, chunk_id)))
    assert fetch == bytes.fromhex("00000026 02 02 00000001".replace(" ", "")) + b"\xab" * 32
    deliver([fetch], server)
    error = b"".join(server.send(Error(1, ErrorCode.NOT_FOUND, "chunk not stored here")))
    assert error == bytes.fromhex("0000001c02ff0000000101") + b"chunk not stored here"


def receive_into(conn: TransferConnection, data: bytes, step: int) -> list[Event]:
    """Deliver ``data`` the BufferedProtocol way: get_buffer, copy at most ``step``, buffer_updated."""
    events: list[Event] = []
    offset = 0
    while offset < len(data):
        room = conn.get_buffer(-1)
        size = min(len(room), step, len(data) - offset)
        room[:size] = data[offset : offset + size]
        room.release()
        conn.buffer_updated(size)
        offset += size
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
    return events


@given(
    sizes=st.lists(st.integers(0, 300_000), min_size=1, max_size=4),
    step=st.sampled_from([1000, 65536, 100_000, 1 << 20]),
)
def test_buffered_receive_of_pipelined_chunks(sizes: list[int], step: int) -> None:
    client, server = pair()
    requests = [
        FetchRequest(client.new_request_id(), chunk_id_of(bytes([i]))) for i in range(len(sizes))
    ]
    for request in requests:
        deliver(client.send(request), server)
    replies = [
        ChunkData(r.request_id, r.chunk_id, bytes([i % 251]) * size)
        for i, (r, size) in enumerate(zip(requests, sizes, strict=True))
    ]
    wire = b"".join(b"".join(server.send(reply)) for reply in replies)
    assert receive_into(client, wire, step) == replies
    assert not client.receiving_frame


def test_a_server_buffer_grows_with_the_bytes_that_arrive() -> None:
    # Before issue 16 the room was the declared frame size at once: a peer that sent 10 bytes
    # declaring 4 MiB cost 4 MiB on every connection.
    client, server = pair()
    data = bytes(500_000)
    wire = b"".join(client.send(StoreRequest(1, chunk_id_of(data), 60, data)))
    room = server.get_buffer(-1)
    room[:100] = wire[:100]
    room.release()
    server.buffer_updated(100)
    assert server.next_event() is NEED_DATA
    assert len(server.get_buffer(-1)) <= 64 << 10
    got = receive_into(server, wire[100:], 1 << 20)
    assert got == [StoreRequest(1, chunk_id_of(data), 60, data)]
    with pytest.raises(ValueError, match="do not fit"):
        server.buffer_updated(10**9)


def test_a_client_lends_the_rest_of_a_reply_it_asked_for() -> None:
    client, server = pair()
    cid = chunk_id_of(bytes(500_000))
    deliver(client.send(FetchRequest(1, cid)), server)
    wire = b"".join(server.send(ChunkData(1, cid, bytes(500_000))))
    room = client.get_buffer(-1)
    room[:100] = wire[:100]
    room.release()
    client.buffer_updated(100)
    assert client.next_event() is NEED_DATA
    assert len(client.get_buffer(-1)) >= len(wire) - 100


def test_a_declared_frame_costs_only_what_arrived() -> None:
    client, server = pair()
    data = bytes(3 << 20)
    wire = b"".join(client.send(StoreRequest(1, chunk_id_of(data), 60, data)))
    sizes = []
    offset = 0
    while offset < (1 << 20):
        room = server.get_buffer(-1)
        size = min(len(room), (1 << 20) - offset)
        room[:size] = wire[offset : offset + size]
        room.release()
        server.buffer_updated(size)
        offset += size
        sizes.append(len(server.get_buffer(-1)) + offset)
        assert server.next_event() is NEED_DATA
    assert max(sizes) <= 2 * offset + (64 << 10) < len(wire)


def test_server_frees_a_large_receive_buffer_between_frames() -> None:
    client, server = pair()
    data = bytes(300_000)
    deliver(client.send(StoreRequest(1, chunk_id_of(data), 1, data)), server, step=70_000)
    assert server.buffered_bytes == 0
    assert not server.receiving_frame


@given(garbage=st.binary(max_size=2000), step=st.integers(1, 700))
def test_garbage_only_ever_raises_protocol_violation(garbage: bytes, step: int) -> None:
    for role in Role:
        conn = TransferConnection(role=role, max_frame_bytes=4096)
        try:
            for start in range(0, len(garbage), step):
                conn.receive_data(garbage[start : start + step])
                while conn.next_event() is not NEED_DATA:
                    pass
            conn.receive_data(b"")
            assert isinstance(conn.next_event(), ConnectionClosed)
        except ProtocolViolation:
            assert conn.failed
        assert conn.buffered_bytes <= 4096 + step


@given(
    sizes=st.lists(st.integers(0, 200_000), min_size=1, max_size=4),
    step=st.sampled_from([1000, 65536, 100_000, 1 << 20]),
)
def test_server_receives_pipelined_stores_whole(sizes: list[int], step: int) -> None:
    client, server = pair()
    stores = [
        StoreRequest(i + 1, chunk_id_of(bytes([i])), 60, bytes([i]) * n)
        for i, n in enumerate(sizes)
    ]
    wire = b"".join(b"".join(client.send(store)) for store in stores)
    assert receive_into(server, wire, step) == stores
    assert not server.receiving_frame


def test_server_hands_a_large_store_its_receive_buffer() -> None:
    """A large chunk is not copied out of the receive buffer: the event gets a view of it."""
    client, server = pair()
    data = bytes(range(256)) * 1000
    store = StoreRequest(1, chunk_id_of(data), 60, data)
    fetch = FetchRequest(2, CID)
    wire = b"".join([*client.send(store), *client.send(fetch)])
    # Everything in one receive, as from a socket: the fetch after the chunk moves to a new buffer.
    events = receive_into(server, wire, len(wire))
    assert events == [store, fetch]
    assert isinstance(events[0], StoreRequest)
    assert type(events[0].data) is memoryview
    small = StoreRequest(3, chunk_id_of(b"x"), 60, b"x" * 100)
    assert receive_into(server, b"".join(client.send(small)), 1 << 20) == [small]


def test_client_hands_a_large_chunk_its_receive_buffer() -> None:
    """A large fetched chunk is not copied out either, and later receives do not overwrite it."""
    client, server = pair()
    first, second = bytes(range(256)) * 1000, bytes(reversed(range(256))) * 1000
    requests = [FetchRequest(client.new_request_id(), chunk_id_of(d)) for d in (first, second)]
    for request in requests:
        deliver(client.send(request), server)
    replies = [
        ChunkData(r.request_id, r.chunk_id, d)
        for r, d in zip(requests, (first, second), strict=True)
    ]
    # The first reply and the start of the second arrive together: that start moves to a new buffer.
    wire = b"".join(b"".join(server.send(reply)) for reply in replies)
    split = len(wire) // 2 + 1000
    got = receive_into(client, wire[:split], split)
    assert got == replies[:1]
    got += receive_into(client, wire[split:], 4096)
    assert got == replies
    for event, data in zip(got, (first, second), strict=True):
        assert isinstance(event, ChunkData)
        assert type(event.data) is memoryview
        assert bytes(event.data) == data
    assert not client.receiving_frame
    small = FetchRequest(client.new_request_id(), CID)
    deliver(client.send(small), server)
    reply = ChunkData(small.request_id, CID, b"y" * 100)
    small_got = receive_into(client, b"".join(server.send(reply)), 1 << 20)
    assert small_got == [reply]
    assert isinstance(small_got[0], ChunkData)
    assert type(small_got[0].data) is bytes


def test_chunk_data_in_place_is_the_same_frame_in_one_buffer() -> None:
    client, server = pair()
    data = bytes(range(256)) * 40
    cid = chunk_id_of(data)
    deliver(client.send(FetchRequest(1, cid)), server)
    deliver(client.send(FetchRequest(2, cid)), server)
    expected = b"".join(server.send(ChunkData(1, cid, data)))
    frame = bytearray(CHUNK_DATA_HEAD_BYTES + len(data) + 10)
    frame[CHUNK_DATA_HEAD_BYTES : CHUNK_DATA_HEAD_BYTES + len(data)] = data
    # The same frame, but answering request 2 (bytes 6-9 are the request id).
    in_place = server.send_chunk_data_in_place(2, frame, len(data))
    assert bytes(in_place) == expected[:6] + (2).to_bytes(4, "big") + expected[10:]
    assert server.outstanding == 0
    assert deliver([expected], client) == [ChunkData(1, cid, data)]
    with pytest.raises(ValueError, match="no FETCH request 2"):
        server.send_chunk_data_in_place(2, frame, len(data))
    deliver(client.send(HasRequest(3, (cid,))), server)
    with pytest.raises(ValueError, match="no FETCH request 3"):
        server.send_chunk_data_in_place(3, frame, len(data))
    deliver(client.send(FetchRequest(4, cid)), server)
    with pytest.raises(ValueError, match="cannot hold"):
        server.send_chunk_data_in_place(4, frame, len(frame))
    with pytest.raises(ValueError, match="working server"):
        client.send_chunk_data_in_place(4, frame, len(data))


def pending(conn: TransferConnection) -> bool:
    """``conn.frame_pending`` (a call, so that mypy does not narrow it between asserts)."""
    return conn.frame_pending


def test_frame_pending_until_the_frame_is_whole() -> None:
    client, server = pair()
    data = bytes(100_000)
    wire = b"".join([*client.send(StoreRequest(1, chunk_id_of(data), 60, data))])
    wire += b"".join(client.send(FetchRequest(2, CID)))
    assert not pending(server)
    server.receive_data(wire[:3])
    assert server.next_event() is NEED_DATA
    assert not pending(server)  # the length is not known yet
    server.receive_data(wire[3:50_000])
    assert server.next_event() is NEED_DATA
    assert pending(server)
    server.receive_data(wire[50_000:-10])
    assert not pending(server)
    assert isinstance(server.next_event(), StoreRequest)
    assert server.next_event() is NEED_DATA
    assert pending(server)  # the fetch after it, 10 bytes short
    server.receive_data(wire[-10:])
    assert not pending(server)
    assert server.next_event() == FetchRequest(2, CID)


def test_a_large_frame_is_received_into_a_buffer_from_allocate() -> None:
    given: list[bytearray] = []

    def allocate(size: int) -> bytearray:
        given.append(bytearray(size + 1000))  # more than asked is fine
        return given[-1]

    client = TransferConnection(role=Role.CLIENT)
    server = TransferConnection(role=Role.SERVER, allocate=allocate)
    data = bytes(range(256)) * 1000
    first = StoreRequest(1, chunk_id_of(data), 60, data)
    second = StoreRequest(2, first.chunk_id, 60, data[::-1])
    [got_first] = receive_into(server, b"".join(client.send(first)), 65536)
    [got_second] = receive_into(server, b"".join(client.send(second)), 65536)
    # Each large frame got its own buffer from allocate and kept it: the first event's data is
    # intact after the second frame arrived.
    assert isinstance(got_first, StoreRequest)
    assert isinstance(got_second, StoreRequest)
    assert isinstance(got_first.data, memoryview)
    assert isinstance(got_second.data, memoryview)
    # The buffer grows with what arrived (issue 16), so a frame may take a few; the last one of
    # each frame holds its data.
    assert got_first.data.obj in given
    assert got_second.data.obj in given
    assert got_first.data.obj is not got_second.data.obj
    assert (got_first, got_second) == (first, second)


def test_allocate_must_give_enough_room() -> None:
    client = TransferConnection(role=Role.CLIENT)
    server = TransferConnection(role=Role.SERVER, allocate=lambda size: bytearray(size - 1))
    data = bytes(100_000)
    wire = b"".join(client.send(StoreRequest(1, chunk_id_of(data), 60, data)))
    server.receive_data(wire[:100])  # small: not from allocate
    with pytest.raises(ValueError, match="allocate"):
        server.get_buffer(-1)  # room for the rest of the frame: from allocate
