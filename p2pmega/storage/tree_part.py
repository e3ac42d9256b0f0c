"""fetch's files on disk while a shared folder downloads: one part file per file, one resume state.

Every file of the folder is written into ``ROOT/.p2pmega-part/<n>`` (n counts the files in listing order; mode
0600, created at its full size) and ``ROOT/.p2pmega-part/state`` is the resume state of docs/FORMAT.md section 7
over the whole stream. Nothing is written outside ROOT, and nothing at a listed path until every chunk is in:
then the directories are made and each file is renamed into place. Blocking I/O only: called from worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

from p2pmega.core.magnet import ReadCap
from p2pmega.core.manifest import Manifest
from p2pmega.core.manifest_walk import decrypt_chunk_into
from p2pmega.core.tree import RESERVED_NAME, Layout, TreeEntry
from p2pmega.errors import OutputExists, UnsafePath
from p2pmega.storage.part_file import ResumeState, umask

STATE_NAME = "state"
_OPEN_FLAGS = os.O_WRONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def inside(root: Path, path: str) -> Path:
    """``root / path``, refused unless it stays under ``root`` once normalised.

    The listing's rules (core.tree.check_path) already forbid ``..`` and absolute paths; this second check
    is on the path as the file system will see it.

    Raises:
        UnsafePath: the normalised path leaves ``root``.
    """
    # Absolute first: a relative root such as "." normalises away, and no path would seem to be under it.
    base = os.path.abspath(root)
    full = os.path.normpath(os.path.join(base, path))
    if full == base or os.path.commonpath([base, full]) != base:
        raise UnsafePath(f"folder entry {path[:80]!r} would land outside the output; refused")
    return Path(full)


def check_targets(root: Path, entries: Sequence[TreeEntry], *, force: bool) -> None:
    """Refuse before downloading if a listed path cannot be written under ``root`` as asked.

    A listed directory must be absent or a real directory (never a symbolic link, which could lead
    outside); a listed file must be absent, or with ``force`` a file or link (the link itself is replaced).

    Raises:
        UnsafePath: a path leaves ``root`` after normalisation.
        OutputExists: something in the way, named.
    """
    for entry in entries:
        target = inside(root, entry.path)
        try:
            info = os.lstat(target)
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            raise OutputExists(f"{str(target)!r}: a parent is not a directory") from None
        if entry.is_dir:
            if not stat.S_ISDIR(info.st_mode):
                raise OutputExists(f"{str(target)!r} exists and is not a directory; move it away")
        elif stat.S_ISDIR(info.st_mode):
            raise OutputExists(f"{str(target)!r} is a directory; the folder has a file there")
        elif not force:
            raise OutputExists(f"{str(target)!r} exists; pass --force to overwrite it")


class TreeResume(ResumeState):
    """The resume state of a folder: valid only if every file's part file has its full size."""

    def __init__(self, staging: Path, root: str, size: int, file_sizes: Sequence[int]) -> None:
        super().__init__(part=staging, state=staging / STATE_NAME, root=root, size=size, done=set())
        self.file_sizes = list(file_sizes)

    def part_matches(self) -> bool:
        """Every part file is there with its file's size (any other state means starting over)."""
        return all(
            os.lstat(self.part / str(i)).st_size == size for i, size in enumerate(self.file_sizes)
        )


class TreeWriter:
    """Scatters each opened chunk's bytes into the part files of the files it covers, from worker threads."""

    def __init__(
        self, root: Path, entries: Sequence[TreeEntry], layout: Layout, chunk_size: int
    ) -> None:
        self.root = root
        self.staging = root / RESERVED_NAME
        self.entries = list(entries)
        self.layout = layout
        self.chunk_size = chunk_size
        self._dirty: set[int] = set()
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        root: Path,
        entries: Sequence[TreeEntry],
        layout: Layout,
        chunk_size: int,
        resume: TreeResume,
    ) -> TreeWriter:
        """Create ROOT and its staging directory; keep the part files if ``resume`` lists chunks.

        Raises:
            OSError: ROOT or a part file cannot be created.
        """
        root.mkdir(parents=True, exist_ok=True)
        staging = root / RESERVED_NAME
        with contextlib.suppress(FileExistsError):
            staging.mkdir(mode=0o700)
        if not staging.is_dir() or staging.is_symlink():
            raise OSError(errno.ENOTDIR, f"{staging} is not a directory")
        writer = cls(root, entries, layout, chunk_size)
        if not resume.done:
            for span in layout.spans:
                fd = os.open(
                    staging / str(span.file),
                    os.O_RDWR
                    | os.O_CREAT
                    | os.O_TRUNC
                    | os.O_CLOEXEC
                    | getattr(os, "O_NOFOLLOW", 0),
                    0o600,
                )
                try:
                    os.ftruncate(fd, span.size)
                finally:
                    os.close(fd)
        return writer

    def write_chunk(
        self, cap: ReadCap, manifest: Manifest, index: int, data: bytes | memoryview, offset: int
    ) -> int:
        """Open chunk ``index`` and write its files' bytes; return how many stream bytes it held.

        Raises:
            IntegrityError: the chunk does not open at its place (as decrypt_chunk).
            OSError: a part file cannot be written.
        """
        out = bytearray(self.chunk_size)
        length = decrypt_chunk_into(cap, manifest, index, data, out, id_verified=True)
        with memoryview(out) as view:
            self.write_plain(offset, view[:length])
        return length

    def write_plain(self, offset: int, plain: bytes | memoryview) -> None:
        """Write the file bytes among stream bytes ``plain`` starting at stream ``offset``.

        Raises:
            OSError: a part file cannot be written.
        """
        view = memoryview(plain) if isinstance(plain, bytes) else plain
        for file, at, start, length in self.layout.segments(offset, len(plain)):
            fd = os.open(self.staging / str(file), _OPEN_FLAGS)
            try:
                piece = view[start : start + length]
                while piece:
                    written = os.pwrite(fd, piece, at)
                    piece, at = piece[written:], at + written
            finally:
                os.close(fd)
            with self._lock:
                self._dirty.add(file)

    def save(self, resume: ResumeState, done: frozenset[int]) -> None:
        """Make the files written since the last save durable, then record ``done``."""
        resume.save_after(self._sync, done)

    def _sync(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for file in sorted(dirty):
            fd = os.open(self.staging / str(file), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def finish(self, resume: ResumeState, target: Path) -> None:
        """Make the listed directories, move every finished file to its path, remove the staging directory.

        Raises:
            UnsafePath: a path leaves ROOT after normalisation.
            OutputExists: a directory's place is taken by something else (a link is never followed).
            OSError: a directory or rename fails.
        """
        mode = 0o666 & ~umask()
        self._sync()
        file = 0
        for entry in self.entries:
            path = inside(self.root, entry.path)
            if entry.is_dir:
                with contextlib.suppress(FileExistsError):
                    path.mkdir()
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    raise OutputExists(f"{str(path)!r} exists and is not a directory; move it away")
                continue
            part = self.staging / str(file)
            file += 1
            os.chmod(part, mode)
            os.replace(part, path)
        with contextlib.suppress(FileNotFoundError):
            resume.state.unlink()
        shutil.rmtree(self.staging, ignore_errors=True)

    def close(self) -> None:
        """Nothing stays open between writes; present so fetch treats every writer alike."""
