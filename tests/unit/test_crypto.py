"""core.crypto: upstream vectors, round trips and tamper cases for seal/open and signatures."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmega.core import crypto
from p2pmega.errors import BadSignature, DecryptionFailed, IntegrityError

UPSTREAM = json.loads((Path(__file__).parent.parent / "vectors" / "upstream.json").read_text())


def flip_byte(data: bytes, index: int) -> bytes:
    return data[:index] + bytes((data[index] ^ 0x01,)) + data[index + 1 :]


@pytest.mark.parametrize("vector", UPSTREAM["aegis256"], ids=lambda v: v["source"][-22:])
def test_aegis256_upstream_vectors_match_seal(vector):
    key, nonce = bytes.fromhex(vector["key_hex"]), bytes.fromhex(vector["nonce_hex"])
    aad, plaintext = bytes.fromhex(vector["aad_hex"]), bytes.fromhex(vector["plaintext_hex"])
    expected = nonce + bytes.fromhex(vector["ciphertext_hex"]) + bytes.fromhex(vector["tag_hex"])
    assert crypto._seal_with_nonce(key, nonce, plaintext, aad, b"") == expected
    assert crypto.open_sealed(key, expected, aad) == plaintext
    with pytest.raises(DecryptionFailed):
        crypto.open_sealed(key, flip_byte(expected, len(expected) - 1), aad)


@pytest.mark.parametrize("vector", UPSTREAM["xchacha20poly1305_ietf"])
def test_xchacha_upstream_vector_opens_format_v1_boxes(vector):
    key, nonce = bytes.fromhex(vector["key_hex"]), bytes.fromhex(vector["nonce_hex"])
    aad = bytes.fromhex(vector["aad_hex"])
    plaintext = vector["plaintext_ascii"].encode("ascii")
    sealed = nonce + bytes.fromhex(vector["ciphertext_hex"]) + bytes.fromhex(vector["tag_hex"])
    assert crypto.open_sealed_xchacha(key, b"hd" + sealed, aad, offset=2) == plaintext
    with pytest.raises(DecryptionFailed):
        crypto.open_sealed_xchacha(key, flip_byte(sealed, len(sealed) - 1), aad)
    with pytest.raises(DecryptionFailed, match="39 bytes"):
        crypto.open_sealed_xchacha(key, sealed[:39], aad)
    # The two ciphers never open each other's boxes.
    with pytest.raises(DecryptionFailed):
        crypto.open_sealed(key, sealed, aad)


@pytest.mark.parametrize("vector", UPSTREAM["ed25519"])
def test_ed25519_upstream_vector(vector):
    seed = bytes.fromhex(vector["secret_seed_hex"])
    message = bytes.fromhex(vector["message_hex"])
    assert crypto.public_key_of(seed).hex() == vector["public_hex"]
    assert crypto.sign(seed, message).hex() == vector["signature_hex"]
    crypto.verify_signature(
        bytes.fromhex(vector["public_hex"]), message, bytes.fromhex(vector["signature_hex"])
    )


@pytest.mark.parametrize("vector", UPSTREAM["sha256"])
def test_chunk_hash_is_sha256(vector):
    digest = crypto.hash_bytes(memoryview(vector["message_ascii"].encode("ascii")))
    assert digest.hex() == vector["digest_hex"]


@settings(max_examples=30)
@given(plaintext=st.binary(max_size=300), aad=st.binary(max_size=40))
def test_seal_open_round_trip(plaintext, aad):
    key = crypto.new_key()
    sealed = crypto.seal(key, plaintext, aad, header=b"hd")
    assert len(sealed) == 2 + crypto.SEAL_OVERHEAD_BYTES + len(plaintext)
    assert sealed[:2] == b"hd"
    assert crypto.open_sealed(key, sealed, aad, offset=2) == plaintext


def test_nonces_are_random():
    key = crypto.new_key()
    nonce = slice(0, crypto.NONCE_BYTES)
    assert crypto.seal(key, b"same", b"")[nonce] != crypto.seal(key, b"same", b"")[nonce]


@pytest.mark.parametrize(
    "index",
    [0, 31, 32, 32 + 5, 32 + 9, -32, -1],
    ids=["nonce0", "nonce31", "ct0", "ct5", "ct-last", "tag0", "tag31"],
)
def test_every_region_is_authenticated(index):
    key = crypto.new_key()
    sealed = crypto.seal(key, b"ten bytes!", b"aad")
    with pytest.raises(IntegrityError):
        crypto.open_sealed(key, flip_byte(sealed, index % len(sealed)), b"aad")


def test_wrong_key_aad_or_truncation_fail():
    key = crypto.new_key()
    sealed = crypto.seal(key, b"payload", b"aad")
    with pytest.raises(DecryptionFailed):
        crypto.open_sealed(crypto.new_key(), sealed, b"aad")
    with pytest.raises(DecryptionFailed):
        crypto.open_sealed(key, sealed, b"aae")
    with pytest.raises(DecryptionFailed, match="63 bytes"):
        crypto.open_sealed(key, sealed[:63], b"aad")


def test_derive_key_separates_purposes():
    root = bytes(range(32))
    chunk = crypto.derive_key(root, b"p2pmega:chunk:v1")
    assert len(chunk) == 32
    assert chunk == crypto.derive_key(root, b"p2pmega:chunk:v1")
    assert chunk != crypto.derive_key(root, b"p2pmega:meta:v1")
    assert chunk != crypto.derive_key(bytes(32), b"p2pmega:chunk:v1")
    with pytest.raises(ValueError, match="31"):
        crypto.derive_key(root[:31], b"p2pmega:chunk:v1")


def test_signatures_round_trip_and_tamper():
    seed = crypto.new_signing_seed()
    public = crypto.public_key_of(seed)
    signature = crypto.sign(seed, b"record")
    crypto.verify_signature(public, b"record", signature)
    with pytest.raises(BadSignature):
        crypto.verify_signature(public, b"recorD", signature)
    with pytest.raises(BadSignature):
        crypto.verify_signature(public, b"record", flip_byte(signature, 10))
    with pytest.raises(BadSignature, match="31 bytes"):
        crypto.verify_signature(public[:31], b"record", signature)
    with pytest.raises(BadSignature):
        crypto.verify_signature(
            crypto.public_key_of(crypto.new_signing_seed()), b"record", signature
        )


def test_node_id_is_160_bit_and_stable():
    public = crypto.public_key_of(bytes(32))
    node_id = crypto.node_id_of(public)
    assert len(node_id) == 20
    assert node_id == crypto.node_id_of(public)
    assert node_id != crypto.node_id_of(crypto.public_key_of(bytes(31) + b"\x01"))
    # Personalised: not the plain BLAKE2b-160 of the key, so no other use can collide with it.
    assert node_id != hashlib.blake2b(public, digest_size=20).digest()


@settings(max_examples=30)
@given(plaintext=st.binary(max_size=300), aad=st.binary(max_size=40))
def test_open_sealed_into_matches_open_sealed(plaintext, aad):
    key = crypto.new_key()
    sealed = b"hd" + crypto.seal(key, plaintext, aad)
    out = bytearray(b"\xee" * (len(plaintext) + 5))
    assert crypto.open_sealed_into(key, sealed, aad, out, offset=2) == len(plaintext)
    assert out[: len(plaintext)] == crypto.open_sealed(key, sealed, aad, offset=2)


def test_open_sealed_into_leaves_no_unauthenticated_plaintext():
    key = crypto.new_key()
    secret = b"attack at dawn, bring snacks" * 10
    sealed = crypto.seal(key, secret, b"aad")
    out = bytearray(len(secret))
    with pytest.raises(DecryptionFailed):
        crypto.open_sealed_into(key, flip_byte(sealed, len(sealed) - 1), b"aad", out)
    assert out == bytes(len(secret))  # libsodium wiped what it had decrypted
    with pytest.raises(DecryptionFailed, match="truncated"):
        crypto.open_sealed_into(key, sealed[:63], b"aad", out)
    with pytest.raises(ValueError, match="needs"):
        crypto.open_sealed_into(key, sealed, b"aad", bytearray(len(secret) - 1))
