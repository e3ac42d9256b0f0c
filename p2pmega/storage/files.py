"""The chunk files under a store's root: directory layout, the directory lock and atomic writes.

Plain functions over paths; `ChunkStore` decides when to call them and keeps the index in step.
Layout: docs/STORAGE.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import re
import threading
from pathlib import Path

from p2pmega.core.chunking import ChunkId, short_id
from p2pmega.errors import StorageError

# The whole store logs as p2pmega.storage, as it did when it was one module.
log = logging.getLogger("p2pmega.storage")

LOCK_NAME = "lock"
CHUNKS_DIR = "chunks"
TMP_DIR = "tmp"
TMP_SUFFIX = ".tmp"

# One level of 256 shard directories keeps every directory small (40 files per shard at the default
# quota, 4,000 at a million chunks) and lets all of them be created, and fsynced, once at open.
_SHARDS = tuple(f"{i:02x}" for i in range(256))
_CHUNK_NAME = re.compile(r"[0-9a-f]{64}")

# O_DIRECT wants the buffer, the length and the file offset aligned to the device's logical block;
# 4096 suits every common device (512-byte ones too). os.O_DIRECT exists on Linux only.
DIRECT_ALIGN = 4096
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
# Each writer thread keeps one page-aligned buffer for direct writes, grown in steps of 1 MiB.
_DIRECT_BUFFER_STEP = 1 << 20
_thread_buffers = threading.local()


def lock_root(root: Path) -> int:
    """Create ``root`` and lock it exclusively; the kernel releases the lock even on kill -9.

    Returns:
        The locked file descriptor; closing it releases the lock.

    Raises:
        StorageError: ``root`` cannot be used, or another process holds the lock.
    """
    path = root / LOCK_NAME
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StorageError(
            f"cannot open chunk store {root}: {exc.strerror}; check path and permissions"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise StorageError(
            f"chunk store {root} is in use by another process; stop it or use another "
            "data directory"
        ) from exc
    return fd


def make_dirs(root: Path) -> None:
    """Create ``tmp/``, ``chunks/`` and its 256 shards under ``root``, durably.

    Raises:
        StorageError: A directory cannot be created.
    """
    chunks_dir = root / CHUNKS_DIR
    try:
        (root / TMP_DIR).mkdir(mode=0o700, exist_ok=True)
        chunks_dir.mkdir(mode=0o700, exist_ok=True)
        for shard in _SHARDS:
            (chunks_dir / shard).mkdir(mode=0o700, exist_ok=True)
        fsync_dir(chunks_dir)
        fsync_dir(root)
    except OSError as exc:
        raise StorageError(
            f"cannot create chunk store directories in {root}: {exc.strerror}; "
            "check permissions and free space"
        ) from exc


def chunk_path(chunks_dir: Path, chunk_id: ChunkId) -> Path:
    """Where the file of ``chunk_id`` lives: ``chunks/<first two hex>/<64 hex>``."""
    name = chunk_id.hex()
    return chunks_dir / name[:2] / name


def remove_temp_files(tmp_dir: Path) -> int:
    """Delete every unfinished write in ``tmp_dir``; returns how many there were.

    Raises:
        OSError: ``tmp_dir`` cannot be listed.
    """
    removed = 0
    for entry in os.scandir(tmp_dir):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed += 1
    return removed


def scan_chunk_files(chunks_dir: Path) -> dict[bytes, int]:
    """Size of every well-named chunk file, by id; anything else is logged and left alone.

    Raises:
        OSError: A shard cannot be listed.
    """
    on_disk: dict[bytes, int] = {}
    for shard in _SHARDS:
        for entry in os.scandir(chunks_dir / shard):
            name = entry.name
            if _CHUNK_NAME.fullmatch(name) and name.startswith(shard) and entry.is_file():
                on_disk[bytes.fromhex(name)] = entry.stat().st_size
            else:
                log.warning("ignoring %s: not a chunk file of this store", entry.path)
    return on_disk


def chunk_file(chunks_dir: str, key: bytes) -> str:
    """`chunk_path` as a plain string, for the hot paths (no pathlib objects per chunk)."""
    name = key.hex()
    return f"{chunks_dir}/{name[:2]}/{name}"


def direct_io_works(tmp_dir: str) -> bool:
    """Whether files in ``tmp_dir`` can be written with O_DIRECT (not on tmpfs, nor off Linux)."""
    if not _O_DIRECT:
        return False
    probe = f"{tmp_dir}/direct-io-probe.{os.urandom(6).hex()}{TMP_SUFFIX}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        _write_direct(fd, bytes(DIRECT_ALIGN))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        unlink_quietly(probe)


def write_chunk_file(
    chunks_dir: str,
    tmp_dir: str,
    chunk_id: ChunkId,
    data: bytes | bytearray | memoryview,
    *,
    direct: bool = False,
) -> bool:
    """Write to a temp file, fsync it, rename it into place and fsync the directory.

    With ``direct``, the data goes to the disk with O_DIRECT from an aligned buffer, bypassing the
    page cache (see docs/STORAGE.md for why); a filesystem that refuses it gets an ordinary write.

    Returns:
        Whether the data was written with O_DIRECT (False once the filesystem refused it).

    Raises:
        StorageError: The disk failed; no temp file is left behind.
    """
    name = chunk_id.hex()
    final = chunk_file(chunks_dir, bytes(chunk_id))
    final_dir = os.path.dirname(final)
    # A fresh random name, created exclusively: two writers never share a temp file.
    tmp = f"{tmp_dir}/{name[:16]}.{os.urandom(6).hex()}{TMP_SUFFIX}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(tmp, (flags | _O_DIRECT) if direct else flags, 0o600)
    except OSError as exc:
        if direct and exc.errno == errno.EINVAL:
            write_chunk_file(chunks_dir, tmp_dir, chunk_id, data)
            return False
        raise StorageError(
            f"cannot create a file in {tmp_dir}: {exc.strerror}; check the disk"
        ) from exc
    try:
        try:
            if direct:
                direct = _write_direct_or_not(fd, data)
            else:
                _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        fsync_dir(final_dir)
    except OSError as exc:
        unlink_quietly(tmp)
        raise StorageError(
            f"cannot write chunk {short_id(chunk_id)} ({len(data)} bytes) to {final}: "
            f"{exc.strerror}; check free disk space"
        ) from exc
    except BaseException:
        unlink_quietly(tmp)
        raise
    return direct


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_direct_or_not(fd: int, data: bytes | bytearray | memoryview) -> bool:
    """Write ``data`` to the new file ``fd`` (opened with O_DIRECT); False if it had to fall back."""
    try:
        _write_direct(fd, data)
        return True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    # The filesystem took O_DIRECT at open but refuses the write: start over without it.
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    _write_all(fd, data)
    return False


def _thread_buffer(size: int) -> mmap.mmap:
    """This thread's page-aligned buffer for direct I/O, at least ``size`` bytes (kept between calls).

    Reused, so its pages stay mapped: a fresh buffer per chunk would be fresh pages, the cost direct
    I/O is there to avoid (docs/STORAGE.md).
    """
    buffer: mmap.mmap | None = getattr(_thread_buffers, "buffer", None)
    if buffer is None or len(buffer) < size:
        if buffer is not None:
            buffer.close()
        buffer = mmap.mmap(
            -1, max(_DIRECT_BUFFER_STEP, -(-size // _DIRECT_BUFFER_STEP) * _DIRECT_BUFFER_STEP)
        )
        _thread_buffers.buffer = buffer
    return buffer


def open_chunk_for_read(path: str, *, direct: bool) -> int:
    """Open a chunk file to read it, with O_DIRECT when ``direct`` (see `read_chunk`)."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    return os.open(path, (flags | _O_DIRECT) if direct else flags)


