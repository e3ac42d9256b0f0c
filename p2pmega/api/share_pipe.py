"""``share -``: share what a pipe yields, read once and in order, without a temporary copy.

Its size is known only at its end, so chunks are sealed by core.manifest.StreamEncoder; placement is share's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import time
from typing import BinaryIO

from p2pmega.api.common import NetSettings, client_node
from p2pmega.api.share import (
    DEFAULT_LEASE_S,
    SHARE_CONCURRENCY,
    ChunkPlacement,
    Progress,
    ShareResult,
    _check_options,
    _holders,
    _placer,
)
from p2pmega.core.chunking import DEFAULT_CHUNK_SIZE, ChunkId, dht_key_of
from p2pmega.core.crypto import new_key
from p2pmega.core.magnet import format_link
from p2pmega.core.manifest import StreamEncoder
from p2pmega.core.renewal import RenewCredential
from p2pmega.errors import InputFileError, StorageError
from p2pmega.replicate.peers import PLACEMENT_BATCH_CHUNKS
from p2pmega.replicate.placer import Placer
from p2pmega.storage.links import LinkEntry, record_link

log = logging.getLogger(__name__)


async def share_stream(
    stream: BinaryIO,
    *,
    name: str,
    net: NetSettings,
    replicas: int = 2,
    min_countries: int = 2,
    min_blocs: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    lease_s: float = DEFAULT_LEASE_S,
    progress: Progress | None = None,
    rng: random.Random | None = None,
) -> ShareResult:
    """Share what ``stream`` yields until its end (``share -``), read once, in order, a few chunks at a time.

    Its size is known only at its end, so a chunk is sealed as the last one once the next read finds nothing.
    Nothing is resumable (a pipe cannot be read twice): every run is a new share under a new key. ``progress``
    is told the bytes placed, with the total unknown (0) until the end.

    Raises:
        BadOption: an option out of range, or a name that cannot be stored.
        InputFileError: reading the stream failed.
        BootstrapFailed, PlacementImpossible, as `share`.
    """
    _check_options(replicas, min_countries, lease_s, min_blocs)
    rng = rng or random.Random()  # noqa: S311 - only spreads DHT probes, nothing secret
    key = new_key()
    encoder = StreamEncoder(name=name, chunk_size=chunk_size, key=key)
    async with client_node(net) as node:
        credential = RenewCredential.from_file_key(key)
        placer = _placer(
            node,
            net,
            name,
            replicas,
            min_countries,
            lease_s,
            rng,
            min_blocs,
            chunk_size,
            credential,
        )
        try:
            placements = await _upload_stream(encoder, stream, chunk_size, placer, progress)
            cap, manifest_chunks = encoder.finish()
            # The manifest goes with the first run of data chunks, as for a file (api/share.py).
            first_run = dht_key_of(placements[0].chunk_id) if placements else None
            for i, (chunk_id, data) in enumerate(manifest_chunks):
                stored = await placer.place(chunk_id, data, near=first_run)
                placements.append(ChunkPlacement(chunk_id, "manifest", i, _holders(stored)))
        finally:
            await placer.close()
    # The root's holders travel in the link as hints, as for a file.
    root_holders = placements[-len(manifest_chunks)].holders
    cap = dataclasses.replace(cap, peers=tuple(h.address for h in root_holders))
    read_link, size = format_link(cap), encoder.size or 0
    entry = LinkEntry(read_link, cap.root.hex(), name, size, time.time())
    try:
        await asyncio.to_thread(record_link, net.data_dir, entry)  # for `seed --keep-mine`
    except StorageError as exc:
        log.warning("the link was not added to the link list: %s", exc)
    return ShareResult(
        read_link=read_link,
        keep_link=format_link(cap.keep_cap()),
        size=size,
        chunk_count=len(placements) - len(manifest_chunks),
        chunks=tuple(placements),
    )


async def _upload_stream(
    encoder: StreamEncoder,
    stream: BinaryIO,
    chunk_size: int,
    placer: Placer,
    progress: Progress | None,
) -> list[ChunkPlacement]:
    """Read, seal and place the stream's chunks in order, at most SHARE_CONCURRENCY placing at once.

    One chunk is read ahead, to know whether the one before it is the last.

    Raises:
        InputFileError: reading failed.
        PlacementImpossible: a chunk could not be placed (the first failure stops the upload).
    """
    placed: dict[int, ChunkPlacement] = {}
    sem = asyncio.Semaphore(SHARE_CONCURRENCY)
    tasks: list[asyncio.Task[None]] = []
    done_bytes = 0
    run_key = b""  # each run of PLACEMENT_BATCH_CHUNKS goes near its first chunk's key (replicate/peers.py)

    async def place(index: int, chunk_id: ChunkId, sealed: bytes, length: int, near: bytes) -> None:
        nonlocal done_bytes
        try:
            stored = await placer.place(chunk_id, sealed, near=near)
            placed[index] = ChunkPlacement(chunk_id, "data", index, _holders(stored))
            done_bytes += length
            if progress is not None:
                progress(done_bytes, encoder.size or 0)
        finally:
            sem.release()

    try:
        pending = await asyncio.to_thread(_read_full, stream, chunk_size)
        index = 0
        while True:
            ahead = b""
            if len(pending) == chunk_size:
                ahead = await asyncio.to_thread(_read_full, stream, chunk_size)
            final = not ahead
            await sem.acquire()
            failed = [t for t in tasks if t.done() and t.exception() is not None]
            if failed:
                sem.release()
                break
            chunk_id, sealed = await asyncio.to_thread(
                functools.partial(encoder.encode_chunk, index, pending, final=final)
            )
            if index % PLACEMENT_BATCH_CHUNKS == 0:
                run_key = dht_key_of(chunk_id)
            tasks.append(asyncio.create_task(place(index, chunk_id, sealed, len(pending), run_key)))
            if final:
                break
            pending, index = ahead, index + 1
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [placed[i] for i in range(len(placed))]


def _read_full(stream: BinaryIO, length: int) -> bytes:
    """Up to ``length`` bytes: fewer only at the end of the stream (a pipe gives what it has so far).

    Raises:
        InputFileError: the read failed.
    """
    parts: list[bytes] = []
    got = 0
    try:
        while got < length:
            data = stream.read(length - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
    except OSError as exc:
        raise InputFileError(f"reading the input failed: {exc.strerror or exc}") from exc
    return b"".join(parts)
