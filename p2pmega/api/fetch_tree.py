"""Fetching a shared folder: read its listing, refuse any unsafe path, then download every file at once.

The listing (the stream's first bytes, core.tree) is fetched into memory and checked before anything is
written; the files then download like one file (api.fetch's workers) into part files under the output
(storage/tree_part.py), so Ctrl-C, a crash or a network loss resume like a single file.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path

from p2pmega.api.download import FetchResult, Progress, _Download, safe_name
from p2pmega.core.chunking import format_id
from p2pmega.core.magnet import ReadCap
from p2pmega.core.manifest import Manifest
from p2pmega.core.manifest_walk import decrypt_chunk
from p2pmega.core.tree import RESERVED_NAME, Layout, TreeEntry, decode_listing
from p2pmega.errors import BadManifest, OutputExists, OutputWriteFailed
from p2pmega.replicate.locator import HolderLocator
from p2pmega.storage.tree_part import TreeResume, TreeWriter, check_targets

# Listing chunks fetched at once (a listing is at most 64 MiB: 32 chunks of the default size).
LISTING_CONCURRENCY = 8


async def fetch_tree(
    locator: HolderLocator,
    cap: ReadCap,
    manifest: Manifest,
    output: Path | None,
    cwd: Path,
    force: bool,
    progress: Progress | None,
    on_part: Callable[[Path], None] | None,
) -> FetchResult:
    """Recreate the folder of ``manifest`` under ``output`` (or cwd/NAME).

    Raises:
        UnsafePath: a listed path is absolute, has ``..`` or would land outside the output (nothing written).
        OutputExists: a listed path is taken (a file without ``force``, or a non-directory where a directory
            goes), or ``output`` is a file.
        OutputWriteFailed: the output cannot be written.
        ChunkUnavailable, IntegrityError: as a single file's fetch.
    """
    assert manifest.listing_bytes is not None  # noqa: S101 - a tree walked with its read link
    chunk_size, size = manifest.chunk_size or 1, manifest.size or 0
    listing_chunks = -(-manifest.listing_bytes // chunk_size)
    plains = await _fetch_plain(locator, cap, manifest, range(listing_chunks))
    head = b"".join(plains)
    entries = decode_listing(head[: manifest.listing_bytes])
    layout = Layout(entries, manifest.listing_bytes)
    if layout.total_bytes != size:
        raise BadManifest(
            f"folder listing adds up to {layout.total_bytes} bytes, the manifest says {size}"
        )
    root = output or cwd / safe_name(manifest.name, fallback=f"p2pmega-{format_id(cap.root)[:16]}")
    resume = TreeResume(
        root / RESERVED_NAME, cap.root.hex(), size, [span.size for span in layout.spans]
    )
    try:
        await asyncio.to_thread(_prepare, root, entries, force)
        await asyncio.to_thread(resume.load)
        writer = await asyncio.to_thread(TreeWriter.open, root, entries, layout, chunk_size, resume)
        # The listing's chunks are in memory already: their files' bytes go straight to the part files.
        fresh = [i for i in range(listing_chunks) if i not in resume.done]
        for i in fresh:
            await asyncio.to_thread(writer.write_plain, i * chunk_size, plains[i])
    except OSError as exc:
        raise OutputWriteFailed(
            f"cannot write the folder in {str(root)!r}: {exc.strerror or exc}; pass -o DIR"
        ) from exc
    if on_part is not None:
        on_part(resume.part)
    resume.done.update(fresh)
    download = _Download(locator, cap, manifest, root, progress, resume, writer)
    download.resumed -= len(fresh)
    download.fetched += len(fresh)
    await download.run()
    return FetchResult(
        root, size, len(manifest.chunk_ids), download.fetched, download.resumed, len(layout.spans)
    )


def _prepare(root: Path, entries: list[TreeEntry], force: bool) -> None:
    if root.exists() and not root.is_dir():
        raise OutputExists(f"{str(root)!r} exists and is not a directory; a folder goes there")
    if root.is_dir():
        check_targets(root, entries, force=force)


async def _fetch_plain(
    locator: HolderLocator, cap: ReadCap, manifest: Manifest, indexes: range
) -> list[bytes]:
    """Fetch and open the data chunks ``indexes`` into memory (the listing's), a few at a time.

    Raises:
        ChunkUnavailable: no reachable holder has one of them.
        IntegrityError: one does not open at its place.
    """
    sem = asyncio.Semaphore(LISTING_CONCURRENCY)

    async def one(index: int) -> bytes:
        async with sem:
            return await locator.fetch_into(
                manifest.chunk_ids[index],
                functools.partial(_open, cap, manifest, index),
                spread=index,
            )

    return list(await asyncio.gather(*(one(i) for i in indexes)))


def _open(cap: ReadCap, manifest: Manifest, index: int, data: bytes | memoryview) -> bytes:
    return decrypt_chunk(cap, manifest, index, bytes(data), id_verified=True)
