"""Read links and keep-alive links: the ReadCap/KeepCap values and their strict text form.

Grammar and golden vectors: docs/FORMAT.md section "Links". No network, no manifest decoding here.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import unicodedata
import urllib.parse
from dataclasses import dataclass, field

from p2pmega.core import crypto
from p2pmega.core.chunking import CHUNK_ID_BYTES, MAX_NAME_BYTES, PURPOSE_VERIFY, ChunkId
from p2pmega.errors import BadLink

PREFIX = "magnet:?"
READ_URN = "urn:p2pmega:"
KEEP_URN = "urn:p2pmega-keep:"
# The longest valid link: a 1024-byte name percent-encodes to 3072 characters, 16 IPv6 peer hints
# take about 850, ids and keys about 200; 8 KiB leaves slack while refusing pasted garbage early.
MAX_LINK_CHARS = 8192
MAX_PEERS = 16
MAX_SIZE = (1 << 64) - 1
_B32_ID_CHARS = 52  # 32 bytes in unpadded base32
_B64_KEY_CHARS = 43  # 32 bytes in unpadded base64url
_DN_RE = re.compile(r"(?:[A-Za-z0-9._~-]|%[0-9A-Fa-f]{2})*")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")
_DECIMAL_RE = re.compile(r"0|[1-9][0-9]{0,19}")
_PORT_RE = re.compile(r"[1-9][0-9]{0,4}")
_FIELDS_READ = frozenset({"xt", "x.key", "dn", "xl", "x.pe"})
_FIELDS_KEEP = frozenset({"xt", "x.vk", "x.pe"})

Peer = tuple[str, int]


def _check_peer(peer: Peer) -> None:
    host, port = peer
    if not 1 <= port <= 65535:
        raise ValueError(f"peer port {port} is outside 1-65535")
    address = ipaddress.ip_address(host)
    if str(address) != host or getattr(address, "scope_id", None):
        raise ValueError(f"peer host {host!r} is not a canonical IP literal without a zone")


def _check_name(name: str) -> None:
    if not name:
        raise ValueError("name is empty")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"name is longer than {MAX_NAME_BYTES} bytes of UTF-8")
    if any(unicodedata.category(char) == "Cc" for char in name):
        raise ValueError("name contains a control character")


@dataclass(frozen=True)
class KeepCap:
    """Keep-alive capability: list and verify every chunk of a file, but read nothing."""

    root: ChunkId
    verify_key: bytes = field(repr=False)
    peers: tuple[Peer, ...] = ()

    def __post_init__(self) -> None:
        if len(self.root) != CHUNK_ID_BYTES or len(self.verify_key) != crypto.KEY_BYTES:
            raise ValueError("root id and verify key must both be 32 bytes")
        for peer in self.peers:
            _check_peer(peer)


@dataclass(frozen=True)
class ReadCap:
    """Read capability: fetch and decrypt a file. ``name``/``size``/``peers`` are hints only."""

    root: ChunkId
    key: bytes = field(repr=False)
    name: str | None = None
    size: int | None = None
    peers: tuple[Peer, ...] = ()

    def __post_init__(self) -> None:
        if len(self.root) != CHUNK_ID_BYTES or len(self.key) != crypto.KEY_BYTES:
            raise ValueError("root id and key must both be 32 bytes")
        if self.name is not None:
            _check_name(self.name)
        if self.size is not None and not 0 <= self.size <= MAX_SIZE:
            raise ValueError(f"size {self.size} is outside 0..2**64-1")
        for peer in self.peers:
            _check_peer(peer)

    def keep_cap(self) -> KeepCap:
        """Derive the keep-alive capability (one-way: it cannot give back the key).

        Returns:
            KeepCap with the same root and peer hints.
        """
        return KeepCap(self.root, crypto.derive_key(self.key, PURPOSE_VERIFY), self.peers)


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _format_peer(peer: Peer) -> str:
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_link(cap: ReadCap | KeepCap) -> str:
    """The canonical text form of a capability; `parse_link` gives the same value back.

    Args:
        cap: A read or keep-alive capability.

    Returns:
        ``magnet:?xt=urn:p2pmega:<root>&x.key=<key>[&dn=..][&xl=..][&x.pe=..]*`` or
        ``magnet:?xt=urn:p2pmega-keep:<root>&x.vk=<verify key>[&x.pe=..]*``.
    """
    if isinstance(cap, ReadCap):
        parts = [f"xt={READ_URN}{_b32(cap.root)}", f"x.key={_b64(cap.key)}"]
        if cap.name is not None:
            parts.append(f"dn={urllib.parse.quote(cap.name, safe='')}")
        if cap.size is not None:
            parts.append(f"xl={cap.size}")
    else:
        parts = [f"xt={KEEP_URN}{_b32(cap.root)}", f"x.vk={_b64(cap.verify_key)}"]
    parts.extend(f"x.pe={_format_peer(peer)}" for peer in cap.peers)
    return PREFIX + "&".join(parts)


def _decode_b32_id(text: str) -> ChunkId:
    if len(text) != _B32_ID_CHARS:
        raise BadLink(f"root id is {len(text)} characters, expected {_B32_ID_CHARS} of base32")
    try:
        raw = base64.b32decode(text.upper() + "====")
    except ValueError as exc:
        raise BadLink("root id is not valid base32 (a-z, 2-7); check the link") from exc
    if _b32(raw) != text:
        raise BadLink("root id is not canonical lower-case base32; check the link")
    return ChunkId(raw)


def _decode_b64_key(text: str, what: str) -> bytes:
    # The message names the field but never echoes the value: it is a secret.
    if len(text) != _B64_KEY_CHARS:
        raise BadLink(f"{what} is {len(text)} characters, expected {_B64_KEY_CHARS} of base64url")
    if not _B64URL_RE.fullmatch(text):
        raise BadLink(f"{what} is not valid base64url (A-Z a-z 0-9 - _); check the link")
    raw = base64.urlsafe_b64decode(text + "=")
    if _b64(raw) != text:
        raise BadLink(f"{what} is not canonical base64url; check the link")
    return raw


def _parse_peer(text: str) -> Peer:
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        family = 6
    else:
        host, sep, port_text = text.rpartition(":")
        family = 4
    if not sep or not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
        raise BadLink(f"peer hint {text[:60]!r} is not host:port with port 1-65535")
    try:
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        raise BadLink(f"peer hint {text[:60]!r} is not an IPv4 or [IPv6] literal") from exc
    if address.version != family:
        raise BadLink(f"peer hint {text[:60]!r}: write IPv6 as [address]:port, IPv4 without []")
    if str(address) != host or getattr(address, "scope_id", None):
        raise BadLink(f"peer hint {text[:60]!r} is not a canonical IP literal")
    return host, int(port_text)


def _parse_name(text: str) -> str:
    if not _DN_RE.fullmatch(text):
        raise BadLink("dn has characters that must be percent-encoded, or a bad % escape")
    try:
        name = urllib.parse.unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadLink("dn is not UTF-8 after percent-decoding") from exc
    try:
        _check_name(name)
    except ValueError as exc:
        raise BadLink(f"dn: {exc}") from exc
    return name


def _split_fields(text: str) -> dict[str, list[str]]:
    if len(text) > MAX_LINK_CHARS:
        raise BadLink(f"link is {len(text)} characters, over {MAX_LINK_CHARS}; copy only the link")
    if not text.isascii():
        raise BadLink("link has non-ASCII characters; names must be percent-encoded")
    if not text.startswith(PREFIX):
        raise BadLink(f"link does not start with {PREFIX!r}; expected a p2pmega magnet link")
    fields: dict[str, list[str]] = {}
    for part in text[len(PREFIX) :].split("&"):
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            raise BadLink(f"field {part[:40]!r} is not key=value; check for a stray '&' or junk")
        fields.setdefault(key, []).append(value)
    for key, values in fields.items():
        if len(values) > 1 and key != "x.pe":
            raise BadLink(f"field {key[:40]!r} appears {len(values)} times; it may appear once")
    return fields


def parse_link(text: str) -> ReadCap | KeepCap:
    """Parse a read or keep-alive link, refusing anything not exactly as `format_link` writes it.

    Args:
        text: The link; surrounding whitespace is the caller's to strip.

    Returns:
        ReadCap for ``urn:p2pmega:``, KeepCap for ``urn:p2pmega-keep:``.

    Raises:
        BadLink: Naming the first thing wrong (never the key's value).
    """
    fields = _split_fields(text)
    xt = fields.get("xt", [""])[0]
    if xt.startswith(READ_URN):
        allowed, key_field, root_text = _FIELDS_READ, "x.key", xt[len(READ_URN) :]
    elif xt.startswith(KEEP_URN):
        allowed, key_field, root_text = _FIELDS_KEEP, "x.vk", xt[len(KEEP_URN) :]
    else:
        raise BadLink(f"xt must start with {READ_URN!r} or {KEEP_URN!r}; not a p2pmega link")
    for key in fields:
        if key not in allowed:
            raise BadLink(f"field {key[:40]!r} is not allowed in this kind of link")
    if key_field not in fields:
        raise BadLink(f"link has no {key_field} field; copy the whole link")
    root = _decode_b32_id(root_text)
    key_bytes = _decode_b64_key(fields[key_field][0], key_field)
    peer_texts = fields.get("x.pe", [])
    if len(peer_texts) > MAX_PEERS:
        raise BadLink(f"link has {len(peer_texts)} x.pe peer hints; at most {MAX_PEERS}")
    peers = tuple(_parse_peer(peer) for peer in peer_texts)
    if len(set(peers)) != len(peers):
        raise BadLink("the same x.pe peer hint appears twice")
    if key_field == "x.vk":
        return KeepCap(root, key_bytes, peers)
    name = _parse_name(fields["dn"][0]) if "dn" in fields else None
    size = None
    if "xl" in fields:
        if not _DECIMAL_RE.fullmatch(fields["xl"][0]) or int(fields["xl"][0]) > MAX_SIZE:
            raise BadLink(f"xl {fields['xl'][0][:30]!r} is not a decimal size below 2**64")
        size = int(fields["xl"][0])
    return ReadCap(root, key_bytes, name, size, peers)
