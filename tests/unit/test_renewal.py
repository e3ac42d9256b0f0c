"""core.renewal: the per-file renewal credential, its golden vectors, and every tampered field refused."""

from __future__ import annotations

import hashlib
import struct

import pytest

from p2pmega.core import crypto
from p2pmega.core.chunking import PURPOSE_VERIFY, ChunkId
from p2pmega.core.magnet import ReadCap
from p2pmega.core.renewal import (
    PURPOSE_RENEW,
    RENEW_DOMAIN,
    RenewCredential,
    check_renewal,
    renewal_message,
)
from p2pmega.errors import BadSignature

# Golden values: a diff means the derivation or the signed layout changed, which strands every renewal key
# holders keep; bump the purpose tags (and docs/STORAGE.md) instead. Ed25519 signatures are deterministic.
VERIFY_KEY = bytes(range(32))
HOLDER_ID = bytes(range(100, 120))
EXPIRY_S = 1_800_000_000
IDS = [bytes([1]) * 32, bytes([2]) * 32]
SEED_HEX = "ebdfa3f4ed5b863b5f5cdce601fc1d16de5d884956bea0715efb7971bca6175c"
PUBLIC_HEX = "6753136a488b585f0dc356dbb1007ff27708266153b95a21962734e04038e491"
SIGNATURE_HEX = (
    "2718642fb9012d0660b5b8901310f3fd9840938ff6f4c31ed9bd880c9eb74e20"
    "2a33b780e7386b5d978166e8094fdc2c08037b12c33ef6871a3fa583f8dddd08"
)


def test_golden_credential_and_signature() -> None:
    cred = RenewCredential.from_verify_key(VERIFY_KEY)
    # The seed is BLAKE2b-256 keyed with the verify key over the purpose tag (core.crypto.derive_key).
    assert cred.seed == hashlib.blake2b(PURPOSE_RENEW, key=VERIFY_KEY, digest_size=32).digest()
    assert cred.seed.hex() == SEED_HEX
    assert cred.public_key.hex() == PUBLIC_HEX
    assert cred.sign(HOLDER_ID, EXPIRY_S, IDS).hex() == SIGNATURE_HEX


def test_the_signed_message_is_the_documented_layout() -> None:
    built = RENEW_DOMAIN + HOLDER_ID + struct.pack(">QH", EXPIRY_S, 2) + b"".join(IDS)
    assert renewal_message(HOLDER_ID, EXPIRY_S, IDS) == built
    crypto.verify_signature(bytes.fromhex(PUBLIC_HEX), built, bytes.fromhex(SIGNATURE_HEX))


def test_read_link_and_keep_link_give_the_same_credential() -> None:
    read = ReadCap(ChunkId(bytes(32)), bytes(range(32, 64)))
    keep = read.keep_cap()
    assert RenewCredential.of(read) == RenewCredential.of(keep)
    assert RenewCredential.of(read) == RenewCredential.from_file_key(read.key)
    # What holders see (the public key) is neither the verify key nor the file key.
    assert RenewCredential.of(keep).public_key not in (keep.verify_key, read.key)
    assert RenewCredential.of(keep).seed != crypto.derive_key(read.key, PURPOSE_VERIFY)


def test_a_genuine_renewal_verifies() -> None:
    cred = RenewCredential.from_verify_key(VERIFY_KEY)
    check_renewal(cred.public_key, cred.sign(HOLDER_ID, EXPIRY_S, IDS), HOLDER_ID, EXPIRY_S, IDS)


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


@pytest.mark.parametrize(
    "tamper",
    [
        "other holder",
        "later expiry",
        "earlier expiry",
        "another id",
        "ids reordered",
        "id dropped",
        "id added",
        "other key",
        "signature byte 0",
        "signature byte 63",
        "short signature",
    ],
)
def test_every_tampered_field_is_refused(tamper: str) -> None:
    cred = RenewCredential.from_verify_key(VERIFY_KEY)
    signature = cred.sign(HOLDER_ID, EXPIRY_S, IDS)
    key, holder, expiry, ids = cred.public_key, HOLDER_ID, EXPIRY_S, list(IDS)
    if tamper == "other holder":
        holder = _flip(holder, 19)
    elif tamper == "later expiry":
        expiry += 1
    elif tamper == "earlier expiry":
        expiry -= 1
    elif tamper == "another id":
        ids[1] = _flip(ids[1], 0)
    elif tamper == "ids reordered":
        ids.reverse()
    elif tamper == "id dropped":
        ids = ids[:1]
    elif tamper == "id added":
        ids.append(bytes(32))
    elif tamper == "other key":
        key = RenewCredential.from_verify_key(_flip(VERIFY_KEY, 0)).public_key
    elif tamper == "signature byte 0":
        signature = _flip(signature, 0)
    elif tamper == "signature byte 63":
        signature = _flip(signature, 63)
    else:
        signature = signature[:63]
    with pytest.raises(BadSignature):
        check_renewal(key, signature, holder, expiry, ids)


@pytest.mark.parametrize(
    ("holder", "expiry", "ids"),
    [
        (bytes(19), EXPIRY_S, IDS),
        (HOLDER_ID, -1, IDS),
        (HOLDER_ID, 2**64, IDS),
        (HOLDER_ID, EXPIRY_S, []),
        (HOLDER_ID, EXPIRY_S, [bytes(31)]),
    ],
)
def test_malformed_fields_are_refused_not_crashed(
    holder: bytes, expiry: int, ids: list[bytes]
) -> None:
    cred = RenewCredential.from_verify_key(VERIFY_KEY)
    with pytest.raises(BadSignature, match="malformed"):
        check_renewal(cred.public_key, bytes(64), holder, expiry, ids)
    with pytest.raises(ValueError, match=r"holder id|expiry|chunk ids"):
        cred.sign(holder, expiry, ids)
