"""The transfer channel's handshake as a sans-I/O state machine: bytes in, bytes out, keys at the end.

Three messages in the shape of Noise XX (``-> e``, ``<- e, ee, s``, ``-> s``) with each static key
proven by an Ed25519 signature over the transcript hash, as TLS 1.3's CertificateVerify does (the
SIGMA-I pattern both follow). Key agreement is libsodium's crypto_kx over ephemeral X25519 keys;
records are AEGIS-256 under counter nonces (records.py). The byte layout and the reasons are in
docs/PROTOCOL.md ("Channel"); tests/vectors/channel_v2.json pins the bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from p2pmega.core import crypto
from p2pmega.core.wire.codec import HEADER, encode_error
from p2pmega.core.wire.events import (
    CONNECTION_REQUEST_ID,
    HEADER_BYTES,
    PREFIX_BYTES,
    PROTOCOL_VERSION,
    Error,
    ErrorCode,
    MessageType,
    Role,
)
from p2pmega.errors import BadSignature, DecryptionFailed, RemoteProtocolError

# Noise names its protocol and hashes the name first (section 5.2), so that no transcript of one
# protocol or version can pass for another's.
PROTOCOL_NAME: Final = b"p2pmega-transfer/2 XX-sig X25519-kx Ed25519 AEGIS256 BLAKE2b"
# Each side signs with its own label: a signature (or a whole message) reflected back to its
# sender proves nothing, because the sender only accepts the other role's label.
_SERVER_LABEL: Final = b"p2pmega-transfer/2 server signature\x00"
_CLIENT_LABEL: Final = b"p2pmega-transfer/2 client signature\x00"
_HANDSHAKE_KEY: Final = b"p2pmega-transfer/2 handshake key"
_RECORD_KEY: Final = b"p2pmega-transfer/2 record key"


class HandshakeType(enum.IntEnum):
    """The type byte of a handshake message (in a frame header, so old peers refuse it cleanly)."""

    CLIENT_HELLO = 0x41  # -> e
    SERVER_HELLO = 0xC1  # <- e, ee, s (+ signature)
    CLIENT_FINISH = 0x42  # -> s (+ signature)


KEY_BYTES: Final = crypto.KX_PUBLIC_KEY_BYTES
_IDENTITY_BYTES: Final = crypto.PUBLIC_KEY_BYTES + crypto.SIGNATURE_BYTES
_SEALED_IDENTITY_BYTES: Final = _IDENTITY_BYTES + crypto.RECORD_TAG_BYTES
CLIENT_HELLO_BYTES: Final = HEADER_BYTES + KEY_BYTES  # 42
SERVER_HELLO_BYTES: Final = HEADER_BYTES + KEY_BYTES + _SEALED_IDENTITY_BYTES  # 170
CLIENT_FINISH_BYTES: Final = HEADER_BYTES + _SEALED_IDENTITY_BYTES  # 138
# Longest handshake-time frame we read: SERVER_HELLO, or an Error frame from a peer that refused
# (1 code byte and at most 256 bytes of text). Anything declaring more is refused from its prefix.
MAX_HANDSHAKE_FRAME_BYTES: Final = HEADER_BYTES + 1 + 256


class HandshakeFailed(RemoteProtocolError):
    """The peer did not complete the handshake; the connection is dead.

    ``peer_version`` is set when the peer speaks another protocol version (it sent a frame of that
    version), ``refused`` when the peer answered with an Error frame (BUSY and the like), and
    ``reply`` holds bytes worth sending before closing (an Error frame an old peer understands).
    """

    def __init__(
        self,
        message: str,
        *,
        peer_version: int | None = None,
        refused: ErrorCode | None = None,
        reply: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.peer_version = peer_version
        self.refused = refused
        self.reply = reply


@dataclass(frozen=True)
class ChannelKeys:
    """What a finished handshake gives: a record key per direction and the peer's proven key."""

    send_key: bytes
    receive_key: bytes
    peer_public_key: bytes
    transcript_hash: bytes


class _State(enum.Enum):
    CLIENT_WAIT_HELLO = enum.auto()
    SERVER_WAIT_HELLO = enum.auto()
    SERVER_WAIT_FINISH = enum.auto()
    DONE = enum.auto()
    FAILED = enum.auto()


def _header(kind: int, body_bytes: int, version: int = PROTOCOL_VERSION) -> bytes:
    return HEADER.pack(HEADER_BYTES - PREFIX_BYTES + body_bytes, version, kind, 0)


