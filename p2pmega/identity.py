"""The node's long-term Ed25519 identity on disk (``<data dir>/identity.json``, mode 0600).

File format, version 1 (docs/IDENTITY.md): a UTF-8 JSON object ``{"version": 1, "ed25519_seed":
"<standard base64 of the 32-byte seed>"}``. The public key is derived; the DHT node id is derived from
it and the address the node is reached at (``Identity.node_id_at``, core.node_id).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from p2pmega.core import crypto
from p2pmega.core.node_id import node_id_for
from p2pmega.errors import BadOption
from p2pmega.storage.atomic import write_atomically

logger = logging.getLogger(__name__)

IDENTITY_FILE_NAME = "identity.json"
IDENTITY_VERSION = 1
# A version-1 file is about 80 bytes; anything much larger is not ours and is not read into memory.
_MAX_FILE_BYTES = 4096


@dataclass(frozen=True)
class Identity:
    """A node key pair and its address-free key hash.

    ``node_id`` (``crypto.node_id_of``) names the key in logs; the node's DHT id, which peers check,
    is ``node_id_at(ip)``: bound to the key and to the address's /24 (/48).

    Warning:
        ``seed`` is the node's secret signing key: never log it. ``repr()`` leaves it out.
    """

    seed: bytes = field(repr=False)
    public_key: bytes
    node_id: bytes

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Derive the public key and node id of ``seed`` (``crypto.SEED_BYTES`` bytes)."""
        public_key = crypto.public_key_of(seed)
        return cls(seed=seed, public_key=public_key, node_id=crypto.node_id_of(public_key))

    def node_id_at(self, ip: str) -> bytes:
        """The DHT node id of this key at address ``ip`` (core.node_id.node_id_for).

        Raises:
            ValueError: ``ip`` is not an IP address.
        """
        return node_id_for(self.public_key, ip)


def load_or_create_identity(data_dir: Path) -> Identity:
    """Load the node identity from ``data_dir``; create it (dir 0700, file 0600) if absent.

    Creation is atomic and race-free: the key is written to a private temporary file, fsynced and
    hard-linked into place, which fails if another process got there first; the loser then loads
    the winner's key, so concurrent first runs agree on one identity.

    Args:
        data_dir: the node's data directory.

    Returns:
        The identity stored in ``data_dir/identity.json``.

    Raises:
        BadOption: the file is readable by group or others (run ``chmod 600``), is corrupt or of an
            unknown version, or the directory cannot be created or written.
    """
    path = data_dir / IDENTITY_FILE_NAME
    try:
        return _load(path)
    except FileNotFoundError:
        pass
    _make_data_dir(data_dir)
    identity = Identity.from_seed(crypto.new_signing_seed())
    if _create(path, _encode(identity.seed)):
        logger.info("created node identity %s (node id %s)", path, identity.node_id.hex())
        return identity
    # Another process created the file between our load and our link: use its identity.
    return _load(path)


def _encode(seed: bytes) -> bytes:
    text = json.dumps(
        {"version": IDENTITY_VERSION, "ed25519_seed": base64.b64encode(seed).decode("ascii")}
    )
    return text.encode("utf-8") + b"\n"


def _decode(data: bytes, path: Path) -> bytes:
    """The seed stored in ``data``; the messages never quote the file, which holds a secret."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        # Not chained: the decoder's message can quote bytes of the file.
        raise BadOption(
            f"identity file {path} is not valid JSON; move it away to make a new identity"
        ) from None
    if not isinstance(document, dict):
        raise BadOption(
            f"identity file {path} is not a JSON object; move it away to make a new identity"
        )
    version = document.get("version")
    if type(version) is not int:
        raise BadOption(
            f"identity file {path} has no integer version; move it away to make a new identity"
        )
    if version != IDENTITY_VERSION:
        raise BadOption(f"identity file {path} has unsupported version {version}; upgrade p2pmega")
    encoded = document.get("ed25519_seed")
    seed = b""
    if isinstance(encoded, str):
        try:
            seed = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            seed = b""
    if len(seed) != crypto.SEED_BYTES:
        raise BadOption(
            f"identity file {path} has no valid ed25519_seed; move it away to make a new identity"
        )
    return seed


def _load(path: Path) -> Identity:
    """Read and check ``path``. Raises FileNotFoundError if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise BadOption(
            f"cannot open identity file {path}: {exc.strerror}; check --data-dir"
        ) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadOption(f"identity file {path} is not a regular file; move it away")
        # Like ssh with private keys: a key others can read is not secret any more.
        if os.name == "posix" and info.st_mode & 0o077:
            mode = stat.S_IMODE(info.st_mode)
            raise BadOption(
                f"identity file {path} has mode {mode:04o}, open to others; run: chmod 600 {path}"
            )
        data = b""
        while len(data) <= _MAX_FILE_BYTES:
            part = os.read(fd, _MAX_FILE_BYTES + 1 - len(data))
            if not part:
                break
            data += part
    finally:
        os.close(fd)
    if len(data) > _MAX_FILE_BYTES:
        raise BadOption(f"identity file {path} is too large to be an identity; move it away")
    return Identity.from_seed(_decode(data, path))


def _make_data_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise BadOption(
            f"cannot create data dir {data_dir}: {exc.strerror}; check --data-dir"
        ) from exc


def _create(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically with mode 0600; False if ``path`` already exists."""
    try:
        return write_atomically(path, data, exclusive=True)
    except OSError as exc:
        raise BadOption(
            f"cannot write identity file {path}: {exc.strerror}; check --data-dir"
        ) from exc
