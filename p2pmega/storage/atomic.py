"""Small files replaced (or created) atomically and durably: identity, share state, link list, fetch resume state.

The one recipe for every such file: write a fresh temporary file in the same directory (O_EXCL, so two writers
never share one, with the final mode from the start, so a secret is never in a file others could open), fsync
it, rename it over the old file (or link it, to create only if absent), fsync the directory.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomically(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o600,
    dir_mode: int = 0o700,
    exclusive: bool = False,
    fsync: bool = True,
    fsync_dir: bool = True,
) -> bool:
    """Put ``data`` at ``path`` so a crash leaves the old file or the new one, never a mix.

    Args:
        path: the file.
        data: its new contents.
        mode: the file's mode (0600: the files written this way hold keys or links).
        dir_mode: the mode of the parent directory if it has to be created.
        exclusive: create only: if ``path`` exists it is left alone and False returned (``link()`` never
            replaces a file, unlike ``rename()``: of two creators, one wins).
        fsync: make the data durable before the rename (without it a crash may leave the old file or an
            empty one: for a file whose loss costs only redone work, such as fetch's resume state).
        fsync_dir: make the rename itself durable (without it a crash may bring the previous file back).

    Returns:
        True once written; False only with ``exclusive`` when the file already existed.

    Raises:
        OSError: the directory or the file cannot be written (the caller words it for its own file).
    """
    path.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync_dir:
        _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    """Make the new directory entry durable (POSIX only: other systems cannot open a directory)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
