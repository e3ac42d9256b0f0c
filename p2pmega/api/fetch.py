"""``fetch``: find the holders of a link's chunks, download and verify them in parallel, resume after a crash.

The output appears only when complete: chunks are written into ``.NAME.p2pmega-part`` next to the output, and
``.NAME.p2pmega-state`` (versioned JSON, see docs/FORMAT.md) records which chunks are already in it, so a rerun
after Ctrl-C, a crash or a network loss downloads only what is missing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import functools
import json
import logging
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from p2pmega.api.common import NetSettings, client_node
from p2pmega.core.chunking import format_id
from p2pmega.core.magnet import KeepCap, ReadCap, parse_link
from p2pmega.core.manifest import Manifest, decrypt_chunk_into
from p2pmega.errors import (
    BadLink,
    ChunkUnavailable,
    OutputExists,
    OutputWriteFailed,
    UsageError,
)
from p2pmega.replicate.locator import HolderLocator
from p2pmega.replicate.manifest import walk_manifest

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Chunks downloading at once; spread over every holder, so each holder sees a few requests at a time. Measured
# with 256 MiB from 8 seeds, 2 MiB chunks (3 runs each): 6 -> 0.95-1.00 s, 8 -> 0.80-0.89 s, 10 -> 0.82-0.91 s,
# 12 -> 0.81-1.03 s, 16 -> 0.91-1.20 s. (With 1 MiB chunks 16 was best: about the same bytes in flight.)
FETCH_CONCURRENCY = 8
# The resume state is written after at most this many newly finished chunks (and on any exit).
STATE_SAVE_EVERY = 16
STATE_VERSION = 1
PART_SUFFIX = ".p2pmega-part"
STATE_SUFFIX = ".p2pmega-state"
# O_DIRECT needs buffer addresses, offsets and lengths aligned to the device's logical block (<= 4 KiB).
DIRECT_IO_ALIGN = 4096
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FetchResult:
    path: Path
    size: int
    chunks_total: int
    chunks_fetched: int
    chunks_resumed: int


def safe_name(name: str | None, fallback: str) -> str:
    """The manifest's name made safe as a single file name: no separators, no ``..``, no control characters."""
    cleaned = "".join(ch for ch in (name or "") if ch.isprintable() and ch not in "/\\\x00")
    cleaned = cleaned.strip().lstrip(".").strip()
    return cleaned[:255] or fallback


async def fetch(
    link: str,
    *,
    net: NetSettings,
    output: Path | None = None,
    cwd: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    on_part: Callable[[Path], None] | None = None,
) -> FetchResult:
    """Download the file of a read link, verified chunk by chunk, to ``output`` (or cwd/NAME).

    An ``output`` that is a symbolic link is written through: the file it names is replaced, never the link.
    The finished file gets the mode any new file gets (0666 less the umask). ``on_part`` is told the path of
    the partial file once it exists (the CLI names it when interrupted).

    Raises:
        BadLink: the link is malformed or is a keep-alive link.
        OutputExists: the output exists and ``force`` is false.
        ManifestNotFound, ChunkUnavailable: no reachable holder has what is needed.
        IntegrityError: data that no holder can provide intact.
    """
    cap = parse_link(link)
    if isinstance(cap, KeepCap):
        raise BadLink("this is a keep-alive link: it can check and keep a file alive, not fetch it")
    if output is not None and not force and await asyncio.to_thread(_is_existing_file, output):
        raise OutputExists(f"{str(output)!r} exists; pass --force to overwrite it")
    async with client_node(net, hints=cap.peers) as node:
        locator = HolderLocator(node, hints=cap.peers)
        manifest = await walk_manifest(locator, cap)
        target = await asyncio.to_thread(_target, output, cwd or Path.cwd(), manifest, cap)
        if not force and await asyncio.to_thread(target.exists):
            raise OutputExists(f"{str(target)!r} exists; pass --force to overwrite it")
        return await _download(locator, cap, manifest, target, progress, on_part)


def _is_existing_file(path: Path) -> bool:
    return path.exists() and not path.is_dir()


def _target(output: Path | None, cwd: Path, manifest: Manifest, cap: ReadCap) -> Path:
    name = safe_name(manifest.name, fallback=f"p2pmega-{format_id(cap.root)[:16]}")
    if output is None:
        target = cwd / name
    elif output.is_dir():
        target = output / name
    else:
        target = output
    # A link (given with -o, or met at ./NAME) means the file it names: write through it, keep the link.
    return target.resolve() if target.is_symlink() else target


