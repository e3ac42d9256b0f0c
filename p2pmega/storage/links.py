"""The sharer's list of the links it made (``<data-dir>/links.json``), so ``seed --keep-mine`` can keep them alive.

The file holds read links, which carry file keys: it is written atomically with mode 0600 in the data dir (0700),
and never leaves the machine. Format (docs/FORMAT.md, "Link list"): ``{"version": 1, "links": [{"link": ...,
"name": ..., "size": ..., "shared_at": ...}]}``; one entry per file root, the newest link for a root replacing
an older one.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pmega.errors import StorageError
from p2pmega.storage.atomic import write_atomically

LINKS_FILE = "links.json"
LINKS_VERSION = 1
# The list is read whole; far more links than anyone shares from one machine.
MAX_LINKS = 100_000

_lock = threading.Lock()


@dataclass(frozen=True)
class LinkEntry:
    link: str
    root: str  # the file's root id (hex), the entry's key
    name: str | None
    size: int | None
    shared_at: float


def links_path(data_dir: Path) -> Path:
    return data_dir / LINKS_FILE


def load_links(data_dir: Path) -> list[LinkEntry]:
    """The recorded links, oldest first; an absent file is an empty list.

    Raises:
        StorageError: the file cannot be read or is not a link list of a version we know (named).
    """
    path = links_path(data_dir)
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        doc = json.loads(text)
        if doc.get("version") != LINKS_VERSION:
            raise ValueError(f"version {doc.get('version')!r} is not {LINKS_VERSION}")
        entries = [_entry(e) for e in doc["links"][:MAX_LINKS]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StorageError(f"{path} is not a p2pmega link list ({exc}); move it aside") from exc
    return entries


def record_link(data_dir: Path, entry: LinkEntry) -> None:
    """Add ``entry`` (replacing an older entry for the same root), atomically, mode 0600.

    Raises:
        StorageError: the list cannot be read or written.
    """
    with _lock:
        entries = [e for e in load_links(data_dir) if e.root != entry.root]
        entries.append(entry)
        _write(data_dir, entries)


def forget_link(data_dir: Path, root: str) -> bool:
    """Drop the entry of file ``root`` (hex) from the list, atomically; False if it was not there.

    Only the list forgets: holders keep the file's chunks until their leases end.

    Raises:
        StorageError: the list cannot be read or written.
    """
    with _lock:
        entries = load_links(data_dir)
        kept = [e for e in entries if e.root != root]
        if len(kept) == len(entries):
            return False
        _write(data_dir, kept)
        return True


def _write(data_dir: Path, entries: list[LinkEntry]) -> None:
    doc = {"version": LINKS_VERSION, "links": [_doc(e) for e in entries[-MAX_LINKS:]]}
    path = links_path(data_dir)
    try:
        write_atomically(path, (json.dumps(doc, indent=1) + "\n").encode())
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}; check the disk") from exc


def _entry(doc: Any) -> LinkEntry:
    link, root = doc["link"], doc["root"]
    name, size, shared_at = doc.get("name"), doc.get("size"), doc["shared_at"]
    if not (isinstance(link, str) and isinstance(root, str)):
        raise ValueError("link and root must be strings")
    if name is not None and not isinstance(name, str):
        raise ValueError("name must be a string")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise ValueError("size must be a non-negative integer")
    if not isinstance(shared_at, int | float):
        raise ValueError("shared_at must be a number")
    return LinkEntry(link, root, name, size, float(shared_at))


def _doc(entry: LinkEntry) -> dict[str, Any]:
    return {
        "link": entry.link,
        "root": entry.root,
        "name": entry.name,
        "size": entry.size,
        "shared_at": entry.shared_at,
    }
