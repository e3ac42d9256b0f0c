"""Fuzzing the decoders that take bytes from strangers (issue 16, item 6): the link parser, the frame decoder (both
roles), the saved-contacts and DHT-contact decoders, the DHT datagram handler and the manifest decoder (the channel
handshake's fuzz test is in test_channel.py, the folder listing's in test_tree.py).

Each gets valid inputs mutated (bytes flipped, cut, duplicated, spliced) and random bytes, and may only answer
with its documented, typed error. ``P2PMEGA_FUZZ_EXAMPLES`` (default 1,000 per decoder, about ten seconds for all in
CI) raises the budget for a longer run by hand, e.g. ``P2PMEGA_FUZZ_EXAMPLES=20000 pytest tests/unit/test_fuzz.py``.
A crash found here becomes a regression test beside the decoder's own tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pmega.core.chunking import (
    FORMAT_VERSION,
    KIND_ROOT,
    ROOT_LEVEL,
    ChunkId,
    FileKeys,
    make_aad,
    open_chunk,
    seal_chunk,
)
from p2pmega.core.magnet import KeepCap, ReadCap, format_link, parse_link
from p2pmega.core.manifest import FileEncoder
from p2pmega.core.manifest_walk import ManifestWalker
from p2pmega.core.record import decode_contacts, parse_contacts_file, parse_failed_contacts
from p2pmega.core.wire import (
    NEED_DATA,
    ConnectionClosed,
    ProtocolViolation,
    Role,
    TransferConnection,
)
from p2pmega.errors import BadLink, P2PMegaError
from tests.vectors.make_wire_vectors import VECTORS

EXAMPLES = int(os.environ.get("P2PMEGA_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LINKS = [
    format_link(
        ReadCap(
            ChunkId(b"\x07" * 32), b"\x01" * 32, name="f.txt", size=12, peers=(("10.0.0.1", 7847),)
        )
    ),
    format_link(KeepCap(ChunkId(b"\x08" * 32), b"\x02" * 32)),
]
_WIRE = json.loads(VECTORS.read_text("utf-8"))
REQUEST_FRAMES = [bytes.fromhex(e["request_frame"]) for e in _WIRE["exchanges"]]
REPLY_FRAMES = [bytes.fromhex(e["reply_frame"]) for e in _WIRE["exchanges"]]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed input with a few random edits: flips, cuts, insertions, duplications, splices of another seed."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "dup", "splice", "truncate"]))
        at = draw(st.integers(0, max(0, len(data))))
        if kind == "flip" and data:
            i = min(at, len(data) - 1)
            data[i] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "dup":
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
        elif kind == "splice":
            other = draw(st.sampled_from(seeds))
            data[at:] = other[draw(st.integers(0, len(other))) :]
        else:
            data = data[:at]
    return bytes(data)


@FUZZ
@given(st.one_of(mutated([link.encode() for link in LINKS]), st.binary(max_size=600)))
def test_the_link_parser_only_ever_raises_bad_link(raw: bytes) -> None:
    text = raw.decode("utf-8", errors="replace")
    try:
        cap = parse_link(text)
    except BadLink:
        return
    assert isinstance(cap, ReadCap | KeepCap)
    assert parse_link(format_link(cap)) == cap, "whatever parses, formats back to itself"


def _feed(role: Role, data: bytes) -> None:
    conn = TransferConnection(role=role)
    try:
        # In pieces, as a socket delivers them.
        for start in range(0, len(data), 97):
            conn.receive_data(data[start : start + 97])
            while (
                not isinstance(event := conn.next_event(), ConnectionClosed)
                and event is not NEED_DATA
            ):
                pass
    except ProtocolViolation:
        return


@FUZZ
@given(st.one_of(mutated([*REQUEST_FRAMES, b"".join(REQUEST_FRAMES)]), st.binary(max_size=2000)))
def test_a_holder_decodes_any_bytes_to_events_or_a_protocol_violation(data: bytes) -> None:
    _feed(Role.SERVER, data)


@FUZZ
@given(st.one_of(mutated(REPLY_FRAMES), st.binary(max_size=2000)))
def test_a_client_decodes_any_bytes_to_events_or_a_protocol_violation(data: bytes) -> None:
    conn = TransferConnection(role=Role.CLIENT)
    # Replies are only accepted for requests outstanding: send one of each kind first.
    from tests.vectors.make_wire_vectors import exchanges

    for _name, request, _reply in exchanges():
        conn.send(request)
    try:
        conn.receive_data(data)  # b"" is the end of the stream, as in h11
        while (
            not isinstance(event := conn.next_event(), ConnectionClosed) and event is not NEED_DATA
        ):
            pass
    except ProtocolViolation:
        return


CONTACT_FILES = [
    b'{"version":1,"contacts":[["10.0.0.1",7847],["::1",7]],"failed":[["10.0.0.2",1,1764806400.5]]}',
]


@FUZZ
@given(st.one_of(mutated(CONTACT_FILES), st.binary(max_size=400)))
def test_the_saved_contacts_file_parses_or_is_refused_with_value_error(raw: bytes) -> None:
    text = raw.decode("utf-8", errors="replace")
    for parse in (parse_contacts_file, parse_failed_contacts):
        with contextlib.suppress(ValueError):  # json.JSONDecodeError is one
            parse(text)


@FUZZ
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.binary(max_size=24) | st.text(max_size=40),
        lambda children: st.lists(children, max_size=22),
        max_leaves=80,
    )
)
def test_contacts_in_a_dht_reply_decode_or_are_refused(raw: Any) -> None:
    from p2pmega.errors import RemoteProtocolError

    with contextlib.suppress(RemoteProtocolError):
        decode_contacts(raw, max_contacts=20)


@FUZZ
@given(st.lists(st.binary(max_size=700), min_size=1, max_size=8))
def test_the_dht_datagram_handler_never_raises(datagrams: list[bytes]) -> None:
    from p2pmega.net.kademlia_server import HardenedServer

    async def run() -> int:
        server = HardenedServer(node_id=b"\x05" * 20, rpc_timeout_s=0.5)
        proto = server._create_protocol()
        sent: list[bytes] = []

        class Sink(asyncio.DatagramTransport):
            def sendto(self, data: Any, addr: Any = None) -> None:
                sent.append(bytes(data))

            def is_closing(self) -> bool:
                return False

        proto.connection_made(Sink())
        for data in datagrams:
            proto.datagram_received(b"\x00" + data, ("10.1.2.3", 4000))  # as a request
            proto.datagram_received(data, ("10.1.2.3", 4000))
        await proto.close()
        return len(sent)

    asyncio.run(run())


def _root_plaintexts() -> tuple[bytes, list[bytes]]:
    """A file key and the opened root plaintexts of a few real files (a leaf root and a tree root)."""
    key = b"\x05" * 32
    out = []
    for size, chunk_size in ((100, 64), (64 * 300, 64)):
        encoder = FileEncoder(name="f.txt", size=size, chunk_size=chunk_size, key=key)
        for i in range(-(-size // chunk_size)):
            encoder.encode_chunk(i, bytes(min(chunk_size, size - i * chunk_size)))
        cap, manifest_chunks = encoder.finish()
        root = dict(manifest_chunks)[cap.root]
        keys = FileKeys.from_file_key(key)
        aad = make_aad(KIND_ROOT, keys.file_id, 0, final=True, level=ROOT_LEVEL, version=root[0])
        out.append(open_chunk(keys.verify_key, KIND_ROOT, root, aad))
    return key, out


_ROOT_KEY, _ROOTS = _root_plaintexts()


@FUZZ
@given(st.one_of(mutated(_ROOTS), st.binary(max_size=400)))
def test_the_manifest_decoder_takes_any_authentic_root_or_raises_a_typed_error(
    plaintext: bytes,
) -> None:
    # The worst a root can be: authentic under the link's key (the sharer made it) but with any contents.
    keys = FileKeys.from_file_key(_ROOT_KEY)
    aad = make_aad(KIND_ROOT, keys.file_id, 0, final=True, level=ROOT_LEVEL, version=FORMAT_VERSION)
    root_id, stored = seal_chunk(keys.verify_key, KIND_ROOT, plaintext, aad)
    walker = ManifestWalker(ReadCap(root_id, _ROOT_KEY, name="f.txt"))
    with contextlib.suppress(P2PMegaError):
        walker.feed(root_id, stored)
        assert all(len(c) == 32 for c in walker.wanted())