@dataclass
class _Resume:
    part: Path
    state: Path
    root: str
    size: int
    done: set[int]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self) -> None:
        try:
            raw = json.loads(self.state.read_text("utf-8"))
            if (
                raw.get("version") != STATE_VERSION
                or raw.get("root") != self.root
                or raw.get("size") != self.size
                or self.part.stat().st_size != self.size
            ):
                return
            bitmap = base64.b64decode(raw["done"], validate=True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return
        self.done = {i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1}

    def save(self, fd: int, done: frozenset[int]) -> None:
        """Record ``done`` (a snapshot taken on the event loop, where ``self.done`` keeps growing)."""
        # A worker cancelled mid-save leaves its thread running; the lock keeps two saves off one temp file.
        with self.lock:
            self._save(fd, done)

    def _save(self, fd: int, done: frozenset[int]) -> None:
        # The data must be on disk before the state claims it is.
        os.fsync(fd)
        bitmap = bytearray((max(done, default=-1) + 8) // 8)
        for i in done:
            bitmap[i // 8] |= 1 << (i % 8)
        doc = {
            "version": STATE_VERSION,
            "root": self.root,
            "size": self.size,
            "done": base64.b64encode(bytes(bitmap)).decode(),
        }
        tmp = self.state.with_name(self.state.name + ".tmp")
        tmp.write_text(json.dumps(doc), "utf-8")
        os.replace(tmp, self.state)


async def _download(
    locator: HolderLocator,
    cap: ReadCap,
    manifest: Manifest,
    target: Path,
    progress: Progress | None,
    on_part: Callable[[Path], None] | None = None,
) -> FetchResult:
    size = manifest.size or 0
    chunk_size = manifest.chunk_size or 1
    ids = manifest.chunk_ids
    resume = _Resume(
        part=target.with_name(f".{target.name}{PART_SUFFIX}"),
        state=target.with_name(f".{target.name}{STATE_SUFFIX}"),
        root=cap.root.hex(),
        size=size,
        done=set(),
    )
    try:
        await asyncio.to_thread(resume.load)
        writer = await asyncio.to_thread(
            _PartWriter.open, resume.part, size, chunk_size, bool(resume.done)
        )
    except OSError as exc:
        raise UsageError(f"cannot write next to {str(target)!r}: {exc.strerror}") from exc
    fd = writer.fd
    if on_part is not None:
        on_part(resume.part)
    resumed = len(resume.done)
    todo = [i for i in range(len(ids)) if i not in resume.done]
    done_bytes = sum(min(chunk_size, size - i * chunk_size) for i in resume.done)
    if progress is not None:
        progress(done_bytes, size)
    fetched = 0
    unsaved = 0
    finished = False

    async def on_disk(call: Callable[..., _T], *args: object) -> _T:
        try:
            return await asyncio.to_thread(call, *args)
        except OSError as exc:
            raise _write_failed(target, exc) from exc

    def write(index: int, data: bytes | memoryview) -> int:
        try:
            return writer.write_chunk(cap, manifest, index, data, index * chunk_size)
        except OSError as exc:
            raise _write_failed(target, exc) from exc

    async def save_state() -> None:
        await on_disk(resume.save, fd, frozenset(resume.done))

    try:
        # Learn in one batch per likely holder which chunks each one has, before asking the DHT chunk by chunk.
        await locator.want([ids[i] for i in todo], near=cap.root)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in todo:
            queue.put_nowait(i)

        # The first failure stops every worker from taking a new chunk, but the chunks under way are
        # finished and recorded (a rerun does not fetch them again), then the failure is raised. A chunk
        # no holder has is not such a failure: the others are still fetched (and kept for a rerun), and
        # the missing ones are counted exactly.
        failures: list[Exception] = []
        missing: list[tuple[int, ChunkUnavailable]] = []

        async def worker() -> None:
            try:
                await work()
            except Exception as exc:  # raised below, once every worker has stopped
                failures.append(exc)

        async def work() -> None:
            nonlocal fetched, unsaved, done_bytes
            while not failures and not queue.empty():
                index = queue.get_nowait()
                # The bytes are hash-checked against ids[index], then decrypted (which authenticates
                # them again) and written, all in one worker-thread hop.
                try:
                    written = await locator.fetch_into(
                        ids[index], functools.partial(write, index), spread=index
                    )
                except ChunkUnavailable as exc:
                    missing.append((index, exc))
                    continue
                resume.done.add(index)
                fetched += 1
                unsaved += 1
                done_bytes += written
                if progress is not None:
                    progress(done_bytes, size)
                if unsaved >= STATE_SAVE_EVERY:
                    unsaved = 0
                    await save_state()

        workers = [asyncio.create_task(worker()) for _ in range(min(FETCH_CONCURRENCY, len(todo)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        if failures:
            raise failures[0]
        if missing:
            first = min(missing, key=lambda m: m[0])[1]
            raise _unavailable(len(missing), len(ids), resume, first) from first
        await on_disk(_finish, fd, resume, target)
        finished = True
    finally:
        if not finished:
            with contextlib.suppress(OutputWriteFailed):
                await save_state()
        await asyncio.to_thread(writer.close)
    return FetchResult(target, size, len(ids), fetched, resumed)


def _unavailable(
    missing: int, total: int, resume: _Resume, first: ChunkUnavailable
) -> ChunkUnavailable:
    """The fetch's own word for chunks no holder has: how many, and that what was fetched is kept."""
    return ChunkUnavailable(
        f"{missing} of {total} chunks {'has' if missing == 1 else 'have'} no reachable holder "
        f"({first}); {len(resume.done)} of {total} chunks are saved in {str(resume.part)!r}: "
        "run the same command again later to resume"
    )


def _write_failed(target: Path, exc: OSError) -> OutputWriteFailed:
    return OutputWriteFailed(
        f"cannot write {str(target)!r}: {exc.strerror or exc}; free space and run "
        "the same command again to resume"
    )


class _PartWriter:
    """Writes opened chunks into the part file, from worker threads.

    Each chunk is decrypted straight into one of a few reused, page-aligned buffers (one per write under
    way) and whole chunks are written from there through a second descriptor opened with O_DIRECT: the
    kernel fills no page cache page. On this kind of VM a page cache page the guest has not touched
    lately costs a fault to the host (free pages are reported back to it), so a buffered write of a new
    1 MiB cost 3 ms of CPU, ten times the copy itself, and the writing threads queued on the inode lock
    (docs/STORAGE.md, "Reads"). The final, partial chunk, chunk sizes that are not a multiple of 4 KiB,
    and file systems without O_DIRECT (tmpfs, other systems) go through the ordinary descriptor ``fd``,
    which is also the one fsync and the resume state use.
    """

    def __init__(self, fd: int, direct_fd: int | None, chunk_size: int) -> None:
        self.fd = fd
        self._direct_fd = direct_fd
        self._chunk_size = chunk_size
        self._buffers: list[mmap.mmap] = []
        # Writes under way in worker threads: a cancelled fetch leaves its threads running, and close()
        # must not pull the descriptors from under them (a reused descriptor number would get the bytes).
        self._busy = 0
        self._idle = threading.Condition()
        # Direct descriptors given up on while other writes may still use them; closed by close().
        self._refused: list[int] = []

    @classmethod
    def open(cls, part: Path, size: int, chunk_size: int, resuming: bool) -> _PartWriter:
        fd = _open_part(part, size, resuming)
        direct_fd = None
        if _O_DIRECT and chunk_size % DIRECT_IO_ALIGN == 0:
            try:
                direct_fd = os.open(part, os.O_WRONLY | os.O_CLOEXEC | _O_DIRECT)
            except OSError:  # the file system does not do O_DIRECT: buffered it is
                direct_fd = None
        return cls(fd, direct_fd, chunk_size)

    def write_chunk(
        self, cap: ReadCap, manifest: Manifest, index: int, data: bytes | memoryview, offset: int
    ) -> int:
        """Decrypt chunk ``index`` into a buffer and write it at ``offset``; return the file bytes it held."""
        with self._idle:
            if self.fd < 0:
                raise OSError(errno.EBADF, "the part file is closed")
            self._busy += 1
            buffer = self._buffers.pop() if self._buffers else mmap.mmap(-1, self._chunk_size)
        try:
            with memoryview(buffer) as view:
                length = decrypt_chunk_into(cap, manifest, index, data, view, id_verified=True)
                self._write(view[:length], offset)
            return length
        finally:
            with self._idle:
                self._buffers.append(buffer)
                self._busy -= 1
                self._idle.notify_all()

    def _write(self, view: memoryview, offset: int) -> None:
        direct_fd = self._direct_fd
        if direct_fd is not None and len(view) == self._chunk_size:
            try:
                _pwrite_all(direct_fd, view, offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # Opened, but this file system refuses O_DIRECT writes: stop trying (close() closes it).
                log.debug("O_DIRECT write refused (%s); writing through the page cache", exc)
                with self._idle:
                    self._direct_fd = None
                    self._refused.append(direct_fd)
        _pwrite_all(self.fd, view, offset)

    def close(self) -> None:
        """Close the part file once no write is under way (at most one chunk's decrypt and write).

        A write still running after 30 s (a hung disk) keeps the descriptors open until the process
        ends, rather than have its bytes land in whatever file reuses the number.
        """
        with self._idle:
            if not self._idle.wait_for(lambda: self._busy == 0, timeout=30.0):
                log.warning("a write to the part file is still running after 30 s; leaving it open")
                return
            for extra in [self._direct_fd, *self._refused]:
                if extra is not None:
                    os.close(extra)
            self._direct_fd = None
            self._refused.clear()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            # Unmapped when the last reference goes (an exception's traceback may still hold a view).
            self._buffers.clear()


def _open_part(part: Path, size: int, resuming: bool) -> int:
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(part, flags if resuming else flags | os.O_TRUNC, 0o600)
    os.ftruncate(fd, size)
    return fd


def _umask() -> int:
    """The process's umask, read without changing it (os.umask can only set it, racing other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(
        0o077
    )  # no /proc: set and restore; a file created meanwhile would only be stricter
    os.umask(mask)
    return mask


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _finish(fd: int, resume: _Resume, target: Path) -> None:
    # The part file is 0600 while incomplete; the finished file gets the mode any new file would.
    os.fchmod(fd, 0o666 & ~_umask())
    os.fsync(fd)
    os.replace(resume.part, target)
    with contextlib.suppress(FileNotFoundError):
        resume.state.unlink()
