"""Throughput of the core (encrypt+id, verify+decrypt) beside the raw primitives, in one run.

Usage: python bench/core.py [--mib 256] [--chunk-mib 1]
Raw = AEGIS-256 seal + SHA-256 of the sealed bytes (and open + SHA-256) through the nacl binding
directly: the primitives of format v2. The core must reach at least 70% of raw. XChaCha20-Poly1305
(format v1) is measured beside it, since it is what v2 replaced.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections.abc import Callable

import nacl.bindings

from p2pmega.core.chunking import chunk_id_of
from p2pmega.core.manifest import FileEncoder
from p2pmega.core.manifest_walk import ManifestWalker, decrypt_chunk_into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--chunk-mib", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()
    results = [run(args.mib, args.chunk_mib) for _ in range(args.rounds)]
    mib, count, sha, blake, raw_enc, core_enc, raw_dec, core_dec, x_enc, x_dec = (
        min(column) for column in zip(*results, strict=True)
    )
    print(f"{mib:.0f} MiB in {count:.0f} chunks of {args.chunk_mib} MiB, best of {args.rounds}")
    print(f"sha256 alone              {mib / sha:8.1f} MiB/s")
    print(f"blake2b-256 alone         {mib / blake:8.1f} MiB/s")
    print(f"xchacha20poly1305 seal/open {mib / x_enc:6.1f} / {mib / x_dec:.1f} MiB/s (format v1)")
    print(f"raw aegis256 seal+sha256  {mib / raw_enc:8.1f} MiB/s")
    print(
        f"core encode_chunk+finish  {mib / core_enc:8.1f} MiB/s  ({raw_enc / core_enc:.0%} of raw)"
    )
    # PyNaCl's binding allocates and zero-fills each plaintext; the core opens into a reused buffer
    # (crypto.open_sealed_into), so it can beat this "raw" figure.
    print(f"raw sha256+aegis256 open  {mib / raw_dec:8.1f} MiB/s  (PyNaCl binding, allocating)")
    print(
        f"core walk+decrypt_into    {mib / core_dec:8.1f} MiB/s  ({raw_dec / core_dec:.0%} of raw)"
    )


def run(total_mib: int, chunk_mib: int) -> tuple[float, ...]:
    """One measurement round.

    Returns:
        MiB, chunk count, then seconds for: sha256, blake2b, raw seal, core encode, raw open,
        core decode, XChaCha20-Poly1305 seal alone, its open alone.
    """
    chunk_size = chunk_mib << 20
    size = (total_mib << 20) - 12345  # a ragged final chunk, so padding is exercised
    # Eight distinct random buffers cycled: plaintext generation must not dominate the timing.
    pool = [os.urandom(chunk_size) for _ in range(8)]

    def plaintext(index: int, count: int) -> bytes:
        if index == count - 1:
            return pool[index % 8][: size - index * chunk_size]
        return pool[index % 8]

    # Raw primitives on the same chunk sizes.
    count = -(-size // chunk_size)
    raw_enc, raw_dec = _raw(
        nacl.bindings.crypto_aead_aegis256_encrypt,
        nacl.bindings.crypto_aead_aegis256_decrypt,
        32,
        [plaintext(index, count) for index in range(count)],
        hashed=True,
    )
    x_enc, x_dec = _raw(
        nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt,
        nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt,
        24,
        [plaintext(index, count) for index in range(count)],
        hashed=False,
    )
    start = time.perf_counter()
    for index in range(count):
        hashlib.sha256(plaintext(index, count)).digest()
    sha = time.perf_counter() - start
    start = time.perf_counter()
    for index in range(count):
        hashlib.blake2b(plaintext(index, count), digest_size=32).digest()
    blake = time.perf_counter() - start

    # The core, as api.share/fetch drive it.
    start = time.perf_counter()
    encoder = FileEncoder(name="bench.bin", size=size, chunk_size=chunk_size)
    store: dict[bytes, bytes] = {}
    for index in range(encoder.chunk_count):
        chunk_id, stored = encoder.encode_chunk(index, plaintext(index, count))
        store[chunk_id] = stored
    cap, manifest_chunks = encoder.finish()
    core_enc = time.perf_counter() - start
    store.update(manifest_chunks)
    start = time.perf_counter()
    walker = ManifestWalker(cap)
    while not walker.done:
        for chunk_id in walker.wanted():
            walker.feed(chunk_id, store[chunk_id])
    manifest = walker.result()
    out = bytearray(chunk_size)  # fetch decrypts every chunk into a buffer it reuses
    for index, chunk_id in enumerate(manifest.chunk_ids):
        length = decrypt_chunk_into(cap, manifest, index, store[chunk_id], out)
        if index == 0 and out[:length] != pool[0]:
            raise SystemExit("decrypted chunk 0 differs")
    core_dec = time.perf_counter() - start
    assert chunk_id_of(store[cap.root]) == cap.root

    return size / (1 << 20), count, sha, blake, raw_enc, core_enc, raw_dec, core_dec, x_enc, x_dec


def _raw(
    seal: Callable[[bytes, bytes, bytes, bytes], bytes],
    open_: Callable[[bytes, bytes, bytes, bytes], bytes],
    nonce_bytes: int,
    chunks: list[bytes],
    *,
    hashed: bool,
) -> tuple[float, float]:
    """Seconds to seal every chunk (and SHA-256 the result), then to (SHA-256 and) open them."""
    key, aad = os.urandom(32), bytes(28)
    start = time.perf_counter()
    sealed_chunks = []
    for chunk in chunks:
        nonce = os.urandom(nonce_bytes)
        sealed = seal(chunk, aad, nonce, key)
        if hashed:
            hashlib.sha256(sealed).digest()
        sealed_chunks.append((nonce, sealed))
    enc = time.perf_counter() - start
    start = time.perf_counter()
    for nonce, sealed in sealed_chunks:
        if hashed:
            hashlib.sha256(sealed).digest()
        open_(sealed, aad, nonce, key)
    return enc, time.perf_counter() - start


if __name__ == "__main__":
    main()
