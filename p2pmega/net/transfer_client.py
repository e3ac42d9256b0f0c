"""TransferClient: talks to holders' TransferServers over a pool of pipelined connections.

This module keeps the pool and sends requests over it (``ask``); each connection is a
net.transfer_peer.PeerConnection on the shared pump, typed Error replies become exceptions in
net.wire_errors, and the protocol rules live in p2pmega.core.wire. TransferClient inherits its
calls: the fetch paths from net.transfer_fetch.FetchMixin (fetch, fetch_into, fetch_any,
fetch_any_into) and the others from net.transfer_requests.RequestsMixin (store, has, renew,
renew_signed, leases, space).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Final

from p2pmega import errors
from p2pmega.core.crypto import new_signing_seed
from p2pmega.core.ids import Address
from p2pmega.core.node_id import matches as node_id_matches
from p2pmega.core.node_id import node_id_for
from p2pmega.core.wire import Error, Reply, Request, Role
from p2pmega.net.buffers import BufferPool
from p2pmega.net.channel import channel_layers
from p2pmega.net.pump import LayerStack
from p2pmega.net.service import Service
from p2pmega.net.transfer_fetch import FetchMixin
from p2pmega.net.transfer_peer import PeerConnection
from p2pmega.net.transfer_peer import where as _where
from p2pmega.net.transfer_requests import RequestsMixin
from p2pmega.net.wire_errors import raise_for

# Every transfer module logs as p2pmega.net.transfer, so one logger setting covers the transfer.
log = logging.getLogger("p2pmega.net.transfer")

# The client closes pooled connections idle this long: before the holder's 60 s idle timeout, and
# so that a client that talked to many holders does not keep a receive buffer for each of them.
_POOL_IDLE_S: Final = 20.0
# Holders whose proven node ids a client remembers (a long-lived client, the web app, meets many).
MAX_PROVEN_REMEMBERED: Final = 4096
_POOL_SWEEP_INTERVAL_S: Final = 5.0


class TransferClient(FetchMixin, RequestsMixin, Service):
    """Talks to holders' TransferServers, reusing up to ``max_connections_per_peer`` connections.

    Every fetched chunk is hash-checked (in a thread) before it is returned. ``timeout_s`` is an
    idle timeout: a request fails once its connection moved no data for that long, whatever the
    size of the request (a 2 MiB store takes 17 s alone at 1 Mbit/s). Connecting has its own
    ``connect_timeout_s`` (default: ``timeout_s``).
    """

    def __init__(
        self,
        *,
        local_host: str | None = None,
        timeout_s: float = 10.0,
        connect_timeout_s: float | None = None,
        max_connections_per_peer: int = 4,
        identity_seed: bytes | None = None,
        layers: LayerStack | None = None,
    ) -> None:
        """Make a client; no connection opens before the first request.

        ``identity_seed`` is the Ed25519 seed the holders see proven (a fresh throwaway one if
        None, as for a fetch with no data directory); ``layers`` replaces the authenticated channel
        between each socket and its wire (tests of the wire alone pass net.pump.PlainLayer).
        """
        if connect_timeout_s is None:
            connect_timeout_s = timeout_s
        if timeout_s <= 0 or connect_timeout_s <= 0 or max_connections_per_peer < 1:
            raise ValueError("timeouts must be positive and max_connections_per_peer at least 1")
        self.local_host = local_host
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_connections_per_peer = max_connections_per_peer
        self._layers = layers  # None: the channel (net.channel), made per connection
        self.identity_seed = identity_seed if identity_seed is not None else new_signing_seed()
        # Node ids the caller expects at an address (provider records, contacts): a holder there
        # that proves another key is refused (errors.PeerNotAuthentic).
        self._expected: dict[Address, bytes] = {}
        # The id each holder proved in its last handshake (most recent MAX_PROVEN_REMEMBERED holders).
        self._proven: OrderedDict[Address, bytes] = OrderedDict()
        self._pool: dict[Address, list[PeerConnection]] = {}
        self._opening: dict[Address, asyncio.Lock] = {}
        self._closed = False
        self._next_sweep = 0.0
        self._buffers = BufferPool()
        # What this client cost the network so far (bench/scale.py reports them per chunk): requests sent,
        # and connections opened (each one an authenticated channel handshake).
        self.requests_sent = 0
        self.connections_opened = 0
        # Bytes received from each holder so far, whole replies or not (received_bytes).
        self._received: Counter[Address] = Counter()

    def expect_node_id(self, addr: Address, node_id: bytes) -> None:
        """Refuse a holder at ``addr`` unless its proven key gives ``node_id`` there (core.node_id).

        Applies to connections opened from now on. Only for ids already proven some other way: an id
        from a provider record or a crawl reply is anyone's claim, and would let a liar block an honest holder.
        """
        self._expected[addr] = node_id

    def forget_node_id(self, addr: Address) -> None:
        """Stop expecting a node id at ``addr`` (one set for a single request on someone else's word)."""
        self._expected.pop(addr, None)

    def received_bytes(self, addr: Address) -> int:
        """Bytes received from ``addr`` so far, over all connections, including replies still arriving (back to
        0 once its connections were idle and closed).

        A fetch measures a holder's rate with it long before a 2 MiB reply from a slow holder is complete
        (api/fetch_schedule.py).
        """
        return self._received[addr]

    def proven_node_id(self, addr: Address) -> bytes | None:
        """The node id the holder at ``addr`` proved in its last channel handshake with us, if any."""
        return self._proven.get(addr)

    async def start(self) -> None:
        """Nothing to do: connections open on first use."""

    async def stop(self) -> None:
        """The `Service` name for `close`."""
        await self.close()

    async def close(self) -> None:
        """Close every pooled connection; the client cannot be used afterwards."""
        self._closed = True
        pool, self._pool = self._pool, {}
        for conns in pool.values():
            for peer_conn in conns:
                await peer_conn.close()

    def _sweep(self) -> None:
        """Drop pooled connections idle for _POOL_IDLE_S, at most every _POOL_SWEEP_INTERVAL_S."""
        now = asyncio.get_running_loop().time()
        if now < self._next_sweep:
            return
        self._next_sweep = now + _POOL_SWEEP_INTERVAL_S
        for addr in list(self._pool):
            keep = []
            for peer_conn in self._pool[addr]:
                idle_s = now - peer_conn.last_used
                if not peer_conn.closed and not peer_conn.pending and idle_s > _POOL_IDLE_S:
                    peer_conn.drop()
                if not peer_conn.closed:
                    keep.append(peer_conn)
            if keep:
                self._pool[addr] = keep
                continue
            del self._pool[addr]
            self._received.pop(addr, None)  # a long-lived client meets many holders
            lock = self._opening.get(addr)
            if lock is not None and not lock.locked():
                del self._opening[addr]

    def _idle_or_none(self, addr: Address) -> PeerConnection | None:
        conns = [c for c in self._pool.get(addr, []) if not c.closed]
        self._pool[addr] = conns
        best = min(conns, key=lambda c: len(c.pending), default=None)
        if best is not None and (not best.pending or len(conns) >= self.max_connections_per_peer):
            return best
        return None

    async def _connection(self, addr: Address, *, fresh: bool = False) -> PeerConnection:
        if self._closed:
            raise errors.PeerUnreachable("the transfer client is closed")
        self._sweep()
        found = None if fresh else self._idle_or_none(addr)
        if found is not None:
            return found
        lock = self._opening.setdefault(addr, asyncio.Lock())
        try:
            # One deadline for waiting on another task's connect and for our own: a holder that
            # does not accept costs each request connect_timeout_s, not a multiple of it.
            async with asyncio.timeout(self.connect_timeout_s), lock:
                found = None if fresh else self._idle_or_none(addr)
                if found is not None:
                    return found
                peer_conn = await self._open(addr)
        except TimeoutError:
            raise errors.TransferTimeout(
                f"cannot connect to {_where(addr)} within {self.connect_timeout_s:g}s; "
                "try another holder"
            ) from None
        self._pool.setdefault(addr, []).append(peer_conn)
        return peer_conn

    async def _open(self, addr: Address) -> PeerConnection:
        local = (self.local_host, 0) if self.local_host else None
        loop = asyncio.get_running_loop()
        layers = self._layers
        if layers is None:
            layers = channel_layers(Role.CLIENT, self.identity_seed, self._buffers)
        self.connections_opened += 1
        try:
            _, peer_conn = await loop.create_connection(
                functools.partial(
                    PeerConnection,
                    addr,
                    self._buffers,
                    self.timeout_s,
                    layers=layers,
                    received=self._received,
                ),
                addr[0],
                addr[1],
                local_addr=local,
            )
        except ConnectionRefusedError as exc:
            raise errors.PeerRefused(
                f"cannot connect to {_where(addr)}: nothing listens there; try another holder"
            ) from exc
        except OSError as exc:
            raise errors.PeerUnreachable(
                f"cannot connect to {_where(addr)} ({exc.strerror or exc}); try another holder"
            ) from exc
        try:
            key = await peer_conn.wait_secured()
        except BaseException:
            peer_conn.drop()
            raise
        if key is not None:
            expected = self._expected.get(addr)
            if expected is not None and not node_id_matches(expected, key, addr[0]):
                peer_conn.drop()
                raise errors.PeerNotAuthentic(
                    f"holder {_where(addr)} is not node {expected[:4].hex()}…: it proved another "
                    "key; try another holder"
                )
            peer_conn.node_id = node_id_for(key, addr[0])
            self._proven[addr] = peer_conn.node_id
            self._proven.move_to_end(addr)
            while len(self._proven) > MAX_PROVEN_REMEMBERED:
                self._proven.popitem(last=False)
        return peer_conn

    async def ask(
        self,
        addr: Address,
        event: Callable[[int], Request],
        chunk_id: bytes = b"",
        *,
        drop_on_cancel: bool = False,
    ) -> Reply:
        """Send the request ``event(request_id)`` to ``addr`` and return its reply (also net.forward_requests').

        With ``drop_on_cancel``, cancelling the call resets the connection, so a large request stops going out.

        Raises:
            errors.P2PMegaError: the reply was an Error (the exception net.wire_errors names for it).
            errors.PeerUnreachable: the peer cannot be reached or refused the request.
            errors.TransferTimeout: no data moved for ``timeout_s``, or no connection within
                ``connect_timeout_s``.
        """
        # No deadline around the request: its connection fails it (and every other request on
        # it, and is not reused) once no data moved for timeout_s (PeerConnection.request).
        peer_conn = await self._connection(addr)
        reused = peer_conn.answered > 0
        self.requests_sent += 1
        try:
            reply = await peer_conn.request(event)
        except asyncio.CancelledError:
            if drop_on_cancel:
                # The protocol has no CANCEL: closing the connection is what stops the holder sending a
                # chunk nobody wants (docs/PROTOCOL.md, "Cancelling a request"), and a reset stops the kernel
                # sending what it still holds of ours (an abandoned forward).
                peer_conn.drop(reset=True)
            raise
        except errors.PeerUnreachable:
            if not reused:
                raise
            # The holder may have closed this pooled connection for idleness just as we
            # reused it. Every request is idempotent, so retry once on a fresh one.
            log.debug("pooled connection to %s was dropped; reconnecting", _where(addr))
            peer_conn = await self._connection(addr, fresh=True)
            reply = await peer_conn.request(event)
        if isinstance(reply, Error):
            raise_for(reply, addr, chunk_id)
        return reply
