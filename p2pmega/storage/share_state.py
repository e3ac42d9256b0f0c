"""A share's resume state on the sharer's disk: its file key, which data chunks are placed where, its links.

Blocking file I/O only (share calls it through ``asyncio.to_thread``); nothing here touches the network.
Layout and rules: docs/FORMAT.md section 8.

Warning:
    The state holds the file key (and, once the share is complete, the read link): it is written with mode
    0600 into a 0700 directory, and neither the key nor the link is ever logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pmega.core.chunking import CHUNK_ID_BYTES, ChunkId
from p2pmega.core.crypto import KEY_BYTES
from p2pmega.core.magnet import parse_link
from p2pmega.core.placement import Candidate
from p2pmega.errors import BadLink, StorageError
from p2pmega.storage.atomic import write_atomically

log = logging.getLogger(__name__)

# 2: each holder records its node id (version 1 states are ignored: the share starts afresh).
STATE_VERSION = 2
SHARES_DIR = "shares"


@dataclass(frozen=True)
class FileIdentity:
    """What makes "the same unchanged file": its resolved path, device and inode, size, and change times.

    ``ctime_ns`` as well as ``mtime_ns``: a program can set a file's mtime back (``touch -d``, ``rsync -t``) but
    not its ctime, which every write moves. A false "changed" only costs a fresh upload; a false "unchanged" would
    mix chunks of two contents, so both are compared.
    """

    path: str
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, resolved: Path, info: os.stat_result) -> FileIdentity:
        return cls(
            path=os.fsdecode(resolved),
            device=info.st_dev,
            inode=info.st_ino,
            size=info.st_size,
            mtime_ns=info.st_mtime_ns,
            ctime_ns=info.st_ctime_ns,
        )


@dataclass(frozen=True)
class PlacedChunk:
    """A chunk confirmed stored, and the holders that confirmed it."""

    chunk_id: ChunkId
    holders: tuple[Candidate, ...]


@dataclass(frozen=True)
class Completed:
    """A finished share: the links it printed, its manifest chunks, the rule they met and when leases end."""

    read_link: str
    keep_link: str
    manifest: tuple[PlacedChunk, ...]
    replicas: int
    min_countries: int
    lease_expires_at: float  # wall-clock seconds (time.time()) when the earliest lease ends


@dataclass
class ShareState:
    """One share of one file. ``chunks`` maps a data chunk's index to where it is confirmed stored."""

    file: FileIdentity
    key: bytes
    chunk_size: int
    chunks: dict[int, PlacedChunk] = field(default_factory=dict)
    completed: Completed | None = None


def state_path(data_dir: Path, resolved: Path) -> Path:
    """Where the state of the share of ``resolved`` lives: one file per path, so a changed file replaces it."""
    digest = hashlib.blake2b(os.fsencode(resolved), digest_size=16).hexdigest()
    return data_dir / SHARES_DIR / f"{digest}.json"


def load_state(path: Path) -> ShareState | None:
    """The state saved at ``path``, or None if there is none or it cannot be used (then the share starts afresh).

    A state of another version, or one that does not decode, is ignored rather than an error: the worst case is
    that the file is uploaded again under a new key.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read share state %s (%s); starting afresh", path, exc.strerror)
        return None
    try:
        return _decode(json.loads(raw))
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("share state %s is not a state this version reads; starting afresh", path)
        return None


def remove_states_of(data_dir: Path, root: str) -> int:
    """Delete every finished share's state whose read link is of file ``root`` (hex); returns how many.

    This is how a forgotten file's key leaves the data dir. A state that does not decode, or is not finished (its
    links, and so its root, do not exist yet), is left alone.

    Raises:
        StorageError: the shares directory cannot be read, or a state cannot be removed.
    """
    shares = data_dir / SHARES_DIR
    removed = 0
    try:
        paths = sorted(shares.glob("*.json"))
        for path in paths:
            try:
                done = _decode(json.loads(path.read_bytes())).completed
                found = None if done is None else parse_link(done.read_link).root.hex()
            except (OSError, ValueError, KeyError, TypeError, AttributeError, BadLink):
                continue
            if found == root:
                path.unlink(missing_ok=True)
                removed += 1
    except OSError as exc:
        raise StorageError(f"cannot remove a share's state in {shares}: {exc.strerror}") from exc
    return removed


def remove_state(data_dir: Path, shared: Path) -> bool:
    """Delete the state of the share of ``shared`` (a file that will not be shared again); False if none.

    Raises:
        StorageError: the state exists but cannot be removed.
    """
    path = state_path(data_dir, shared.resolve())
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageError(f"cannot remove the share's state {path}: {exc.strerror}") from exc
    return True


class StateWriter:
    """Saves a state atomically (tmp + fsync + rename, mode 0600 in a 0700 directory), one save at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # A save cancelled on the event loop keeps running in its thread: the lock keeps two off the disk at once.
        self._lock = threading.Lock()

    def save(self, state: ShareState, chunks: dict[int, PlacedChunk]) -> None:
        """Write ``state`` with ``chunks`` (a snapshot the caller took, while ``state.chunks`` may still grow).

        Raises:
            StorageError: the data dir cannot be written.
        """
        doc = json.dumps(_encode(state, chunks), separators=(",", ":")).encode()
        with self._lock:
            try:
                # The rename need not be durable: after a crash the previous state is still a valid one.
                write_atomically(self.path, doc, fsync_dir=False)
            except OSError as exc:
                raise StorageError(
                    f"cannot save the share's state in {self.path.parent} ({exc.strerror}); "
                    "check --data-dir"
                ) from exc


