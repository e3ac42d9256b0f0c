"""Fetching a file to a stream (``fetch -o -``): chunks in parallel, written strictly in order, memory bounded.

A FetchSchedule (api/fetch_schedule.py) asks each chunk of the holder expected to deliver it first, but never a
chunk FETCH_CONCURRENCY or more past the first one not yet written; each is opened as it arrives and written
once every earlier one is. So at most FETCH_CONCURRENCY opened chunks are held at once (16 MiB with 2 MiB
chunks), whatever the file's size, and a slow reader (a full pipe, a browser reading an HTTP response) holds the
download back instead of filling memory. Nothing is resumable: a stream
cannot be rewound. ``open_stream`` is the same for the web app, which learns the name and size before the bytes.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from p2pmega.api.download import FETCH_CONCURRENCY, FetchResult, Progress, safe_name
from p2pmega.api.fetch_schedule import FetchSchedule
from p2pmega.core.chunking import format_id
from p2pmega.core.magnet import KeepCap, ReadCap, parse_link
from p2pmega.core.manifest import Manifest
from p2pmega.core.manifest_walk import decrypt_chunk_into
from p2pmega.errors import BadLink
from p2pmega.net.buffers import BufferPool, recycle
from p2pmega.node import Node
from p2pmega.replicate.locator import HolderLocator
from p2pmega.replicate.manifest import walk_manifest
from p2pmega.replicate.peers import batch_keys

# Takes one chunk's plaintext, in order; returns once it may be reused (written, or copied into a bounded buffer).
Write = Callable[[memoryview], Awaitable[None]]


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

    async def write(plain: memoryview) -> None:
        await asyncio.to_thread(_write_all, out, plain)

    return await stream_to(locator, cap, manifest, write, progress)


async def stream_to(
    locator: HolderLocator,
    cap: ReadCap,
    manifest: Manifest,
    write: Write,
    progress: Progress | None,
) -> FetchResult:
    """Give the file of ``manifest`` to ``write`` in order, chunk by chunk, each verified first.

    Raises:
        ChunkUnavailable: a chunk has no reachable holder (what came before it was written already).
        IntegrityError: a chunk no holder can provide intact.
        Exception: whatever ``write`` raised (the reader went away).
    """
    ids = manifest.chunk_ids
    size = manifest.size or 0
    chunk_size = manifest.chunk_size or 1
    writer = _OrderedWriter(write, size, progress)
    await locator.want(list(ids), placed_near=batch_keys(ids))
    # Each chunk's plaintext buffer is reused chunk after chunk: a fresh 2 MiB per chunk, freed by another
    # thread than the one that made it, left the process ever larger (glibc keeps such memory in its arenas).
    buffers = BufferPool(spare=FETCH_CONCURRENCY)
    ready: dict[int, memoryview] = {}
    arrived = asyncio.Event()

    async def on_done(index: int, plain: memoryview) -> None:
        ready[index] = plain
        arrived.set()

    schedule = FetchSchedule(
        locator,
        ids,
        range(len(ids)),
        [max(1, min(chunk_size, size - i * chunk_size)) for i in range(len(ids))],
        functools.partial(_open, cap, manifest, buffers),
        on_done,
        max_in_flight=FETCH_CONCURRENCY,
        window=lambda: writer.next + FETCH_CONCURRENCY,
        stop_on_missing=True,
    )

    async def drain() -> None:
        while writer.next < len(ids):
            await arrived.wait()
            arrived.clear()
            while writer.next in ready:
                plain = ready.pop(writer.next)
                await writer.write(plain)
                recycle(plain, buffers)  # kept only if ``write`` holds no view of it
                schedule.kick()

    writer.report()
    tasks = [asyncio.create_task(schedule.run()), asyncio.create_task(drain())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # the first failure is raised; the finally stops the other task
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return FetchResult(Path("-"), size, len(ids), len(ids), 0)


@dataclass(eq=False)
class FileStream:
    """A read link whose manifest was found: its name and size are known, its bytes not fetched yet.

    ``write_to`` streams it once; ``close`` must follow (the web app's node outlives it).
    """

    locator: HolderLocator
    cap: ReadCap
    manifest: Manifest
    name: str  # the manifest's name made safe as a file name (api.fetch.safe_name)
    size: int

    @property
    def is_folder(self) -> bool:
        return self.manifest.is_tree

    async def write_to(self, write: Write, progress: Progress | None = None) -> FetchResult:
        """The file's bytes, in order, to ``write`` (stream_to).

        Raises:
            ChunkUnavailable, IntegrityError: as stream_to; Exception: whatever ``write`` raised.
        """
        return await stream_to(self.locator, self.cap, self.manifest, write, progress)

    async def close(self) -> None:
        await self.locator.close()


async def open_stream(node: Node, link: str) -> FileStream:
    """Find the manifest of ``link`` through ``node`` (joined, and left running) for ``FileStream.write_to``.

    A folder's link opens too (``is_folder``): what to do with it is the caller's choice.

    Raises:
        BadLink: the link is malformed or is a keep-alive link.
        ManifestNotFound: no holder has the manifest.
        IntegrityError: the manifest found does not authenticate under the link.
    """
    cap = parse_link(link)
    if isinstance(cap, KeepCap):
        raise BadLink("this is a keep-alive link: it can check and keep a file alive, not fetch it")
    locator = HolderLocator(node, hints=cap.peers)
    try:
        manifest = await walk_manifest(locator, cap)
    except BaseException:
        await locator.close()
        raise
    name = safe_name(manifest.name, fallback=f"p2pmega-{format_id(cap.root)[:16]}")
    return FileStream(locator, cap, manifest, name, manifest.size or 0)


class _OrderedWriter:
    """Writes chunk plaintexts to ``out`` in index order, and reports the progress."""

    def __init__(self, write: Write, size: int, progress: Progress | None) -> None:
        self.write_out = write
        self.size = size
        self.progress = progress
        self.next = 0
        self.written = 0

    async def write(self, plain: memoryview) -> None:
        await self.write_out(plain)
        self.written += len(plain)
        self.next += 1
        self.report()

    def report(self) -> None:
        if self.progress is not None:
            self.progress(self.written, self.size)


def _open(
    cap: ReadCap, manifest: Manifest, buffers: BufferPool, index: int, data: bytes | memoryview
) -> memoryview:
    # Opened straight out of the receive buffer into the chunk's own buffer: one copy of the plaintext.
    out = buffers.take(manifest.chunk_size or 0)
    length = decrypt_chunk_into(cap, manifest, index, data, out, id_verified=True)
    return memoryview(out)[:length]


def _write_all(out: BinaryIO, data: memoryview) -> None:
    out.write(data)
    out.flush()
