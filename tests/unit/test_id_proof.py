"""core.id_proof: a node proves its DHT id by signing our nonce; tampering, another key or another address fail."""

from __future__ import annotations

from typing import Any

import pytest

from p2pmega.core import crypto
from p2pmega.core.id_proof import (
    ID_PROOF_DOMAIN,
    NONCE_BYTES,
    check_id_proof,
    id_proof_message,
    make_id_proof,
)
from p2pmega.core.node_id import node_id_for
from p2pmega.core.rate_limit import NetworkRateLimit
from p2pmega.errors import RemoteProtocolError

SEED = bytes(range(32))
IP = "127.3.4.1"
NODE_ID = node_id_for(crypto.public_key_of(SEED), IP)
NONCE = b"n" * NONCE_BYTES
CHALLENGER = b"c" * 20


def proof() -> list[Any]:
    return make_id_proof(SEED, NODE_ID, NONCE, CHALLENGER)


def test_a_true_proof_is_accepted_from_the_address_its_id_is_bound_to() -> None:
    proven = check_id_proof(proof(), nonce=NONCE, challenger_id=CHALLENGER, ip=IP)
    assert proven.node_id == NODE_ID
    assert proven.public_key == crypto.public_key_of(SEED)
    # Same /24: the id is bound to the network, not the host.
    assert check_id_proof(proof(), nonce=NONCE, challenger_id=CHALLENGER, ip="127.3.4.200")
    # A read-only challenger has no id.
    ro = make_id_proof(SEED, NODE_ID, NONCE, b"")
    assert check_id_proof(ro, nonce=NONCE, challenger_id=b"", ip=IP).node_id == NODE_ID


def test_the_signed_message_is_domain_nonce_id_and_challenger() -> None:
    message = id_proof_message(NONCE, CHALLENGER, NODE_ID)
    assert message == ID_PROOF_DOMAIN + NONCE + NODE_ID + bytes([20]) + CHALLENGER
    _, key, _, signature = proof()
    crypto.verify_signature(key, message, signature)


@pytest.mark.parametrize("field", [1, 2, 3])
@pytest.mark.parametrize("position", [0, 10, -1])
def test_a_flipped_byte_anywhere_fails(field: int, position: int) -> None:
    raw = proof()
    value = bytearray(raw[field])
    value[position] ^= 0x01
    raw[field] = bytes(value)
    with pytest.raises(RemoteProtocolError):
        check_id_proof(raw, nonce=NONCE, challenger_id=CHALLENGER, ip=IP)


def test_an_answer_to_another_nonce_or_challenger_fails() -> None:
    with pytest.raises(RemoteProtocolError, match="signature"):
        check_id_proof(proof(), nonce=b"m" * NONCE_BYTES, challenger_id=CHALLENGER, ip=IP)
    with pytest.raises(RemoteProtocolError, match="signature"):
        check_id_proof(proof(), nonce=NONCE, challenger_id=b"d" * 20, ip=IP)


def test_another_key_cannot_prove_the_id() -> None:
    # A true signature by another key over the same message: the id is not that key's.
    other = bytes(range(1, 33))
    raw = make_id_proof(other, NODE_ID, NONCE, CHALLENGER)
    with pytest.raises(RemoteProtocolError, match="not the id of that key"):
        check_id_proof(raw, nonce=NONCE, challenger_id=CHALLENGER, ip=IP)


def test_the_id_does_not_hold_from_another_network() -> None:
    # The right key, answering from another /24: one address cannot use ids of other networks.
    with pytest.raises(RemoteProtocolError, match="not the id of that key"):
        check_id_proof(proof(), nonce=NONCE, challenger_id=CHALLENGER, ip="127.3.5.1")
    with pytest.raises(RemoteProtocolError, match="not the id of that key"):
        check_id_proof(proof(), nonce=NONCE, challenger_id=CHALLENGER, ip="::1")


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        [2, b"k" * 32, NODE_ID, b"s" * 64],
        [1, b"k" * 32, NODE_ID],
        [1, "k" * 32, NODE_ID, b"s" * 64],
        [1, b"k" * 31, NODE_ID, b"s" * 64],
        [1, b"k" * 32, NODE_ID[:19], b"s" * 64],
        [1, b"k" * 32, NODE_ID, b"s" * 63],
    ],
)
def test_malformed_proofs_are_remote_protocol_errors(raw: object) -> None:
    with pytest.raises(RemoteProtocolError):
        check_id_proof(raw, nonce=NONCE, challenger_id=CHALLENGER, ip=IP)


def test_a_malformed_challenge_is_refused() -> None:
    with pytest.raises(ValueError, match="nonce"):
        make_id_proof(SEED, NODE_ID, b"short", CHALLENGER)
    with pytest.raises(ValueError, match="challenger"):
        make_id_proof(SEED, NODE_ID, NONCE, b"x" * 7)


def test_the_rate_limit_is_per_network_refills_and_stays_bounded() -> None:
    limit = NetworkRateLimit(rate_per_s=10, burst=20, max_networks=2)
    assert all(limit.allow("10.0.0.1", 1, now=0) for _ in range(20))
    assert not limit.allow("10.0.0.2", 1, now=0)  # same /24: same bucket
    assert limit.allow("10.0.1.1", 5, now=0)  # another /24 has its own
    assert limit.allow("10.0.0.1", 10, now=1.0)  # refilled at 10 per second
    assert not limit.allow("10.0.0.1", 1, now=1.0)
    assert limit.refused == 2
    limit.allow("10.0.2.1", 1, now=1.0)
    assert len(limit._buckets) == 2  # the least recently seen network was forgotten
