"""fetch's file on disk while it downloads: the part file and its resume state (docs/FORMAT.md section 7).

Chunks are written into ``.NAME.p2pmega-part`` next to the output (mode 0600 until complete), and
``.NAME.p2pmega-state`` (versioned JSON) records which chunks are already in it, so a rerun after Ctrl-C, a crash
or a network loss downloads only what is missing. Blocking I/O only: fetch calls it through worker threads.
"""

from __future__ import annotations

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

from p2pmega.core.magnet import ReadCap
from p2pmega.core.manifest import Manifest
from p2pmega.core.manifest_walk import decrypt_chunk_into
from p2pmega.storage.atomic import write_atomically

log = logging.getLogger(__name__)

RESUME_VERSION = 1
PART_SUFFIX = ".p2pmega-part"
STATE_SUFFIX = ".p2pmega-state"
# O_DIRECT needs buffer addresses, offsets and lengths aligned to the device's logical block (<= 4 KiB).
DIRECT_IO_ALIGN = 4096
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)


@dataclass
class ResumeState:
    """Which chunks of ``root`` (``size`` bytes) are already in ``part``; saved next to it as ``state``."""

    part: Path
    state: Path
    root: str
    size: int
    done: set[int]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self) -> None:
        """Read the saved state; one that does not match this file (or does not decode) is ignored."""
        try:
            raw = json.loads(self.state.read_text("utf-8"))
            if (
                raw.get("version") != RESUME_VERSION
                or raw.get("root") != self.root
                or raw.get("size") != self.size
                or not self.part_matches()
            ):
                return
            bitmap = base64.b64decode(raw["done"], validate=True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return
        self.done = {i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1}

    def part_matches(self) -> bool:
        """Whether the part file can hold what the state lists: it has exactly ``size`` bytes.

        Raises:
            OSError: the part file cannot be examined.
        """
        return self.part.stat().st_size == self.size

    def save(self, fd: int, done: frozenset[int]) -> None:
        """Record ``done`` (a snapshot taken on the event loop, where ``self.done`` keeps growing)."""
        self.save_after(functools.partial(os.fsync, fd), done)

    def save_after(self, sync: Callable[[], None], done: frozenset[int]) -> None:
        """Record ``done`` once ``sync()`` has made the chunks it lists durable."""
        # A worker cancelled mid-save leaves its thread running; the lock keeps two saves off one temp file.
        with self.lock:
            # The data must be on disk before the state claims it is.
            sync()
            self._write(done)

    def _write(self, done: frozenset[int]) -> None:
        bitmap = bytearray((max(done, default=-1) + 8) // 8)
        for i in done:
            bitmap[i // 8] |= 1 << (i % 8)
        doc = {
            "version": RESUME_VERSION,
            "root": self.root,
            "size": self.size,
            "done": base64.b64encode(bytes(bitmap)).decode(),
        }
        # No fsyncs: the part file was fsynced above, and a state lost in a crash only means fetching again
        # what it would have listed; fsyncs here would cost every 16 chunks two disk flushes.
        write_atomically(self.state, json.dumps(doc).encode(), fsync=False, fsync_dir=False)


class PartWriter:
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
    def open(cls, part: Path, size: int, chunk_size: int, resuming: bool) -> PartWriter:
        """Open (create, or with ``resuming`` keep) the part file at its final size.

        Raises:
            OSError: it cannot be created or sized.
        """
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

    def save(self, resume: ResumeState, done: frozenset[int]) -> None:
        """Make the written chunks durable, then record ``done`` in the resume state."""
        resume.save(self.fd, done)

    def finish(self, resume: ResumeState, target: Path) -> None:
        """Give the complete file its final mode and name (`finish_part`)."""
        finish_part(self.fd, resume, target)

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


def umask() -> int:
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


def finish_part(fd: int, resume: ResumeState, target: Path) -> None:
    """Give the complete part file its final mode, make it durable and rename it to ``target``."""
    # The part file is 0600 while incomplete; the finished file gets the mode any new file would.
    os.fchmod(fd, 0o666 & ~umask())
    os.fsync(fd)
    os.replace(resume.part, target)
    with contextlib.suppress(FileNotFoundError):
        resume.state.unlink()
