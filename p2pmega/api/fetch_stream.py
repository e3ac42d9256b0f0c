"""Fetching a file to a stream (``fetch -o -``): chunks in parallel, written strictly in order, memory bounded.

Each of FETCH_CONCURRENCY workers takes the next chunk index, fetches and opens it, waits until every
earlier chunk is written, writes it and only then takes another. So at most FETCH_CONCURRENCY opened chunks
are held at once (16 MiB with 2 MiB chunks), whatever the file's size, and a slow reader (a full pipe) holds
the download back instead of filling memory. Nothing is resumable: a stream cannot be rewound.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import BinaryIO

from p2pmega.api.fetch import FETCH_CONCURRENCY, FetchResult, Progress
from p2pmega.core.magnet import ReadCap
from p2pmega.core.manifest import Manifest, decrypt_chunk_into
from p2pmega.replicate.locator import HolderLocator


async def stream(
    locator: HolderLocator,
    cap: ReadCap,
    manifest: Manifest,
    out: BinaryIO,
    progress: Progress | None,
) -> FetchResult:
    """Write the file of ``manifest`` to ``out`` in order, each chunk verified before it is written.

    Raises:
        ChunkUnavailable: a chunk has no reachable holder (what came before it was written already).
        IntegrityError: a chunk no holder can provide intact.
        BrokenPipeError: the reader went away (the CLI ends quietly).
        OSError: ``out`` refused a write.
    """
    ids = manifest.chunk_ids
    size = manifest.size or 0
    writer = _OrderedWriter(out, size, progress)
    await locator.want(list(ids), near=cap.root)
    indexes = iter(range(len(ids)))

    async def worker() -> None:
        # next() on a shared iterator hands each index to exactly one worker, in order.
        for index in iter(functools.partial(next, indexes, None), None):
            plain = await locator.fetch_into(
                ids[index], functools.partial(_open, cap, manifest, index), spread=index
            )
            await writer.write(index, plain)

    writer.report()
    workers = [asyncio.create_task(worker()) for _ in range(min(FETCH_CONCURRENCY, len(ids)))]
    try:
        await asyncio.gather(*workers)  # the first failure is raised; the finally stops the others
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return FetchResult(Path("-"), size, len(ids), len(ids), 0)


class _OrderedWriter:
    """Writes chunk plaintexts to ``out`` in index order; a chunk that comes early waits for its turn."""

    def __init__(self, out: BinaryIO, size: int, progress: Progress | None) -> None:
        self.out = out
        self.size = size
        self.progress = progress
        self.next = 0
        self.written = 0
        self.turn = asyncio.Condition()

    async def write(self, index: int, plain: memoryview) -> None:
        async with self.turn:
            await self.turn.wait_for(lambda: self.next == index)
        await asyncio.to_thread(_write_all, self.out, plain)
        self.written += len(plain)
        self.report()
        async with self.turn:
            self.next += 1
            self.turn.notify_all()

    def report(self) -> None:
        if self.progress is not None:
            self.progress(self.written, self.size)


def _open(cap: ReadCap, manifest: Manifest, index: int, data: bytes | memoryview) -> memoryview:
    # Opened straight out of the receive buffer into the chunk's own buffer: one copy of the plaintext.
    out = bytearray(manifest.chunk_size or 0)
    length = decrypt_chunk_into(cap, manifest, index, data, out, id_verified=True)
    return memoryview(out)[:length]


def _write_all(out: BinaryIO, data: memoryview) -> None:
    out.write(data)
    out.flush()
