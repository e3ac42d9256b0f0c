"""Throughput of the core (encrypt+id, verify+decrypt) beside the raw primitives, in one run.

Usage: python bench/core.py [--mib 256] [--chunk-mib 1]
Raw = XChaCha20-Poly1305 seal + SHA-256 of the sealed bytes (and open + SHA-256) through the
nacl binding directly; the core must reach at least 70% of raw.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import nacl.bindings

from p2pmega.core.chunking import chunk_id_of
from p2pmega.core.manifest import FileEncoder, ManifestWalker, decrypt_chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--chunk-mib", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()
    results = [run(args.mib, args.chunk_mib) for _ in range(args.rounds)]
    mib, count, sha, blake, raw_enc, core_enc, raw_dec, core_dec = (
        min(column) for column in zip(*results, strict=True)
    )
    print(f"{mib:.0f} MiB in {count:.0f} chunks of {args.chunk_mib} MiB, best of {args.rounds}")
    print(f"sha256 alone              {mib / sha:8.1f} MiB/s")
    print(f"blake2b-256 alone         {mib / blake:8.1f} MiB/s")
    print(f"raw seal+sha256           {mib / raw_enc:8.1f} MiB/s")
    print(
        f"core encode_chunk+finish  {mib / core_enc:8.1f} MiB/s  ({raw_enc / core_enc:.0%} of raw)"
    )
    print(f"raw sha256+open           {mib / raw_dec:8.1f} MiB/s")
    print(
        f"core walk+decrypt_chunk   {mib / core_dec:8.1f} MiB/s  ({raw_dec / core_dec:.0%} of raw)"
    )


def run(total_mib: int, chunk_mib: int) -> tuple[float, ...]:
    """One measurement round.

    Returns:
        MiB, chunk count, then seconds for: sha256, blake2b, raw seal, core encode, raw open,
        core decode.
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
    key, aad = os.urandom(32), bytes(28)
    count = -(-size // chunk_size)
    start = time.perf_counter()
    raw_sealed = []
    for index in range(count):
        nonce = os.urandom(24)
        sealed = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            plaintext(index, count), aad, nonce, key
        )
        hashlib.sha256(sealed).digest()
        raw_sealed.append((nonce, sealed))
    raw_enc = time.perf_counter() - start
    start = time.perf_counter()
    for nonce, sealed in raw_sealed:
        hashlib.sha256(sealed).digest()
        nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, aad, nonce, key)
    raw_dec = time.perf_counter() - start
    del raw_sealed
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
    for index, chunk_id in enumerate(manifest.chunk_ids):
        plain = decrypt_chunk(cap, manifest, index, store[chunk_id])
        if index == 0 and plain != pool[0]:
            raise SystemExit("decrypted chunk 0 differs")
    core_dec = time.perf_counter() - start
    assert chunk_id_of(store[cap.root]) == cap.root

    return size / (1 << 20), count, sha, blake, raw_enc, core_enc, raw_dec, core_dec


if __name__ == "__main__":
    main()
