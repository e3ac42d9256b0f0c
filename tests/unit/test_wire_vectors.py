"""Golden frames (tests/vectors/wire_v2.json) for every message type and error code of core.wire.

A diff means the wire changed: bump PROTOCOL_VERSION (docs/PROTOCOL.md) and regenerate deliberately
with ``python -m tests.vectors.make_wire_vectors``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from p2pmega.core.wire import NEED_DATA, PROTOCOL_VERSION, Role, TransferConnection
from tests.vectors.make_wire_vectors import VECTORS, describe, exchanges, frames

STORED = json.loads(VECTORS.read_text("utf-8"))


def test_vectors_cover_every_message_type() -> None:
    kinds = {e["request"]["type"] for e in STORED["exchanges"]} | {
        e["reply"]["type"] for e in STORED["exchanges"]
    }
    assert kinds == {
        "StoreRequest",
        "FetchRequest",
        "HasRequest",
        "RenewRequest",
        "LeasesRequest",
        "KeyedStoreRequest",
        "RenewSignedRequest",
        "SpaceRequest",
        "ForwardStoreRequest",
        "ExpectRequest",
        "ForwardedStoreRequest",
        "StoreOK",
        "ForwardOK",
        "ChunkData",
        "HasReply",
        "RenewReply",
        "LeasesReply",
        "SpaceReply",
        "Error",
    }
    assert STORED["protocol_version"] == PROTOCOL_VERSION


def test_regenerating_gives_the_stored_frames() -> None:
    assert frames() == STORED


def _receive(conn: TransferConnection, frame_hex: str) -> Any:
    conn.receive_data(bytes.fromhex(frame_hex))
    event = conn.next_event()
    assert event is not NEED_DATA
    assert conn.next_event() is NEED_DATA
    return event


@pytest.mark.parametrize(
    ("name", "req", "reply"), exchanges(), ids=[name for name, _, _ in exchanges()]
)
def test_each_frame_encodes_and_decodes(name: str, req: Any, reply: Any) -> None:
    stored = next(e for e in STORED["exchanges"] if e["name"] == name)
    client = TransferConnection(role=Role.CLIENT)
    server = TransferConnection(role=Role.SERVER)
    assert b"".join(bytes(b) for b in client.send(req)).hex() == stored["request_frame"]
    assert describe(_receive(server, stored["request_frame"])) == stored["request"]
    assert b"".join(bytes(b) for b in server.send(reply)).hex() == stored["reply_frame"]
    assert describe(_receive(client, stored["reply_frame"])) == stored["reply"]