class Handshake:
    """One side of the handshake. Feed it what the socket read; send what it returns.

    A client calls `start` for its CLIENT_HELLO, then `receive_data` until `done`; a server only
    calls `receive_data`. Once `done`, `keys` holds the record keys and the peer's proven Ed25519
    key, and `rest` the bytes that arrived after the last handshake message (the first records).
    Any failure raises HandshakeFailed once and for all.
    """

    def __init__(self, *, role: Role, signing_seed: bytes, ephemeral_seed: bytes) -> None:
        """Prepare one handshake.

        Args:
            role: CLIENT on the side that connected.
            signing_seed: Our long-term Ed25519 seed (Identity.seed), or a throwaway one.
            ephemeral_seed: ``crypto.KX_SEED_BYTES`` fresh random bytes, never used twice (a
                parameter so that vectors can fix it).

        Raises:
            ValueError: a seed has the wrong length (a caller bug).
        """
        self.role = role
        self._seed = signing_seed
        self.public_key = crypto.public_key_of(signing_seed)
        self._e_public, self._e_secret = crypto.kx_keypair(ephemeral_seed)
        self._hash = crypto.transcript_hash(PROTOCOL_NAME)
        self._buffer = bytearray()
        self._state = _State.CLIENT_WAIT_HELLO if role is Role.CLIENT else _State.SERVER_WAIT_HELLO
        self._started = False
        self._c2s = self._s2c = b""  # crypto_kx session keys: client-to-server, server-to-client
        self.keys: ChannelKeys | None = None
        self.rest = b""

    @property
    def done(self) -> bool:
        """True once the keys are known and both sides are proven."""
        return self._state is _State.DONE

    def _mix(self, *parts: bytes) -> None:
        self._hash = crypto.transcript_hash(self._hash + b"".join(parts))

    def start(self) -> bytes:
        """The CLIENT_HELLO (client only; call once, before anything is received).

        Returns:
            The bytes to send.

        Raises:
            RuntimeError: called on a server or twice (a caller bug).
        """
        if self.role is not Role.CLIENT or self._started:
            raise RuntimeError("only a client starts a handshake, once")
        self._started = True
        hello = _header(HandshakeType.CLIENT_HELLO, KEY_BYTES) + self._e_public
        self._mix(hello)
        return hello

    def receive_data(self, data: bytes | bytearray | memoryview) -> bytes:
        """Take bytes from the peer (``b""``: the peer closed) and return what to send back.

        Returns:
            Bytes to send now (possibly empty).

        Raises:
            HandshakeFailed: the peer sent something other than the next valid message, closed,
                or speaks another version. Every later call raises it again.
            RuntimeError: a client that has not called `start` (a caller bug).
        """
        if self._state is _State.FAILED:
            raise HandshakeFailed("the handshake already failed")
        if self.role is Role.CLIENT and not self._started:
            raise RuntimeError("call start() before receiving")
        if self._state is _State.DONE:
            self.rest += bytes(data)
            return b""
        if not data:
            self._state = _State.FAILED
            raise HandshakeFailed("the peer closed the connection during the handshake")
        self._buffer += data
        out = []
        try:
            while not self.done:
                message = self._next_message()
                if message is None:
                    break
                out.append(self._handle(message))
        except HandshakeFailed:
            self._state = _State.FAILED
            self._buffer.clear()
            raise
        if self.done:
            self.rest, self._buffer = bytes(self._buffer), bytearray()
        return b"".join(out)

    def _next_message(self) -> bytes | None:
        buffer = self._buffer
        if len(buffer) < PREFIX_BYTES + 1:
            return None
        length = int.from_bytes(buffer[:PREFIX_BYTES], "big")
        version = buffer[PREFIX_BYTES]
        if version != PROTOCOL_VERSION:
            raise self._other_version(version)
        if not HEADER_BYTES - PREFIX_BYTES <= length <= MAX_HANDSHAKE_FRAME_BYTES - PREFIX_BYTES:
            raise HandshakeFailed(f"handshake frame of {length + PREFIX_BYTES} bytes")
        end = PREFIX_BYTES + length
        if len(buffer) < end:
            return None
        message = bytes(buffer[:end])
        del buffer[:end]
        return message

    def _other_version(self, version: int) -> HandshakeFailed:
        reply = b""
        if self.role is Role.SERVER and 1 <= version < PROTOCOL_VERSION:
            # An older client sent a request frame of its own version: answer in that version, which it
            # parses, with the code that says why (docs/PROTOCOL.md, "Versioning").
            body, _ = encode_error(
                Error(
                    CONNECTION_REQUEST_ID,
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"this holder speaks transfer protocol version {PROTOCOL_VERSION}; upgrade p2pmega",
                )
            )
            reply = _header(MessageType.ERROR, len(body), version) + body
        return HandshakeFailed(
            f"the peer speaks transfer protocol version {version}, we speak {PROTOCOL_VERSION}",
            peer_version=version,
            reply=reply,
        )

    def _handle(self, message: bytes) -> bytes:
        _, _, kind, request_id = HEADER.unpack_from(message)
        if kind == MessageType.ERROR and self.role is Role.CLIENT:
            code = message[HEADER_BYTES] if len(message) > HEADER_BYTES else 0
            try:
                refused = ErrorCode(code)
            except ValueError:
                refused = ErrorCode.BAD_REQUEST
            raise HandshakeFailed(
                f"the peer refused the connection: {refused.name}", refused=refused
            )
        expected = {
            _State.CLIENT_WAIT_HELLO: HandshakeType.SERVER_HELLO,
            _State.SERVER_WAIT_HELLO: HandshakeType.CLIENT_HELLO,
            _State.SERVER_WAIT_FINISH: HandshakeType.CLIENT_FINISH,
        }[self._state]
        sizes = {
            HandshakeType.SERVER_HELLO: SERVER_HELLO_BYTES,
            HandshakeType.CLIENT_HELLO: CLIENT_HELLO_BYTES,
            HandshakeType.CLIENT_FINISH: CLIENT_FINISH_BYTES,
        }
        if kind != expected or request_id != 0 or len(message) != sizes[expected]:
            raise HandshakeFailed(f"expected {expected.name}, got a frame of type {kind:#04x}")
        if expected is HandshakeType.CLIENT_HELLO:
            return self._on_client_hello(message)
        if expected is HandshakeType.SERVER_HELLO:
            return self._on_server_hello(message)
        return self._on_client_finish(message)

    # -- the three messages --------------------------------------------------------------------------

    def _exchange(self, peer_e_public: bytes) -> None:
        if peer_e_public == self._e_public:
            # Our own ephemeral key came back: a reflection (or a node talking to itself).
            raise HandshakeFailed("the peer's ephemeral key is ours: reflected handshake")
        try:
            receive, send = crypto.kx_session_keys(
                client=self.role is Role.CLIENT,
                public=self._e_public,
                secret=self._e_secret,
                peer_public=peer_e_public,
            )
        except DecryptionFailed as exc:
            raise HandshakeFailed(str(exc)) from exc
        self._c2s, self._s2c = (send, receive) if self.role is Role.CLIENT else (receive, send)

    def _handshake_key(self, direction_key: bytes) -> bytes:
        return crypto.derive_key(direction_key, _HANDSHAKE_KEY + self._hash)

    def _seal_identity(self, key: bytes, label: bytes, aad: bytes) -> bytes:
        self._mix(self.public_key)
        signature = crypto.sign(self._seed, label + self._hash)
        self._mix(signature)
        sealed = bytearray(_SEALED_IDENTITY_BYTES)
        crypto.seal_record_into(key, 0, self.public_key + signature, aad, sealed)
        return bytes(sealed)

    def _open_identity(self, key: bytes, label: bytes, sealed: bytes, aad: bytes) -> bytes:
        plain = bytearray(_IDENTITY_BYTES)
        try:
            crypto.open_record_into(key, 0, sealed, aad, plain)
        except DecryptionFailed as exc:
            raise HandshakeFailed("handshake message does not authenticate") from exc
        public = bytes(plain[: crypto.PUBLIC_KEY_BYTES])
        signature = bytes(plain[crypto.PUBLIC_KEY_BYTES :])
        self._mix(public)
        try:
            crypto.verify_signature(public, label + self._hash, signature)
        except BadSignature as exc:
            raise HandshakeFailed("the peer's identity signature does not verify") from exc
        self._mix(signature)
        return public

    def _on_client_hello(self, message: bytes) -> bytes:
        self._mix(message)
        self._exchange(message[HEADER_BYTES:])
        head = _header(HandshakeType.SERVER_HELLO, KEY_BYTES + _SEALED_IDENTITY_BYTES)
        plain = head + self._e_public
        self._mix(plain)
        sealed = self._seal_identity(self._handshake_key(self._s2c), _SERVER_LABEL, plain)
        self._state = _State.SERVER_WAIT_FINISH
        return plain + sealed

    def _on_server_hello(self, message: bytes) -> bytes:
        plain = message[: HEADER_BYTES + KEY_BYTES]
        self._exchange(plain[HEADER_BYTES:])
        self._mix(plain)
        peer = self._open_identity(
            self._handshake_key(self._s2c), _SERVER_LABEL, message[len(plain) :], plain
        )
        head = _header(HandshakeType.CLIENT_FINISH, _SEALED_IDENTITY_BYTES)
        finish = head + self._seal_identity(self._handshake_key(self._c2s), _CLIENT_LABEL, head)
        self._finish(peer)
        return finish

    def _on_client_finish(self, message: bytes) -> bytes:
        # The transcript now ends with the server's signature, as it did when the client sealed.
        head = message[:HEADER_BYTES]
        peer = self._open_identity(
            self._handshake_key(self._c2s), _CLIENT_LABEL, message[HEADER_BYTES:], head
        )
        self._finish(peer)
        return b""

    def _finish(self, peer_public_key: bytes) -> None:
        records = _RECORD_KEY + self._hash
        c2s = crypto.derive_key(self._c2s, records)
        s2c = crypto.derive_key(self._s2c, records)
        send, receive = (c2s, s2c) if self.role is Role.CLIENT else (s2c, c2s)
        self.keys = ChannelKeys(send, receive, peer_public_key, self._hash)
        self._c2s = self._s2c = b""
        self._state = _State.DONE