def read_chunk(fd: int, view: memoryview, limit: int | None = None) -> int:
    """Read the file ``fd`` from its start into ``view`` until ``limit`` bytes or the file ends.

    A descriptor opened with O_DIRECT is read by the disk, no page cache page filled (docs/STORAGE.md,
    "Reads"): straight into ``view`` when it starts on a DIRECT_ALIGN boundary and has room for
    ``limit`` rounded up to one (`direct_io_offset` places a view so; ChunkStore.room_offset), otherwise into this thread's
    page-aligned buffer and copied from there. A filesystem that refuses the direct read
    (``EINVAL``) gets an ordinary one.

    Args:
        fd: The open chunk file.
        view: Where the bytes go, from its start. With O_DIRECT, bytes of ``view`` past ``limit``
            (up to the next boundary) may be overwritten too.
        limit: Bytes wanted at most; ``len(view)`` if None.

    Returns:
        The bytes read (at most ``limit``).

    Raises:
        OSError: The read failed.
    """
    want = len(view) if limit is None else limit
    if _O_DIRECT and fcntl.fcntl(fd, fcntl.F_GETFL) & _O_DIRECT:
        try:
            return _read_direct(fd, view, want)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
    with view[:want] as wanted:
        return _read_fully(fd, wanted, 0)


