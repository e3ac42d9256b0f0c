"""The DHT's proof of a node id: a signed answer to a random challenge (pure, no I/O).

A node admits a contact to its routing table only after the contact signed our fresh nonce with
the Ed25519 key its node id is derived from, and the id matches that key *and* the address the
answer came from (core.node_id). Sending, waiting and caching live in p2pmega.net.kademlia_protocol.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from p2pmega.core import crypto
from p2pmega.core.ids import NODE_ID_BYTES
from p2pmega.core.node_id import matches
from p2pmega.errors import BadSignature, RemoteProtocolError

ID_PROOF_VERSION = 1
"""First element of an id_proof reply: [1, public_key, node_id, signature]."""
ID_PROOF_DOMAIN = b"p2pmega:dht:id-proof:v1"
"""Purpose tag of the signed message, so no other signature of the key can stand in for it."""
NONCE_BYTES = 32


@dataclass(frozen=True)
class ProvenId:
    """A node id proven by its key at an address."""

    node_id: bytes
    public_key: bytes


def id_proof_message(nonce: bytes, challenger_id: bytes, node_id: bytes) -> bytes:
    """The bytes a node signs: domain, nonce, the challenger's id (b"" for a read-only one), its own id.

    Every part but the challenger's id has a fixed length, so the concatenation is unambiguous.

    Raises:
        ValueError: a part has the wrong length.
    """
    if len(nonce) != NONCE_BYTES or len(node_id) != NODE_ID_BYTES:
        raise ValueError("nonce or node id of the wrong length")
    if len(challenger_id) not in (0, NODE_ID_BYTES):
        raise ValueError("a challenger id is 20 bytes, or empty for a read-only node")
    return ID_PROOF_DOMAIN + nonce + node_id + bytes([len(challenger_id)]) + challenger_id


def make_id_proof(seed: bytes, node_id: bytes, nonce: bytes, challenger_id: bytes) -> list[object]:
    """The id_proof reply of the node with signing ``seed`` and id ``node_id``.

    Raises:
        ValueError: ``seed``, ``nonce`` or an id has the wrong length (a caller bug, or a
            malformed challenge the caller should drop).
    """
    signature = crypto.sign(seed, id_proof_message(nonce, challenger_id, node_id))
    return [ID_PROOF_VERSION, _public_key_of(seed), node_id, signature]


# A node answers every challenge with the same key: deriving it again each time doubled a proof's cost.
_public_key_of = functools.lru_cache(maxsize=8)(crypto.public_key_of)


def check_id_proof(raw: object, *, nonce: bytes, challenger_id: bytes, ip: str) -> ProvenId:
    """Check an id_proof reply received from ``ip`` to our challenge ``nonce``.

    Args:
        raw: the decoded reply.
        nonce: the nonce we sent.
        challenger_id: our node id as sent in the challenge (b"" for a read-only node).
        ip: the address the reply came from (the one we sent the challenge to).

    Returns:
        The proven id and key.

    Raises:
        RemoteProtocolError: malformed, the signature does not verify, or the id is not that
            of the key at ``ip``.
    """
    if not (isinstance(raw, list) and len(raw) == 4 and raw[0] == ID_PROOF_VERSION):
        raise RemoteProtocolError("id_proof reply is not [1, key, node_id, signature]")
    _, public_key, node_id, signature = raw
    if not all(isinstance(x, bytes) for x in (public_key, node_id, signature)):
        raise RemoteProtocolError("id_proof reply fields are not bytes")
    if len(node_id) != NODE_ID_BYTES:
        raise RemoteProtocolError("id_proof reply has a node id of the wrong length")
    try:
        crypto.verify_signature(
            public_key, id_proof_message(nonce, challenger_id, node_id), signature
        )
    except BadSignature as exc:
        raise RemoteProtocolError("id_proof signature does not verify") from exc
    if not matches(node_id, public_key, ip):
        raise RemoteProtocolError("node id is not the id of that key at that address")
    return ProvenId(node_id, public_key)