def _holders_doc(holders: tuple[Candidate, ...]) -> list[list[Any]]:
    return [[h.host, h.port, h.country, h.node_id.hex()] for h in holders]


def _encode(state: ShareState, chunks: dict[int, PlacedChunk]) -> dict[str, Any]:
    done = state.completed
    return {
        "version": STATE_VERSION,
        "file": {
            "path": state.file.path,
            "device": state.file.device,
            "inode": state.file.inode,
            "size": state.file.size,
            "mtime_ns": state.file.mtime_ns,
            "ctime_ns": state.file.ctime_ns,
        },
        "key": state.key.hex(),
        "chunk_size": state.chunk_size,
        "chunks": [
            [index, placed.chunk_id.hex(), _holders_doc(placed.holders)]
            for index, placed in sorted(chunks.items())
        ],
        "completed": None
        if done is None
        else {
            "read_link": done.read_link,
            "keep_link": done.keep_link,
            "replicas": done.replicas,
            "min_countries": done.min_countries,
            "lease_expires_at": done.lease_expires_at,
            "manifest": [[p.chunk_id.hex(), _holders_doc(p.holders)] for p in done.manifest],
        },
    }


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("not a non-negative integer")
    return value


def _signed(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("not an integer")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("not a string")
    return value


def _chunk_id(value: Any) -> ChunkId:
    raw = bytes.fromhex(_str(value))
    if len(raw) != CHUNK_ID_BYTES:
        raise ValueError("chunk id of the wrong length")
    return ChunkId(raw)


def _holder(value: Any) -> Candidate:
    host, port, country, node_id = value
    if country is not None:
        _str(country)
    # Candidate checks the rest (raising ValueError): node id length, address, port range, country code.
    return Candidate(
        node_id=bytes.fromhex(_str(node_id)), host=_str(host), port=_int(port), country=country
    )


def _placed(chunk_id: Any, holders: Any) -> PlacedChunk:
    return PlacedChunk(_chunk_id(chunk_id), tuple(_holder(h) for h in holders))


def _decode(doc: Any) -> ShareState:
    if doc["version"] != STATE_VERSION:
        raise ValueError("another version")
    f = doc["file"]
    key = bytes.fromhex(_str(doc["key"]))
    if len(key) != KEY_BYTES:
        raise ValueError("key of the wrong length")
    chunks = {_int(index): _placed(cid, holders) for index, cid, holders in doc["chunks"]}
    done = doc["completed"]
    completed = None
    if done is not None:
        lease = done["lease_expires_at"]
        if not isinstance(lease, int | float) or isinstance(lease, bool):
            raise ValueError("lease end is not a number")
        completed = Completed(
            read_link=_str(done["read_link"]),
            keep_link=_str(done["keep_link"]),
            manifest=tuple(_placed(cid, holders) for cid, holders in done["manifest"]),
            replicas=_int(done["replicas"]),
            min_countries=_int(done["min_countries"]),
            lease_expires_at=float(lease),
        )
    return ShareState(
        file=FileIdentity(
            path=_str(f["path"]),
            device=_int(f["device"]),
            inode=_int(f["inode"]),
            size=_int(f["size"]),
            mtime_ns=_signed(f["mtime_ns"]),
            ctime_ns=_signed(f["ctime_ns"]),
        ),
        key=key,
        chunk_size=_int(doc["chunk_size"]),
        chunks=chunks,
        completed=completed,
    )
