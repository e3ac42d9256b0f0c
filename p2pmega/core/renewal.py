"""Renewal credentials: who may extend a chunk's lease, checkable by a holder that cannot read the file.

Pure values and functions, no I/O and no clock. The scheme (docs/STORAGE.md, "Renewal"): the sharer and every
keeper derive one Ed25519 key pair per file from its verify key, the secret of the keep-alive link. A store
carries the public half, the holder keeps it with the chunk's lease, and a signed renewal must carry a signature
by the secret half over the holder's node id, the new expiry and the chunk ids, so it cannot be replayed at
another holder nor stretched past the expiry its signer chose.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from p2pmega.core import crypto
from p2pmega.core.chunking import CHUNK_ID_BYTES, PURPOSE_VERIFY
from p2pmega.core.ids import NODE_ID_BYTES
from p2pmega.core.magnet import KeepCap, ReadCap
from p2pmega.errors import BadSignature

# The derivation tag of the per-file renewal seed, under the verify key (core.crypto.derive_key).
PURPOSE_RENEW: Final = b"p2pmega:renew:v1"
# What a renewal signature signs starts with this, so no other signature of p2pmega can pass for one.
RENEW_DOMAIN: Final = b"p2pmega:renew-request:v1"
RENEW_KEY_BYTES: Final = crypto.PUBLIC_KEY_BYTES
RENEW_SIGNATURE_BYTES: Final = crypto.SIGNATURE_BYTES
# Expiries are whole Unix seconds in a u64 (a u32 ends in 2106).
MAX_EXPIRY_S: Final = 2**64 - 1
_HEAD: Final = struct.Struct(">QH")  # expiry, id count


@dataclass(frozen=True, repr=False)
class RenewCredential:
    """The renewal key pair of one file: ``public_key`` goes to holders, ``seed`` never leaves its owner."""

    seed: bytes = field(repr=False)
    public_key: bytes

    @classmethod
    def from_verify_key(cls, verify_key: bytes) -> RenewCredential:
        """Derive the file's renewal key pair from its verify key (one-way: it gives back neither key).

        Args:
            verify_key: V, ``crypto.KEY_BYTES`` long (a keep-alive link's ``x.vk``).

        Returns:
            The credential.

        Raises:
            ValueError: ``verify_key`` has the wrong length (a caller bug).
        """
        seed = crypto.derive_key(verify_key, PURPOSE_RENEW)
        return cls(seed, crypto.public_key_of(seed))

    @classmethod
    def from_file_key(cls, file_key: bytes) -> RenewCredential:
        """The renewal key pair of the file whose key (a read link's ``x.key``) is ``file_key``.

        Raises:
            ValueError: ``file_key`` has the wrong length (a caller bug).
        """
        return cls.from_verify_key(crypto.derive_key(file_key, PURPOSE_VERIFY))

    @classmethod
    def of(cls, cap: ReadCap | KeepCap) -> RenewCredential:
        """The renewal credential of the file a read or keep-alive link names (the same for both)."""
        if isinstance(cap, ReadCap):
            return cls.from_file_key(cap.key)
        return cls.from_verify_key(cap.verify_key)

    def sign(self, holder_id: bytes, expiry_s: int, ids: Sequence[bytes]) -> bytes:
        """Sign a renewal of ``ids`` at the holder ``holder_id`` until ``expiry_s``.

        Raises:
            ValueError: A field has the wrong size (a caller bug).
        """
        return crypto.sign(self.seed, renewal_message(holder_id, expiry_s, ids))


def renewal_message(holder_id: bytes, expiry_s: int, ids: Sequence[bytes]) -> bytes:
    """The bytes a renewal signature covers.

    Returns:
        ``RENEW_DOMAIN || holder id (20) || expiry_s (u64) || count (u16) || ids (32 each)``.

    Raises:
        ValueError: A field has the wrong size or count.
    """
    if len(holder_id) != NODE_ID_BYTES:
        raise ValueError(f"holder id must be {NODE_ID_BYTES} bytes, got {len(holder_id)}")
    if not 0 <= expiry_s <= MAX_EXPIRY_S:
        raise ValueError(f"expiry {expiry_s} is not a u64 of seconds")
    if not 1 <= len(ids) <= 0xFFFF or any(len(c) != CHUNK_ID_BYTES for c in ids):
        raise ValueError("a renewal names 1 to 65535 chunk ids of 32 bytes")
    return b"".join((RENEW_DOMAIN, holder_id, _HEAD.pack(expiry_s, len(ids)), *ids))


def check_renewal(
    public_key: bytes, signature: bytes, holder_id: bytes, expiry_s: int, ids: Sequence[bytes]
) -> None:
    """Check that ``public_key``'s owner renewed ``ids`` at ``holder_id`` until ``expiry_s``.

    Args:
        public_key: The renewal key the request names (untrusted).
        signature: Its signature (untrusted, any length).
        holder_id: This holder's own node id (never the request's word for it).
        expiry_s: The expiry the request names.
        ids: The chunk ids the request names, in its order.

    Raises:
        BadSignature: The signature does not verify for exactly these fields.
    """
    try:
        message = renewal_message(holder_id, expiry_s, ids)
    except ValueError as exc:
        raise BadSignature(f"renewal is malformed ({exc}); refuse it") from exc
    try:
        crypto.verify_signature(public_key, message, signature)
    except BadSignature as exc:
        raise BadSignature(
            "renewal signature does not verify for this holder, expiry and chunks; refuse it"
        ) from exc
