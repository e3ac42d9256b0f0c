"""``share``: encrypt a file, place every chunk on holders in enough countries, return the links."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pmega.api.common import NetSettings, check_min_blocs, client_node
from p2pmega.api.share_peers import recheck
from p2pmega.api.share_pool import PoolFinder
from p2pmega.api.share_source import CHANGED_SIZE, FileSource, TreeSource, open_source
from p2pmega.core.chunking import CHUNK_OVERHEAD_BYTES, DEFAULT_CHUNK_SIZE, ChunkId, dht_key_of
from p2pmega.core.crypto import new_key
from p2pmega.core.magnet import format_link
from p2pmega.core.manifest import FileEncoder
from p2pmega.core.placement import Candidate
from p2pmega.core.renewal import RenewCredential
from p2pmega.defaults import LEASE_S, MAX_LEASE_DAYS, MAX_LEASE_S
from p2pmega.errors import (
    BadOption,
    InputFileError,
    StorageError,
)
from p2pmega.node import Node
from p2pmega.replicate.peers import PLACEMENT_BATCH_CHUNKS
from p2pmega.replicate.pipeline import Pipeline
from p2pmega.replicate.placer import Placer
from p2pmega.storage.links import LinkEntry, record_link
from p2pmega.storage.share_state import (
    Completed,
    PlacedChunk,
    ShareState,
    StateWriter,
    load_state,
    state_path,
)

log = logging.getLogger(__name__)

# Chunks being encrypted or uploaded at once: enough to keep both cores and every holder busy, few enough that
# memory stays at a few MiB per chunk whatever the file size. Measured with 256 MiB to 8 seeds, 2 MiB chunks:
# 3 -> 1.65-2.02 s, 4 -> 1.26-1.32 s, 6 -> 1.23-1.52 s (with 1 MiB chunks 6 was best, 10 and 16 slower).
SHARE_CONCURRENCY = 4
# Chunks whose upload is done but whose forwarded copy (replicate/placer.py, "Forwarding") is not confirmed yet do
# not hold one of those places; at most this many chunks are in the air in all.
SHARE_PENDING = 3 * SHARE_CONCURRENCY
DEFAULT_LEASE_S = LEASE_S
# The share's state is saved at most this often while chunks are placed (and always at the end), and never more
# often than every STATE_SAVE_COST_FACTOR times the last save took: a huge file's state costs more to write, and
# saving stays a small share of the work (a rerun then re-uploads at most the chunks of that interval).
STATE_SAVE_INTERVAL_S = 1.0
STATE_SAVE_COST_FACTOR = 20

Progress = Callable[[int, int], None]
# The node a share runs on: a client node of its own (``share``), or one the caller keeps running (``share_on``).
OpenNode = Callable[[], contextlib.AbstractAsyncContextManager[Node]]


@dataclass(frozen=True)
class ChunkPlacement:
    chunk_id: ChunkId
    kind: str  # "data" or "manifest"
    index: int
    holders: tuple[Candidate, ...]


@dataclass(frozen=True)
class ShareResult:
    """The links of a share and where its chunks are.

    ``status`` is "new" (uploaded now under a new key), "resumed" (an interrupted share of the same unchanged file
    finished: ``chunks_resumed`` data chunks were already stored) or "unchanged" (the file was shared already and
    is unchanged: the same links, nothing stored).
    """

    read_link: str
    keep_link: str
    size: int
    chunk_count: int
    chunks: tuple[ChunkPlacement, ...]
    status: str = "new"
    chunks_resumed: int = 0
    files: int | None = None  # a folder's files (None: a single file or a stream)
    skipped: tuple[str, ...] = ()  # a folder's symbolic links and special files, not shared


def _holders(cands: list[Candidate]) -> tuple[Candidate, ...]:
    return tuple(cands)


async def share(
    path: Path,
    *,
    net: NetSettings,
    replicas: int = 2,
    min_countries: int = 2,
    min_blocs: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    lease_s: float = DEFAULT_LEASE_S,
    progress: Progress | None = None,
    rng: random.Random | None = None,
    new: bool = False,
) -> ShareResult:
    """Encrypt ``path``, store each chunk and the manifest on holders meeting the rule, return the links.

    A folder is shared as one stream, its listing then its files (api.share_source, docs/FORMAT.md section 5a);
    its symbolic links and special files are skipped and named in ``ShareResult.skipped``.

    The share's state (its key, the chunks placed so far, then its links) is kept in ``net.data_dir``: run again
    on the same unchanged file, an interrupted share resumes where it stopped, and a finished one returns the
    same links without storing anything. ``new`` starts a fresh share under a new key (a new link).

    Holders in as many jurisdiction blocs (``net.blocs``) as countries are preferred whenever the storage peers
    allow it; ``min_blocs`` > 1 requires that many blocs.

    Raises:
        InputFileError: the file is missing, unreadable, or not a regular file or folder; a folder's entry
            has a name that cannot be stored.
        BadOption: replicas / min_countries / the lease out of range.
        BootstrapFailed: no way into the network.
        PlacementImpossible: the storage peers found cannot meet the rule (then nothing is stored), or too many
            of them failed during the upload (what was stored is kept for a rerun).
        StorageError: the share's state cannot be saved in the data dir.
    """
    return await _share_path(
        path,
        lambda: client_node(net),
        net=net,
        replicas=replicas,
        min_countries=min_countries,
        min_blocs=min_blocs,
        chunk_size=chunk_size,
        lease_s=lease_s,
        progress=progress,
        rng=rng,
        new=new,
    )


async def share_on(
    node: Node,
    path: Path,
    *,
    net: NetSettings,
    replicas: int = 2,
    min_countries: int = 2,
    min_blocs: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    lease_s: float = DEFAULT_LEASE_S,
    progress: Progress | None = None,
    rng: random.Random | None = None,
    new: bool = False,
) -> ShareResult:
    """``share`` on a node already joined (the web app's), which it leaves running; ``net`` gives the data dir,
    geo and bloc tables. Concurrent shares and fetches may use the same node.

    Raises:
        InputFileError, BadOption, PlacementImpossible, StorageError: as ``share``.
        BootstrapFailed: the node's join failed.
    """
    return await _share_path(
        path,
        lambda: contextlib.nullcontext(node),
        net=net,
        replicas=replicas,
        min_countries=min_countries,
        min_blocs=min_blocs,
        chunk_size=chunk_size,
        lease_s=lease_s,
        progress=progress,
        rng=rng,
        new=new,
    )


async def _share_path(
    path: Path,
    open_node: OpenNode,
    *,
    net: NetSettings,
    replicas: int,
    min_countries: int,
    min_blocs: int,
    chunk_size: int,
    lease_s: float,
    progress: Progress | None,
    rng: random.Random | None,
    new: bool,
) -> ShareResult:
    _check_options(replicas, min_countries, lease_s, min_blocs)
    rng = rng or random.Random()  # noqa: S311 - only spreads DHT probes, nothing secret
    source = await asyncio.to_thread(open_source, path)
    try:
        identity = source.identity
        where = state_path(net.data_dir, Path(identity.path))
        previous = None if new else await asyncio.to_thread(load_state, where)
        if previous is not None and previous.file != identity:
            previous = None  # another file at this path, or this one changed: start afresh
        if (
            previous is not None
            and min_blocs <= 1  # the saved state does not say how many blocs the holders spanned
            and _reusable(previous.completed, replicas, min_countries)
        ):
            return dataclasses.replace(_unchanged(previous), **_tree_fields(source))
        if previous is not None and previous.chunk_size == chunk_size:
            state = ShareState(identity, previous.key, chunk_size, dict(previous.chunks))
        else:
            state = ShareState(identity, new_key(), chunk_size)
        result = await _share(
            source.name,
            source,
            state,
            StateWriter(where),
            open_node,
            net,
            replicas,
            min_countries,
            lease_s,
            progress,
            rng,
            min_blocs,
        )
        return dataclasses.replace(result, **_tree_fields(source))
    finally:
        source.close()


def _tree_fields(source: FileSource | TreeSource) -> dict[str, Any]:
    if isinstance(source, FileSource):
        return {}
    return {"files": len(source.layout.spans), "skipped": source.skipped}


async def _share(
    name: str,
    source: FileSource | TreeSource,
    state: ShareState,
    writer: StateWriter,
    open_node: OpenNode,
    net: NetSettings,
    replicas: int,
    min_countries: int,
    lease_s: float,
    progress: Progress | None,
    rng: random.Random,
    min_blocs: int = 1,
) -> ShareResult:
    size, chunk_size = state.file.size, state.chunk_size
    encoder = FileEncoder(
        name=name,
        size=size,
        chunk_size=chunk_size,
        key=state.key,
        listing_bytes=source.listing_bytes,
    )
    async with open_node() as node:
        credential = RenewCredential.from_file_key(state.key)
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
        started_at = time.time()
        recorded = len(state.chunks)
        if state.chunks:
            await recheck(node, state, net.geo, replicas, min_countries, lease_s, credential)
            log.info(
                "resuming: %d of %d recorded chunks are still placed", len(state.chunks), recorded
            )
        resumed = len(state.chunks)
        for index, placed in state.chunks.items():
            encoder.adopt_chunk(index, placed.chunk_id)
        keeper = _Keeper(writer, state)
        try:
            await keeper.save()
            placements = await _upload(encoder, source, size, chunk_size, placer, progress, keeper)
            cap, manifest_chunks = encoder.finish()
            manifest: list[PlacedChunk] = []
            # The manifest goes with the first run of data chunks: the peers found for it are known already.
            first_run = dht_key_of(state.chunks[0].chunk_id) if state.chunks else None
            for i, (chunk_id, data) in enumerate(manifest_chunks):
                stored = await placer.place(chunk_id, data, near=first_run)
                manifest.append(PlacedChunk(chunk_id, _holders(stored)))
                placements.append(ChunkPlacement(chunk_id, "manifest", i, _holders(stored)))
            # The root's holders travel in the link as hints, so a fetch can start before any DHT lookup.
            cap = dataclasses.replace(cap, peers=tuple(h.address for h in manifest[0].holders))
            done = state.completed = Completed(
                read_link=format_link(cap),
                keep_link=format_link(cap.keep_cap()),
                manifest=tuple(manifest),
                replicas=replicas,
                min_countries=min_countries,
                # Every data chunk was stored or renewed after started_at, each for lease_s.
                lease_expires_at=started_at + lease_s,
            )
        except BaseException:
            # Also on an error or Ctrl-C (a cancellation): whatever was placed is resumed by the next run. A
            # failure to save then must not hide why the share stopped.
            try:
                await keeper.save()
            except StorageError as exc:
                log.warning("%s", exc)
            raise
        finally:
            await placer.close()
        await keeper.save()
    entry = LinkEntry(done.read_link, cap.root.hex(), name, size, time.time())
    try:
        await asyncio.to_thread(record_link, net.data_dir, entry)  # for `seed --keep-mine`
    except StorageError as exc:
        log.warning("the link was not added to the link list: %s", exc)
    return ShareResult(
        read_link=done.read_link,
        keep_link=done.keep_link,
        size=size,
        chunk_count=encoder.chunk_count,
        chunks=tuple(placements),
        status="resumed" if resumed else "new",
        chunks_resumed=resumed,
    )


def _placer(
    node: Node,
    net: NetSettings,
    name: str,
    replicas: int,
    min_countries: int,
    lease_s: float,
    rng: random.Random,
    min_blocs: int,
    chunk_size: int,
    credential: RenewCredential,
) -> Placer:
    """A Placer that finds each run of chunks' candidates near its key (api/share_pool.py); its first search
    refuses, before anything is stored, a rule the storage peers found cannot meet (PlacementImpossible).

    Every chunk it stores carries the file's renewal key (``credential``'s public half): only the file's keepers
    can extend its leases. Peers without room for one stored chunk of ``chunk_size`` are full.
    """
    placer = Placer(
        node, [], net.geo, replicas, min_countries, lease_s, net.blocs.mapping(), min_blocs
    )
    placer.renew_key = credential.public_key
    # Upload each chunk once; its first holder forwards the second copy (docs/PROTOCOL.md, "Forwarding").
    placer.pipeline = Pipeline(placer, credential.public_key)
    placer.finder = PoolFinder(
        node,
        net,
        name,
        rng,
        replicas,
        min_countries,
        min_blocs,
        placer.rules()[0],
        placer.silent,
        chunk_bytes=chunk_size + CHUNK_OVERHEAD_BYTES,
        full=placer.full,
        space=placer.space,
    )
    return placer


def _check_options(replicas: int, min_countries: int, lease_s: float, min_blocs: int = 1) -> None:
    """Raises: BadOption: replicas / min_countries / min_blocs / the lease out of range."""
    if replicas < 1 or not 1 <= min_countries <= replicas:
        raise BadOption(
            f"--replicas {replicas} --min-countries {min_countries}: need replicas >= 1 and "
            "1 <= min-countries <= replicas"
        )
    check_min_blocs(replicas, min_countries, min_blocs)
    if not (math.isfinite(lease_s) and 0 < lease_s <= MAX_LEASE_S):
        raise BadOption(
            f"--lease-days {lease_s / 86400:g}: give more than 0 and at most {MAX_LEASE_DAYS:g} (holders keep a "
            "chunk at most that long; `p2pmega seed --keep LINK` renews a file for longer)"
        )


def _reusable(done: Completed | None, replicas: int, min_countries: int) -> bool:
    """A finished share can be given again if it met at least this rule and its leases have not ended."""
    return (
        done is not None
        and done.replicas >= replicas
        and done.min_countries >= min_countries
        and time.time() < done.lease_expires_at
    )


def _unchanged(state: ShareState) -> ShareResult:
    done = state.completed
    assert done is not None  # noqa: S101 - _reusable checked it
    data = [
        ChunkPlacement(p.chunk_id, "data", i, p.holders) for i, p in sorted(state.chunks.items())
    ]
    manifest = [
        ChunkPlacement(p.chunk_id, "manifest", i, p.holders) for i, p in enumerate(done.manifest)
    ]
    return ShareResult(
        read_link=done.read_link,
        keep_link=done.keep_link,
        size=state.file.size,
        chunk_count=len(data),
        chunks=(*data, *manifest),
        status="unchanged",
    )


class _Keeper:
    """Saves the share's state while chunks are placed: at most every STATE_SAVE_INTERVAL_S, and on demand."""

    def __init__(self, writer: StateWriter, state: ShareState) -> None:
        self.writer = writer
        self.state = state
        self.dirty = False
        self.next_save = 0.0

    def record(self, index: int, placed: PlacedChunk) -> None:
        self.state.chunks[index] = placed
        self.dirty = True

    async def save_soon(self) -> None:
        if self.dirty and asyncio.get_running_loop().time() >= self.next_save:
            await self.save()

    async def save(self) -> None:
        """Write the state now (in a worker thread).

        Raises:
            StorageError: the data dir cannot be written.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.next_save = started + STATE_SAVE_INTERVAL_S  # concurrent placements do not save twice
        self.dirty = False
        await asyncio.to_thread(self.writer.save, self.state, dict(self.state.chunks))
        took = loop.time() - started
        self.next_save = started + max(STATE_SAVE_INTERVAL_S, STATE_SAVE_COST_FACTOR * took)


async def _upload(
    encoder: FileEncoder,
    source: FileSource | TreeSource,
    size: int,
    chunk_size: int,
    placer: Placer,
    progress: Progress | None,
    keeper: _Keeper,
) -> list[ChunkPlacement]:
    """Read, encrypt and place every data chunk not placed yet, at most SHARE_CONCURRENCY at a time.

    Raises:
        InputFileError: the file changed size while it was read.
        PlacementImpossible: a chunk could not be placed (the first failure stops the upload).
        StorageError: the share's state cannot be saved.
    """
    placed = keeper.state.chunks
    todo = [i for i in range(encoder.chunk_count) if i not in placed]
    done_bytes = sum(min(chunk_size, size - i * chunk_size) for i in placed)
    if progress is not None and placed:
        progress(done_bytes, size)
    sem = asyncio.Semaphore(SHARE_CONCURRENCY)
    pending = asyncio.Semaphore(SHARE_PENDING)
    tasks: list[asyncio.Task[None]] = []
    # Each run of PLACEMENT_BATCH_CHUNKS chunks is placed near its first chunk's key (replicate/peers.py): known
    # once that chunk is sealed (or from the state, when it was placed by an earlier run of the share).
    loop = asyncio.get_running_loop()
    heads: dict[int, asyncio.Future[bytes]] = {}
    for head in range(0, encoder.chunk_count, PLACEMENT_BATCH_CHUNKS):
        heads[head] = loop.create_future()
        if head in placed:
            heads[head].set_result(dht_key_of(placed[head].chunk_id))

    async def one(index: int) -> None:
        nonlocal done_bytes
        uploading = True

        def uploaded() -> None:
            nonlocal uploading
            if uploading:
                uploading = False
                sem.release()

        try:
            # One worker-thread hop reads and seals the chunk (chunks are read with pread, in any order).
            chunk_id, sealed, length = await asyncio.to_thread(
                _read_and_seal, encoder, source.read_at, index, chunk_size, size
            )
            head = heads[index - index % PLACEMENT_BATCH_CHUNKS]
            if index % PLACEMENT_BATCH_CHUNKS == 0:
                head.set_result(dht_key_of(chunk_id))
            # Chunks are started in order, so a run's first chunk is sealed before the others wait for it.
            stored = await placer.place(
                chunk_id, sealed, near=await asyncio.shield(head), uploaded=uploaded
            )
            keeper.record(index, PlacedChunk(chunk_id, _holders(stored)))
            done_bytes += length
            if progress is not None:
                progress(done_bytes, size)
            await keeper.save_soon()
        finally:
            uploaded()
            pending.release()

    try:
        for index in todo:
            await pending.acquire()
            await sem.acquire()
            failed = [t for t in tasks if t.done() and t.exception() is not None]
            if failed:
                sem.release()
                pending.release()
                break
            tasks.append(asyncio.create_task(one(index)))
        await asyncio.gather(*tasks)
        if await asyncio.to_thread(source.size_now) != size:
            raise InputFileError(CHANGED_SIZE)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if progress is not None and size == 0:
        progress(0, 0)
    return [
        ChunkPlacement(placed[i].chunk_id, "data", i, placed[i].holders)
        for i in range(encoder.chunk_count)
    ]


def _read_and_seal(
    encoder: FileEncoder,
    read_at: Callable[[int, int], bytes],
    index: int,
    chunk_size: int,
    size: int,
) -> tuple[ChunkId, bytes, int]:
    """Read plaintext chunk ``index`` with ``read_at(length, offset)`` and seal it.

    Returns:
        Its id, stored bytes and plaintext length.

    Raises:
        InputFileError: the file is shorter than it was when the share started, or reading failed.
    """
    length = min(chunk_size, size - index * chunk_size)
    try:
        plaintext = read_at(length, index * chunk_size)
    except OSError as exc:
        raise InputFileError(f"reading the file failed: {exc.strerror or exc}") from exc
    if len(plaintext) != length:
        raise InputFileError(CHANGED_SIZE)
    chunk_id, sealed = encoder.encode_chunk(index, plaintext)
    return chunk_id, sealed, length
