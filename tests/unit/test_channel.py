"""The transfer channel's handshake and records (core.wire.handshake, core.wire.records): golden vectors,
tampered, replayed and reflected messages, and a fuzzer. The channel over sockets is in
tests/integration/test_channel.py."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pmega.core.chunking import ChunkId
from p2pmega.core.crypto import new_signing_seed
from p2pmega.core.wire import PROTOCOL_VERSION, ErrorCode, MessageType, Role, TransferConnection
from p2pmega.core.wire.codec import HEADER
from p2pmega.core.wire.events import Error, FetchRequest
from p2pmega.core.wire.handshake import (
    CLIENT_FINISH_BYTES,
    CLIENT_HELLO_BYTES,
    SERVER_HELLO_BYTES,
    Handshake,
    HandshakeFailed,
)
from p2pmega.core.wire.records import (
    CLIENT_RECEIVE_BYTES,
    MAX_RECEIVE_BYTES,
    MAX_RECORD_PLAINTEXT_BYTES,
    RECORD_OVERHEAD_BYTES,
    RecordError,
    RecordReader,
    RecordWriter,
)
from tests.unit.test_fuzz import FUZZ, mutated
from tests.vectors.make_channel_vectors import VECTORS, pair, vectors

STORED = json.loads(VECTORS.read_text("utf-8"))


def fresh(role: Role) -> Handshake:
    return Handshake(role=role, signing_seed=new_signing_seed(), ephemeral_seed=new_signing_seed())


def transcript() -> tuple[Handshake, Handshake, list[bytes]]:
    client, server = fresh(Role.CLIENT), fresh(Role.SERVER)
    m1 = client.start()
    m2 = server.receive_data(m1)
    m3 = client.receive_data(m2)
    assert server.receive_data(m3) == b""
    return client, server, [m1, m2, m3]


def opened(reader: RecordReader, records: bytes) -> list[bytes]:
    out = []
    while True:
        records = records[reader.receive_data(records) :]
        while (size := reader.next_plaintext_bytes()) is not None:
            room = bytearray(size)
            assert reader.open_into(memoryview(room)) == size
            out.append(bytes(room))
        if not records:
            return out


# -- vectors -----------------------------------------------------------------------------------------


def test_regenerating_gives_the_stored_vectors() -> None:
    assert vectors() == STORED
    assert STORED["protocol_version"] == PROTOCOL_VERSION


def test_each_stored_message_is_what_the_other_side_answers() -> None:
    client, server = pair()
    assert client.start().hex() == STORED["client_hello"]
    assert (
        server.receive_data(bytes.fromhex(STORED["client_hello"])).hex() == STORED["server_hello"]
    )
    assert (
        client.receive_data(bytes.fromhex(STORED["server_hello"])).hex() == STORED["client_finish"]
    )
    assert server.receive_data(bytes.fromhex(STORED["client_finish"])) == b""
    assert client.keys is not None
    assert server.keys is not None
    assert server.keys.peer_public_key.hex() == STORED["client_public_key"]
    assert client.keys.peer_public_key.hex() == STORED["server_public_key"]
    assert client.keys.send_key == server.keys.receive_key
    assert client.keys.receive_key == server.keys.send_key
    reader = RecordReader(server.keys.receive_key)
    records = b"".join(bytes.fromhex(r["record"]) for r in STORED["client_records"])
    assert opened(reader, records) == [
        bytes.fromhex(r["plaintext"]) for r in STORED["client_records"]
    ]
    assert [
        len(bytes.fromhex(STORED[m])) for m in ("client_hello", "server_hello", "client_finish")
    ] == [
        CLIENT_HELLO_BYTES,
        SERVER_HELLO_BYTES,
        CLIENT_FINISH_BYTES,
    ]


def test_the_version_and_both_ephemeral_keys_are_in_the_transcript() -> None:
    client, server, (m1, m2, _) = transcript()
    assert m1[4] == m2[4] == PROTOCOL_VERSION
    assert client.keys is not None
    assert server.keys is not None
    assert client.keys.transcript_hash == server.keys.transcript_hash
    # Another server ephemeral key (same identities otherwise) gives another transcript and keys.
    again_client, _again_server, _ = transcript()
    assert again_client.keys is not None
    assert again_client.keys.transcript_hash != client.keys.transcript_hash


# -- tampering -------------------------------------------------------------------------------------


def run_with(flip_message: int, at: int) -> None:
    """The handshake with byte ``at`` of message ``flip_message`` flipped; raises HandshakeFailed."""
    client, server = fresh(Role.CLIENT), fresh(Role.SERVER)
    sides = [server, client, server]
    message = client.start()
    for index, side in enumerate(sides):
        if index == flip_message:
            changed = bytearray(message)
            changed[at] ^= 0x01
            message = bytes(changed)
        message = side.receive_data(message)
        if not message and not side.done:
            side.receive_data(b"")  # waiting for bytes that never come: the peer closes
    raise AssertionError(f"both sides finished: client {client.done}, server {server.done}")


@pytest.mark.parametrize(
    ("index", "size"), [(0, CLIENT_HELLO_BYTES), (1, SERVER_HELLO_BYTES), (2, CLIENT_FINISH_BYTES)]
)
def test_every_flipped_byte_of_every_message_is_refused(index: int, size: int) -> None:
    for at in range(size):
        with pytest.raises(HandshakeFailed):
            run_with(index, at)


# -- replay and reflection ---------------------------------------------------------------------------


def test_a_replayed_client_finish_is_refused_by_a_new_session() -> None:
    _client, _server, (m1, _m2, m3) = transcript()
    replay = fresh(Role.SERVER)
    replay.receive_data(m1)  # an observer replays the whole client side
    with pytest.raises(HandshakeFailed):
        replay.receive_data(m3)
    assert not replay.done


def test_a_replayed_server_hello_is_refused_by_a_new_client() -> None:
    _client, _server, (_m1, m2, _m3) = transcript()
    victim = fresh(Role.CLIENT)
    victim.start()
    with pytest.raises(HandshakeFailed):
        victim.receive_data(m2)


def test_reflected_messages_are_refused() -> None:
    client = fresh(Role.CLIENT)
    hello = client.start()
    with pytest.raises(HandshakeFailed):
        client.receive_data(hello)  # its own hello back
    _client, _server, (_m1, m2, _m3) = transcript()
    fresh_server = fresh(Role.SERVER)
    fresh_server.receive_data(fresh(Role.CLIENT).start())
    with pytest.raises(HandshakeFailed):
        fresh_server.receive_data(m2)  # a server hello where a client finish belongs


def test_a_hello_carrying_our_own_ephemeral_key_is_refused() -> None:
    client = fresh(Role.CLIENT)
    hello = client.start()
    # A server hello built around the client's own key: a reflection of its ephemeral.
    forged = HEADER.pack(SERVER_HELLO_BYTES - 4, PROTOCOL_VERSION, 0xC1, 0) + hello[10:42]
    with pytest.raises(HandshakeFailed, match="reflected"):
        client.receive_data(forged + bytes(SERVER_HELLO_BYTES - len(forged)))


def test_records_do_not_open_replayed_reordered_or_reflected() -> None:
    client, server, _ = transcript()
    assert client.keys is not None
    assert server.keys is not None
    writer = RecordWriter(client.keys.send_key)
    first, second = bytes(writer.seal([b"one"])), bytes(writer.seal([b"two"]))
    assert opened(RecordReader(server.keys.receive_key), first + second) == [b"one", b"two"]
    with pytest.raises(RecordError):
        opened(RecordReader(server.keys.receive_key), first + first)  # replayed
    with pytest.raises(RecordError):
        opened(RecordReader(server.keys.receive_key), second + first)  # reordered
    with pytest.raises(RecordError):
        opened(RecordReader(client.keys.receive_key), first)  # reflected to its sender
    for at in range(len(first)):
        changed = bytearray(first)
        changed[at] ^= 0x01
        reader = RecordReader(server.keys.receive_key)
        try:
            got = opened(reader, bytes(changed))
        except RecordError:
            continue
        assert got == []  # a longer length prefix waits for bytes that never come
        assert reader.buffered_bytes  # and the layer refuses a close mid-record


def test_large_writes_are_split_into_records_and_oversized_records_refused() -> None:
    client, server, _ = transcript()
    assert client.keys is not None
    assert server.keys is not None
    data = bytes(range(256)) * (3 * MAX_RECORD_PLAINTEXT_BYTES // 256 + 7)
    sealed = RecordWriter(client.keys.send_key).seal([b"head", memoryview(data)])
    assert len(sealed) == 4 + len(data) + 5 * RECORD_OVERHEAD_BYTES
    assert b"".join(opened(RecordReader(server.keys.receive_key), bytes(sealed))) == b"head" + data
    reader = RecordReader(server.keys.receive_key)
    reader.receive_data((MAX_RECORD_PLAINTEXT_BYTES + 33).to_bytes(4, "big"))
    with pytest.raises(RecordError, match="outside"):
        reader.next_plaintext_bytes()


def read_greedily(reader: RecordReader, records: bytes) -> tuple[bytes, int, int]:
    """Feed ``records`` as a busy socket does (each read fills all the room lent); open as they come.

    Returns:
        The plaintext, the number of reads and the largest buffer the reader had.
    """
    out, reads, largest = bytearray(), 0, reader.size
    while records:
        with reader.get_buffer() as room:
            size = min(len(room), len(records))
            assert size  # never an empty room: asyncio refuses one
            room[:size] = records[:size]
        reader.buffer_updated(size)
        records, reads, largest = records[size:], reads + 1, max(largest, reader.size)
        while (plain := reader.next_plaintext_bytes()) is not None:
            opened_room = bytearray(plain)
            assert reader.open_into(memoryview(opened_room)) == plain
            out += opened_room
    assert not reader.buffered_bytes
    return bytes(out), reads, largest


@pytest.mark.parametrize("limit", [MAX_RECEIVE_BYTES, CLIENT_RECEIVE_BYTES])
def test_a_read_brings_several_records_and_the_buffer_stays_within_its_limit(limit: int) -> None:
    client, server, _ = transcript()
    assert client.keys is not None
    assert server.keys is not None
    data = bytes(range(256)) * (16 * MAX_RECORD_PLAINTEXT_BYTES // 256 + 5)
    writer = RecordWriter(client.keys.send_key)
    sealed = b"".join(bytes(writer.seal([b"head", memoryview(data)])) for _ in range(3))
    records = 3 * (-(-(len(data) + 4) // MAX_RECORD_PLAINTEXT_BYTES))
    reader = RecordReader(server.keys.receive_key, max_buffer_bytes=limit)
    got, reads, largest = read_greedily(reader, sealed)
    assert got == 3 * (b"head" + data)
    assert largest <= limit
    # Reads that stopped at every record's end took one read per record (and more while growing).
    assert reads < records * MAX_RECEIVE_BYTES // limit


def test_records_split_anywhere_open_the_same() -> None:
    client, server, _ = transcript()
    assert client.keys is not None
    assert server.keys is not None
    data = bytes(range(251)) * (3 * MAX_RECORD_PLAINTEXT_BYTES // 251)
    sealed = bytes(RecordWriter(client.keys.send_key).seal([b"x", memoryview(data), b"y"]))
    for step in (1000, 65_536 + 3, MAX_RECORD_PLAINTEXT_BYTES + RECORD_OVERHEAD_BYTES + 1):
        reader = RecordReader(server.keys.receive_key, max_buffer_bytes=CLIENT_RECEIVE_BYTES)
        out = bytearray()
        for at in range(0, len(sealed), step):
            piece = sealed[at : at + step]
            while piece:
                piece = piece[reader.receive_data(piece) :]
                while (size := reader.next_plaintext_bytes()) is not None:
                    room = bytearray(size)
                    reader.open_into(memoryview(room))
                    out += room
        assert bytes(out) == b"x" + data + b"y"
        assert reader.size <= CLIENT_RECEIVE_BYTES


def test_a_record_buffer_must_hold_two_largest_records() -> None:
    with pytest.raises(ValueError, match="at least"):
        RecordReader(bytes(32), max_buffer_bytes=MAX_RECEIVE_BYTES - 1)


# -- versions and refusals -------------------------------------------------------------------------


def test_an_old_client_gets_an_error_frame_in_its_own_version() -> None:
    old = TransferConnection(role=Role.CLIENT)
    request = b"".join(old.send(FetchRequest(1, ChunkId(bytes(32)))))
    request = request[:4] + bytes([PROTOCOL_VERSION - 1]) + request[5:]
    server = fresh(Role.SERVER)
    with pytest.raises(HandshakeFailed) as caught:
        server.receive_data(request)
    assert caught.value.peer_version == PROTOCOL_VERSION - 1
    length, version, kind, request_id = HEADER.unpack_from(caught.value.reply)
    assert (version, kind, request_id) == (PROTOCOL_VERSION - 1, MessageType.ERROR, 0)
    assert caught.value.reply[10] == ErrorCode.UNSUPPORTED_VERSION
    assert len(caught.value.reply) == 4 + length


def test_a_client_reads_an_old_holder_and_a_busy_one() -> None:
    client = fresh(Role.CLIENT)
    client.start()
    with pytest.raises(HandshakeFailed) as caught:
        client.receive_data(HEADER.pack(7, 1, MessageType.ERROR, 0) + bytes([5]))
    assert caught.value.peer_version == 1
    busy = b"".join(TransferConnection(role=Role.SERVER).send(Error(0, ErrorCode.BUSY, "busy")))
    client = fresh(Role.CLIENT)
    client.start()
    with pytest.raises(HandshakeFailed) as caught:
        client.receive_data(busy)
    assert caught.value.refused is ErrorCode.BUSY


def test_a_declared_large_handshake_frame_is_refused_from_its_prefix() -> None:
    server = fresh(Role.SERVER)
    with pytest.raises(HandshakeFailed, match="handshake frame"):
        server.receive_data((4 << 20).to_bytes(4, "big") + bytes([PROTOCOL_VERSION]))


# -- fuzzing ---------------------------------------------------------------------------------------

MESSAGES = [
    bytes.fromhex(STORED[name]) for name in ("client_hello", "server_hello", "client_finish")
]


@FUZZ
@given(
    st.one_of(mutated(MESSAGES), st.binary(max_size=400)),
    st.sampled_from([Role.CLIENT, Role.SERVER]),
)
def test_the_handshake_only_ever_raises_handshake_failed(raw: bytes, role: Role) -> None:
    side = fresh(role)
    if role is Role.CLIENT:
        side.start()
    try:
        side.receive_data(raw)
        side.receive_data(b"")
    except HandshakeFailed:
        return
    raise AssertionError("a stranger's bytes completed a handshake")
