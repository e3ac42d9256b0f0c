"""Golden bytes of the transfer channel (core.wire.handshake and records): fixed seeds, exact messages.

Run from the repository root: ``python -m tests.vectors.make_channel_vectors`` rewrites channel_v2.json.
Nothing is random: the identity and ephemeral seeds are fixed, and Ed25519 signatures are
deterministic, so the file changes only when the handshake or the record format does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from p2pmega.core.wire import PROTOCOL_VERSION, Role
from p2pmega.core.wire.handshake import Handshake
from p2pmega.core.wire.records import RecordWriter

VECTORS = Path(__file__).with_name(f"channel_v{PROTOCOL_VERSION}.json")
SEEDS = {
    "client_identity_seed": bytes(range(32)),
    "server_identity_seed": bytes(range(32, 64)),
    "client_ephemeral_seed": bytes(range(64, 96)),
    "server_ephemeral_seed": bytes(range(96, 128)),
}
RECORD_PLAINTEXTS = [b"request frame bytes", bytes(range(256)) * 4]


def pair() -> tuple[Handshake, Handshake]:
    """The client and server handshakes of the vectors (fresh, not started)."""
    client = Handshake(
        role=Role.CLIENT,
        signing_seed=SEEDS["client_identity_seed"],
        ephemeral_seed=SEEDS["client_ephemeral_seed"],
    )
    server = Handshake(
        role=Role.SERVER,
        signing_seed=SEEDS["server_identity_seed"],
        ephemeral_seed=SEEDS["server_ephemeral_seed"],
    )
    return client, server


def vectors() -> dict[str, Any]:
    client, server = pair()
    client_hello = client.start()
    server_hello = server.receive_data(client_hello)
    client_finish = client.receive_data(server_hello)
    server.receive_data(client_finish)
    assert client.keys is not None
    assert server.keys is not None
    c2s = RecordWriter(client.keys.send_key)
    s2c = RecordWriter(server.keys.send_key)
    return {
        "protocol_version": PROTOCOL_VERSION,
        **{name: seed.hex() for name, seed in SEEDS.items()},
        "client_public_key": client.public_key.hex(),
        "server_public_key": server.public_key.hex(),
        "client_hello": client_hello.hex(),
        "server_hello": server_hello.hex(),
        "client_finish": client_finish.hex(),
        "transcript_hash": client.keys.transcript_hash.hex(),
        "client_to_server_key": client.keys.send_key.hex(),
        "server_to_client_key": server.keys.send_key.hex(),
        "client_records": [
            {"plaintext": p.hex(), "record": bytes(c2s.seal([p])).hex()} for p in RECORD_PLAINTEXTS
        ],
        "server_records": [
            {"plaintext": p.hex(), "record": bytes(s2c.seal([p])).hex()} for p in RECORD_PLAINTEXTS
        ],
    }


if __name__ == "__main__":
    VECTORS.write_text(json.dumps(vectors(), indent=1) + "\n", "utf-8")
