"""Every cryptographic primitive p2pmega uses, in one reviewable place; the only importer of nacl.

Callers see plain ``bytes`` only. Nothing here knows about chunks, manifests or links.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import nacl.bindings
import nacl.exceptions
import nacl.signing
import nacl.utils

# PyNaCl's own cffi handle on libsodium, for the one call its public binding makes slow: opening into a
# buffer the caller owns (see open_sealed_into). The public `nacl.bindings` is used for everything else.
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib

from p2pmega.core.ids import NODE_ID_BYTES
from p2pmega.errors import BadSignature, DecryptionFailed

KEY_BYTES = 32
# AEGIS-256 (draft-irtf-cfrg-aegis-aead): 256-bit nonces are safe to draw at random for any number of
# seals under one key, and the 256-bit tag is the draft's recommended one. Chosen over XChaCha20-Poly1305
# because it is 2.5x faster here through the AES instructions (docs/FORMAT.md section 1.2).
NONCE_BYTES = 32
TAG_BYTES = 32
SEAL_OVERHEAD_BYTES = NONCE_BYTES + TAG_BYTES
# Format version 1 sealed with XChaCha20-Poly1305-IETF (192-bit random nonces, draft-irtf-cfrg-xchacha
# section 3.1); p2pmega still opens it but never seals with it.
XCHACHA_NONCE_BYTES = 24
XCHACHA_TAG_BYTES = 16
XCHACHA_OVERHEAD_BYTES = XCHACHA_NONCE_BYTES + XCHACHA_TAG_BYTES
HASH_BYTES = 32
SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

# BLAKE2b's personalisation field holds at most 16 bytes; this one keeps node ids apart from
# every other BLAKE2b use in p2pmega.
_NODE_ID_PERSON = b"p2pmega:node:v1"


def _random_bytes(count: int) -> bytes:
    # One indirection so the golden-vector generator (tests/vectors/make_vectors.py) can make
    # nonces and keys deterministic; production code never replaces it.
    return nacl.utils.random(count)


def new_key() -> bytes:
    """A fresh random 256-bit key from the OS CSPRNG.

    Returns:
        ``KEY_BYTES`` random bytes.
    """
    return _random_bytes(KEY_BYTES)


def derive_key(root: bytes, purpose: bytes) -> bytes:
    """Derive an independent sub-key for one purpose (BLAKE2b-256 keyed with ``root``).

    Args:
        root: A ``KEY_BYTES`` secret.
        purpose: A tag unique to the use, such as ``b"p2pmega:chunk:v1"``.

    Returns:
        A 32-byte key; different purposes give unrelated keys.

    Raises:
        ValueError: ``root`` is not ``KEY_BYTES`` long (a caller bug).
    """
    if len(root) != KEY_BYTES:
        raise ValueError(f"root key must be {KEY_BYTES} bytes, got {len(root)}")
    return hashlib.blake2b(purpose, key=root, digest_size=KEY_BYTES).digest()


def seal(key: bytes, plaintext: bytes, aad: bytes, *, header: bytes = b"") -> bytes:
    """Encrypt and authenticate with AEGIS-256 under a random nonce.

    Args:
        key: A ``KEY_BYTES`` key.
        plaintext: The bytes to hide.
        aad: Associated data: authenticated, not stored.
        header: Bytes to put in front of the result (not authenticated unless also in ``aad``);
            passing it here saves the caller one copy of a large buffer.

    Returns:
        ``header || nonce(32) || ciphertext || tag(32)``.
    """
    return _seal_with_nonce(key, _random_bytes(NONCE_BYTES), plaintext, aad, header)


def _seal_with_nonce(
    key: bytes, nonce: bytes, plaintext: bytes, aad: bytes, header: bytes
) -> bytes:
    ciphertext = nacl.bindings.crypto_aead_aegis256_encrypt(plaintext, aad, nonce, key)
    return b"".join((header, nonce, ciphertext))


def open_sealed(key: bytes, sealed: bytes | memoryview, aad: bytes, *, offset: int = 0) -> bytes:
    """Check and decrypt what `seal` produced.

    Args:
        key: The key it was sealed with.
        sealed: ``nonce || ciphertext || tag``, after ``offset`` bytes of header.
        aad: The associated data it was sealed with.
        offset: Header bytes to skip; saves the caller a copy of a large buffer.

    Returns:
        The plaintext.

    Raises:
        DecryptionFailed: Too short, wrong key, wrong associated data or any modified byte.
    """
    return _open(
        nacl.bindings.crypto_aead_aegis256_decrypt, NONCE_BYTES, TAG_BYTES, key, sealed, aad, offset
    )


def open_sealed_into(
    key: bytes,
    sealed: bytes | memoryview,
    aad: bytes,
    out: bytearray | memoryview,
    *,
    offset: int = 0,
) -> int:
    """`open_sealed` writing the plaintext into ``out`` instead of returning a new buffer.

    For fetch, which decrypts every chunk into a buffer it reuses: the public binding allocates,
    zero-fills and copies 1 MiB per call (1.7 ms per MiB here, 0.17 ms this way).

    Args:
        key, sealed, aad, offset: As for `open_sealed`.
        out: A writable buffer of at least the plaintext's length; on failure libsodium zeroes what
            it had written, so no unauthenticated byte is left in it.

    Returns:
        The plaintext length; the plaintext is ``out[:length]``.

    Raises:
        DecryptionFailed: As for `open_sealed`.
        ValueError: ``out`` is too small (a caller bug).
    """
    _check_length(sealed, offset, SEAL_OVERHEAD_BYTES)
    length = len(sealed) - offset - SEAL_OVERHEAD_BYTES
    if len(out) < length:
        raise ValueError(f"output buffer holds {len(out)} bytes, the plaintext needs {length}")
    if len(key) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes, got {len(key)}")
    source = _ffi.from_buffer(sealed)
    written = _ffi.new("unsigned long long *")
    status = _lib.crypto_aead_aegis256_decrypt(
        _ffi.from_buffer(out, require_writable=True),
        written,
        _ffi.NULL,
        source + offset + NONCE_BYTES,
        length + TAG_BYTES,
        aad,
        len(aad),
        source + offset,
        key,
    )
    if status != 0:
        raise DecryptionFailed(_NOT_AUTHENTIC)
    return int(written[0])


def open_sealed_xchacha(
    key: bytes, sealed: bytes | memoryview, aad: bytes, *, offset: int = 0
) -> bytes:
    """Check and decrypt a box of format version 1: ``nonce(24) || ciphertext || tag(16)``, XChaCha20-Poly1305.

    Read-only: nothing seals this way any more. Arguments, result and errors as for `open_sealed`.
    """
    return _open(
        nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt,
        XCHACHA_NONCE_BYTES,
        XCHACHA_TAG_BYTES,
        key,
        sealed,
        aad,
        offset,
    )


def _open(
    primitive: Callable[[bytes, bytes | None, bytes, bytes], bytes],
    nonce_bytes: int,
    tag_bytes: int,
    key: bytes,
    sealed: bytes | memoryview,
    aad: bytes,
    offset: int,
) -> bytes:
    _check_length(sealed, offset, nonce_bytes + tag_bytes)
    # PyNaCl's bindings take bytes only: bytes() of a bytes slice is that slice, no second copy.
    nonce = bytes(sealed[offset : offset + nonce_bytes])
    try:
        return primitive(bytes(sealed[offset + nonce_bytes :]), aad, nonce, key)
    except nacl.exceptions.CryptoError as exc:
        raise DecryptionFailed(_NOT_AUTHENTIC) from exc


_NOT_AUTHENTIC = (
    "data does not authenticate under this key; it was altered, moved or the key is wrong"
)


def _check_length(sealed: bytes | memoryview, offset: int, overhead: int) -> None:
    if len(sealed) - offset < overhead:
        raise DecryptionFailed(
            f"sealed data is {len(sealed) - offset} bytes, shorter than nonce and tag; "
            "it is truncated"
        )


def hash_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """The chunk-id hash: SHA-256 (measured faster than BLAKE2b here; see docs/FORMAT.md).

    Args:
        data: Any bytes-like object; not copied.

    Returns:
        ``HASH_BYTES`` digest.
    """
    return hashlib.sha256(data).digest()


def _check_seed(seed: bytes) -> None:
    if len(seed) != SEED_BYTES:
        raise ValueError(f"signing seed must be {SEED_BYTES} bytes, got {len(seed)}")


def new_signing_seed() -> bytes:
    """A fresh Ed25519 seed (the node's secret).

    Returns:
        ``SEED_BYTES`` random bytes.
    """
    return _random_bytes(SEED_BYTES)


def public_key_of(seed: bytes) -> bytes:
    """The Ed25519 public key of a seed.

    Args:
        seed: ``SEED_BYTES`` secret.

    Returns:
        ``PUBLIC_KEY_BYTES`` public key.

    Raises:
        ValueError: ``seed`` has the wrong length (a caller bug).
    """
    _check_seed(seed)
    return bytes(nacl.signing.SigningKey(seed).verify_key)


def sign(seed: bytes, msg: bytes) -> bytes:
    """Ed25519 detached signature.

    Args:
        seed: ``SEED_BYTES`` secret.
        msg: The message; callers prefix it with their own purpose tag.

    Returns:
        ``SIGNATURE_BYTES`` signature.

    Raises:
        ValueError: ``seed`` has the wrong length (a caller bug).
    """
    _check_seed(seed)
    return nacl.signing.SigningKey(seed).sign(msg).signature


def verify_signature(public: bytes, msg: bytes, sig: bytes) -> None:
    """Check an Ed25519 detached signature; untrusted input of any length is fine.

    Args:
        public: Signer's public key.
        msg: The signed message.
        sig: The signature.

    Raises:
        BadSignature: Wrong lengths, invalid key or the signature does not match.
    """
    if len(public) != PUBLIC_KEY_BYTES or len(sig) != SIGNATURE_BYTES:
        raise BadSignature(
            f"public key is {len(public)} bytes and signature {len(sig)}; "
            f"expected {PUBLIC_KEY_BYTES} and {SIGNATURE_BYTES}, drop the record"
        )
    try:
        nacl.signing.VerifyKey(public).verify(msg, sig)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError) as exc:
        raise BadSignature("signature does not verify; drop the record") from exc


def node_id_of(public: bytes) -> bytes:
    """The 160-bit DHT node id of a public key (personalised BLAKE2b).

    Args:
        public: Ed25519 public key.

    Returns:
        ``NODE_ID_BYTES`` id.
    """
    return hashlib.blake2b(public, digest_size=NODE_ID_BYTES, person=_NODE_ID_PERSON).digest()


# -- the transfer channel (core/wire/handshake.py): X25519 key exchange, counter-nonce records ------

KX_SEED_BYTES = 32
KX_PUBLIC_KEY_BYTES = 32
RECORD_TAG_BYTES = TAG_BYTES


def kx_keypair(seed: bytes) -> tuple[bytes, bytes]:
    """An X25519 key pair made from ``seed`` (libsodium crypto_kx_seed_keypair).

    The handshake takes its ephemeral seed as a parameter (so vectors can fix it); production
    code passes `random_bytes(KX_SEED_BYTES)` for every connection.

    Args:
        seed: ``KX_SEED_BYTES`` secret bytes.

    Returns:
        ``(public_key, secret_key)``, 32 bytes each.

    Raises:
        ValueError: ``seed`` has the wrong length (a caller bug).
    """
    if len(seed) != KX_SEED_BYTES:
        raise ValueError(f"key exchange seed must be {KX_SEED_BYTES} bytes, got {len(seed)}")
    public, secret = nacl.bindings.crypto_kx_seed_keypair(seed)
    return bytes(public), bytes(secret)


def kx_session_keys(
    *, client: bool, public: bytes, secret: bytes, peer_public: bytes
) -> tuple[bytes, bytes]:
    """The two session keys of one X25519 exchange (libsodium crypto_kx).

    crypto_kx hashes the shared point with both public keys, client's first:
    ``rx || tx = BLAKE2b-512(q || client_pk || server_pk)`` (the server's are swapped), so each
    direction has its own key and both ephemeral keys are bound into both.

    Args:
        client: True on the side that opened the connection.
        public: Our ephemeral public key.
        secret: Our ephemeral secret key.
        peer_public: The peer's ephemeral public key (untrusted).

    Returns:
        ``(receive_key, send_key)``, 32 bytes each.

    Raises:
        DecryptionFailed: ``peer_public`` is malformed or a low-order point (libsodium refuses an
            all-zero shared secret), so no secret key can come out of it.
    """
    if len(peer_public) != KX_PUBLIC_KEY_BYTES:
        raise DecryptionFailed(f"peer key exchange key is {len(peer_public)} bytes, not 32")
    exchange = (
        nacl.bindings.crypto_kx_client_session_keys
        if client
        else nacl.bindings.crypto_kx_server_session_keys
    )
    try:
        receive, send = exchange(public, secret, peer_public)
    except nacl.exceptions.CryptoError as exc:
        raise DecryptionFailed("peer key exchange key is a weak point; refuse the peer") from exc
    return bytes(receive), bytes(send)


def random_bytes(count: int) -> bytes:
    """``count`` bytes from the OS CSPRNG (ephemeral key seeds).

    Returns:
        ``count`` random bytes.
    """
    return _random_bytes(count)


def _record_nonce(counter: int) -> bytes:
    # AEGIS-256 takes a 256-bit nonce; a per-direction counter never repeats under one key, which
    # is all an AEAD nonce needs (as Noise's CipherState: n is a 64-bit counter, section 5.1).
    if not 0 <= counter < 2**64:
        raise ValueError("record counter out of range: rekey by reconnecting")
    return counter.to_bytes(KEY_BYTES, "little")


def seal_record_into(
    key: bytes,
    counter: int,
    plaintext: bytes | bytearray | memoryview,
    aad: bytes | bytearray | memoryview,
    out: bytearray | memoryview,
) -> int:
    """AEGIS-256 under the nonce ``counter``, written into ``out`` (no allocation).

    Args:
        key: A ``KEY_BYTES`` key, one per direction of one connection.
        counter: The record's number in its direction; never reused under ``key``.
        plaintext: The bytes to hide; not modified.
        aad: Associated data (the record's length prefix).
        out: Room for ``len(plaintext) + RECORD_TAG_BYTES`` bytes.

    Returns:
        Bytes written: ``ciphertext || tag``.

    Raises:
        ValueError: ``out`` is too small, ``key`` has the wrong length or ``counter`` is out of
            range (caller bugs).
    """
    size = len(plaintext) + RECORD_TAG_BYTES
    if len(out) < size or len(key) != KEY_BYTES:
        raise ValueError("record output buffer too small or key of the wrong length")
    # libsodium takes NULL for the length it would write back: it is the size above, and
    # allocating a cffi cell per record is measurable at ~4 records per MiB each way.
    _lib.crypto_aead_aegis256_encrypt(
        _ffi.from_buffer(out, require_writable=True),
        _ffi.NULL,
        _ffi.from_buffer(plaintext),
        len(plaintext),
        _ffi.from_buffer(aad),
        len(aad),
        _ffi.NULL,
        _record_nonce(counter),
        key,
    )
    return size


def open_record_into(
    key: bytes,
    counter: int,
    sealed: bytes | bytearray | memoryview,
    aad: bytes | bytearray | memoryview,
    out: bytearray | memoryview,
) -> int:
    """Check and decrypt what `seal_record_into` wrote, into ``out``.

    Args:
        key: The key of the direction the record came from.
        counter: The record number expected next in that direction.
        sealed: ``ciphertext || tag``.
        aad: The associated data it was sealed with.
        out: Room for ``len(sealed) - RECORD_TAG_BYTES`` bytes; on failure libsodium zeroes what
            it wrote, so no unauthenticated byte is left in it.

    Returns:
        The plaintext length.

    Raises:
        DecryptionFailed: Too short, wrong key or counter (replayed, reordered, reflected or
            dropped record), or any modified byte.
        ValueError: ``out`` is too small or ``key`` has the wrong length (caller bugs).
    """
    if len(sealed) < RECORD_TAG_BYTES:
        raise DecryptionFailed("record shorter than its tag; it is truncated")
    size = len(sealed) - RECORD_TAG_BYTES
    if len(out) < size or len(key) != KEY_BYTES:
        raise ValueError("record output buffer too small or key of the wrong length")
    status = _lib.crypto_aead_aegis256_decrypt(
        _ffi.from_buffer(out, require_writable=True),
        _ffi.NULL,  # the plaintext length is ``size``, as for seal_record_into
        _ffi.NULL,
        _ffi.from_buffer(sealed),
        len(sealed),
        _ffi.from_buffer(aad),
        len(aad),
        _record_nonce(counter),
        key,
    )
    if status != 0:
        raise DecryptionFailed(_NOT_AUTHENTIC)
    return size


def transcript_hash(data: bytes | bytearray | memoryview) -> bytes:
    """BLAKE2b-256 of a handshake transcript (Noise's HASH, with BLAKE2b as in Noise_*_BLAKE2b).

    Returns:
        ``HASH_BYTES`` digest.
    """
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()