def direct_io_offset(buffer: bytearray, head: int) -> int:
    """The offset in ``buffer`` at which ``head`` bytes end on a DIRECT_ALIGN boundary.

    Data read to ``buffer[offset + head:]`` then goes straight from the disk (`read_chunk`); the
    offset is below DIRECT_ALIGN, so a buffer with 2 * DIRECT_ALIGN bytes to spare has the room.
    """
    return -(_address(buffer) + head) % DIRECT_ALIGN


def _address(buffer: bytearray | memoryview) -> int:
    """Where ``buffer``'s bytes start in memory (a writable, non-empty buffer)."""
    anchor = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # the export it holds would keep a bytearray from being resized


def _read_direct(fd: int, view: memoryview, want: int) -> int:
    padded = -(-want // DIRECT_ALIGN) * DIRECT_ALIGN
    if padded and len(view) >= padded and not view.readonly and _address(view) % DIRECT_ALIGN == 0:
        with view[:padded] as block:
            return min(_read_fully(fd, block, 0), want)
    buffer = _thread_buffer(padded)
    with memoryview(buffer) as whole, whole[:padded] as block:
        got = _read_fully(fd, block, 0)
        got = min(got, want)
        view[:got] = block[:got]
    return got


def _read_fully(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` from ``offset`` until it is full or the file ends; return the bytes read.

    One read mostly does it, but a read may return less than asked without the file having ended
    (network file systems, signals), and a chunk must not be taken for rotten for that. (After a
    short direct read the next offset may be unaligned; the kernel then refuses with ``EINVAL``
    and `read_chunk` reads the rest through the page cache.)
    """
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def _write_direct(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to the empty file ``fd`` with O_DIRECT, then cut the padding off.

    The data is copied into this thread's page-aligned buffer and zero-padded to the alignment;
    ftruncate() then sets the exact length (the caller fsyncs, which makes the length durable).
    """
    size = len(data)
    padded = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
    if not padded:
        return
    buffer = _thread_buffer(padded)
    buffer[:size] = data
    buffer[size:padded] = bytes(padded - size)
    with memoryview(buffer) as view, view[:padded] as block:
        written = os.write(fd, block)
    if written != padded:
        raise OSError(errno.EIO, f"short direct write ({written} of {padded} bytes)")
    if padded != size:
        os.ftruncate(fd, size)


def fsync_dir(path: Path | str) -> None:
    """Make a rename or create in ``path`` durable (POSIX needs the directory itself fsynced)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path | str) -> None:
    """Delete ``path`` if it is there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
