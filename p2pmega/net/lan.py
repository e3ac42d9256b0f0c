"""LAN discovery: find peers on the same broadcast domain with no bootstrap node (asyncio-dgram).

Modelled on BitTorrent's BEP 14 Local Service Discovery, over IPv4 broadcast instead of multicast.
It only reports (host, DHT port) pairs to a callback; it never trusts or contacts peers itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import secrets
import socket
from collections.abc import Awaitable, Callable

import asyncio_dgram
from asyncio_dgram.aio import DatagramServer

from p2pmega.core.ids import NODE_ID_BYTES
from p2pmega.core.lan_codec import (
    COOKIE_BYTES,
    Announcement,
    AnnouncementLimiter,
    Verdict,
    check_source_host,
    decode_announcement,
    encode_announcement,
)
from p2pmega.errors import BadOption, NetworkError, RemoteProtocolError
from p2pmega.net.service import Service

logger = logging.getLogger(__name__)

# BEP 14 uses 6771; a distinct port keeps BitTorrent clients and p2pmega from parsing each other's
# datagrams. It lies below Linux's ephemeral range (32768-60999), so no outgoing socket takes it.
DEFAULT_LSD_PORT = 6772
# Where announcements go when the node's host is on the loopback net, and otherwise.
LOOPBACK_BROADCAST = "127.255.255.255"
LIMITED_BROADCAST = "255.255.255.255"
# A source host may send this many announcements per interval before the rest are dropped. An honest
# node sends one per interval, plus one per min_interval when a newcomer appears; a few nodes may
# share one host (as in tests), so the limit leaves room for them.
MAX_ANNOUNCEMENTS_PER_SOURCE = 16
# Bounds on memory: hosts and peers remembered by the rate limiter, and peers waiting for on_peer.
MAX_TRACKED = 1024
MAX_PENDING_PEERS = 64
# on_peer (the DHT's add_contact, a ping) gets this long before it is abandoned, and this many
# calls run at once, so a few dead peers announced by an attacker cannot hold up honest ones.
ON_PEER_TIMEOUT_S = 10.0
ON_PEER_CONCURRENCY = 4
# Periodic announcements are spread by up to this fraction of the interval so nodes started
# together do not keep broadcasting in lock-step.
JITTER_FRACTION = 0.1

OnPeer = Callable[[str, int], Awaitable[object]]


def default_broadcast_addr(host: str) -> str:
    """The broadcast address announcements from ``host`` go to: 127.255.255.255 for 127.x hosts."""
    if ipaddress.IPv4Address(host) in ipaddress.IPv4Network("127.0.0.0/8"):
        return LOOPBACK_BROADCAST
    return LIMITED_BROADCAST


class LANDiscovery(Service):
    """Broadcast this node's DHT port on the LAN and report peers that do the same.

    Nothing is opened until ``start()``; a node run with ``--no-lan`` simply never starts one.

    Warning:
        Announcements are unauthenticated: any host on the LAN can send them. ``on_peer`` receives
        the datagram's source address (never an address from the payload) and the announced port,
        and must treat the peer as untrusted (the DHT pings it before adding it).
    """

    def __init__(
        self,
        *,
        node_id: bytes,
        host: str,
        dht_port: int,
        on_peer: OnPeer,
        broadcast_addr: str | None = None,
        lsd_port: int = DEFAULT_LSD_PORT,
        interval_s: float = 60.0,
        min_interval_s: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        """Configure discovery; opens nothing.

        Args:
            node_id: this node's 20-byte id (announced; informative only).
            host: this node's IPv4 address; announcements are sent from it.
            dht_port: this node's DHT UDP port, announced to peers.
            on_peer: awaited with (source host, announced port) of each new peer, at most once per
                peer per interval, up to ``ON_PEER_CONCURRENCY`` calls at once; its exceptions
                are logged at DEBUG and ignored.
            broadcast_addr: where to send and listen; None derives it from ``host``.
            lsd_port: the discovery UDP port shared by all nodes; 0 picks a free one (tests).
            interval_s: seconds between periodic announcements, also the rate-limit window.
            min_interval_s: the least time between two announcements, even with ``announce_now``.
            rng: source of jitter (tests pass a seeded one).

        Raises:
            BadOption: a value is out of range or ``host`` is not an IPv4 address.
        """
        if len(node_id) != NODE_ID_BYTES:
            raise BadOption(f"node id must be {NODE_ID_BYTES} bytes, got {len(node_id)}")
        if not 1 <= dht_port <= 0xFFFF:
            raise BadOption(f"DHT port {dht_port} is out of range 1..65535")
        if not 0 <= lsd_port <= 0xFFFF:
            raise BadOption(f"LAN discovery port {lsd_port} is out of range 0..65535")
        if not 0 < min_interval_s <= interval_s:
            raise BadOption(
                f"LAN intervals must satisfy 0 < min ({min_interval_s}) <= interval ({interval_s})"
            )
        try:
            ipaddress.IPv4Address(host)
            if broadcast_addr is not None:
                ipaddress.IPv4Address(broadcast_addr)
        except ValueError:
            raise BadOption(f"LAN discovery needs IPv4 addresses, got {host!r}") from None
        self._node_id = node_id
        self._host = host
        self._dht_port = dht_port
        self._on_peer = on_peer
        self._broadcast_addr = broadcast_addr or default_broadcast_addr(host)
        self._lsd_port = lsd_port
        self._interval_s = interval_s
        self._min_interval_s = min_interval_s
        self._rng = rng or random.Random()  # noqa: S311 - jitter only, not a secret
        # Not a secret either: it only lets us recognise our own datagrams when they loop back.
        self._cookie = secrets.token_bytes(COOKIE_BYTES)
        self._datagram = encode_announcement(
            Announcement(node_id=node_id, dht_port=dht_port, cookie=self._cookie)
        )
        self._limiter = AnnouncementLimiter(
            window_s=interval_s,
            max_per_source=MAX_ANNOUNCEMENTS_PER_SOURCE,
            max_entries=MAX_TRACKED,
        )
        self._pending: asyncio.Queue[tuple[str, int]] = asyncio.Queue(MAX_PENDING_PEERS)
        self._wake = asyncio.Event()
        self._listener: DatagramServer | None = None
        self._sender: DatagramServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self.announcements_sent = 0

    @property
    def lsd_port(self) -> int:
        """The discovery port; after ``start()`` with ``lsd_port=0``, the one picked."""
        return self._lsd_port

    @property
    def broadcast_addr(self) -> str:
        """The address announcements are sent to and received on."""
        return self._broadcast_addr

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._running

    async def start(self) -> None:
        """Open the listening and sending sockets and start announcing.

        Raises:
            NetworkError: a socket could not be opened or bound (suggests --no-lan).
            RuntimeError: already started.
        """
        if self._running or self._tasks:
            raise RuntimeError("LANDiscovery already started")
        listen_sock = send_sock = None
        try:
            listen_sock = _listening_socket(self._broadcast_addr, self._lsd_port)
            self._lsd_port = int(listen_sock.getsockname()[1])
            send_sock = _sending_socket(self._host)
            self._listener = await _stream(listen_sock)
            listen_sock = None  # owned by the stream now
            self._sender = await _stream(send_sock)
            send_sock = None
        except BaseException as exc:
            self._close_streams()
            for sock in (listen_sock, send_sock):
                if sock is not None:
                    sock.close()
            if isinstance(exc, OSError):
                raise NetworkError(
                    f"cannot open LAN discovery on {self._broadcast_addr}:{self._lsd_port} "
                    f"from {self._host}: {exc.strerror}; run with --no-lan"
                ) from exc
            raise
        self._running = True
        self._tasks = [
            asyncio.create_task(self._receive_loop(self._listener), name="lan-receive"),
            asyncio.create_task(self._announce_loop(self._sender), name="lan-announce"),
            *(
                asyncio.create_task(self._report_loop(), name=f"lan-report-{i}")
                for i in range(ON_PEER_CONCURRENCY)
            ),
        ]
        logger.info(
            "LAN discovery on %s:%d announcing %s:%d",
            self._broadcast_addr,
            self._lsd_port,
            self._host,
            self._dht_port,
        )

    async def stop(self) -> None:
        """Stop announcing and close both sockets; safe to call twice or before ``start()``."""
        self._running = False
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._close_streams()
        self._pending = asyncio.Queue(MAX_PENDING_PEERS)
        # A transport closes its socket in a call_soon() callback: let it run, so the port is free
        # when stop() returns.
        await asyncio.sleep(0)

    def announce_now(self) -> None:
        """Announce as soon as ``min_interval_s`` allows (e.g. network change); no-op if stopped."""
        if self._running:
            self._wake.set()

    def _close_streams(self) -> None:
        for stream in (self._listener, self._sender):
            if stream is not None:
                stream.close()
        self._listener = self._sender = None

    async def _announce_loop(self, sender: DatagramServer) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            jitter = self._rng.uniform(-JITTER_FRACTION, JITTER_FRACTION) * self._interval_s
            next_periodic = loop.time() + self._interval_s + jitter
            await self._send_announcement(sender)
            # BEP 14 asks for at most one announce per minute; ours are 42 bytes and stay on the
            # LAN, so we allow one per min_interval_s (1 s by default) to greet newcomers quickly.
            await asyncio.sleep(self._min_interval_s)
            if self._wake.is_set():
                continue
            try:
                async with asyncio.timeout_at(next_periodic):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _send_announcement(self, sender: DatagramServer) -> None:
        try:
            await sender.send(self._datagram, (self._broadcast_addr, self._lsd_port))
        except OSError as exc:
            # A LAN that is briefly down must not stop discovery: log and try at the next interval.
            logger.warning("LAN announcement to %s failed: %s", self._broadcast_addr, exc)
            return
        self.announcements_sent += 1

    async def _receive_loop(self, listener: DatagramServer) -> None:
        while True:
            try:
                data, addr = await listener.recv()
            except asyncio_dgram.TransportClosed:
                return
            except OSError as exc:
                logger.debug("LAN discovery receive error: %s", exc)
                continue
            if isinstance(addr, tuple) and isinstance(addr[0], str):
                self._handle_datagram(data, addr[0])

    def _handle_datagram(self, data: bytes, host: str) -> None:
        try:
            check_source_host(host)
            announcement = decode_announcement(data)
        except RemoteProtocolError as exc:
            logger.debug("dropped LAN datagram from %s: %s", host, exc)
            return
        if announcement.cookie == self._cookie or announcement.node_id == self._node_id:
            return
        port = announcement.dht_port
        if host == self._host and port == self._dht_port:
            return
        verdict = self._limiter.admit(host, port, now=asyncio.get_running_loop().time())
        if verdict is not Verdict.REPORT:
            if verdict is not Verdict.DUPLICATE:
                logger.debug("dropped LAN announcement from %s:%d: %s", host, port, verdict.value)
            return
        try:
            self._pending.put_nowait((host, port))
        except asyncio.QueueFull:
            self._limiter.forget(host, port)
            logger.debug(
                "dropped LAN peer %s:%d: %d peers already pending", host, port, MAX_PENDING_PEERS
            )
            return
        logger.debug("LAN peer %s:%d (node id %s)", host, port, announcement.node_id.hex())
        # Answer a newcomer at once (within min_interval_s) so it need not wait a whole interval.
        self._wake.set()

    async def _report_loop(self) -> None:
        while True:
            host, port = await self._pending.get()
            try:
                async with asyncio.timeout(ON_PEER_TIMEOUT_S):
                    await self._on_peer(host, port)
            except Exception:
                logger.debug("on_peer(%s, %d) failed", host, port, exc_info=True)


async def _stream(sock: socket.socket) -> DatagramServer:
    """Wrap an unconnected socket; from_socket() only returns a client for a connected one."""
    stream = await asyncio_dgram.from_socket(sock)
    if not isinstance(stream, DatagramServer):
        stream.close()
        raise TypeError("LAN discovery sockets must not be connected")
    return stream


def _listening_socket(broadcast_addr: str, port: int) -> socket.socket:
    """A UDP socket bound to the broadcast address itself.

    On Linux a socket bound to a unicast address (127.C.N.1) never receives datagrams sent to
    127.255.255.255; one bound to the broadcast address does. SO_REUSEADDR and SO_REUSEPORT let
    every node on the machine bind the same port, and the kernel gives each a copy of a broadcast.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((broadcast_addr, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _sending_socket(host: str) -> socket.socket:
    """A UDP socket allowed to broadcast, bound to the node's host so peers see the right source."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.bind((host, 0))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
