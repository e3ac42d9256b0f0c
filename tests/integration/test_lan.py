"""LAN discovery on loopback: nodes at 127.C.N.1 find each other through 127.255.255.255.

Every test uses its own discovery port (``lsd_port=0`` picks one), so parallel test runs and
real nodes on the default port never hear each other.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncio_dgram
import pytest
from asyncio_dgram.aio import DatagramServer

from p2pmega.core import crypto
from p2pmega.core.lan_codec import Announcement, encode_announcement
from p2pmega.errors import BadOption, NetworkError
from p2pmega.identity import Identity
from p2pmega.net import lan as lan_module
from p2pmega.net.dht import DHTNode
from p2pmega.net.lan import (
    DEFAULT_LSD_PORT,
    LOOPBACK_BROADCAST,
    MAX_ANNOUNCEMENTS_PER_SOURCE,
    LANDiscovery,
    default_broadcast_addr,
)
from tests.conftest import free_port, peer_address

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

BCAST = LOOPBACK_BROADCAST


class Recorder:
    """An on_peer callback that records what it was called with."""

    def __init__(self, fail: bool = False) -> None:
        self.peers: list[tuple[str, int]] = []
        self.fail = fail
        self._changed = asyncio.Event()

    async def __call__(self, host: str, port: int) -> None:
        self.peers.append((host, port))
        self._changed.set()
        if self.fail:
            raise RuntimeError(f"on_peer refuses {host}:{port}")

    async def wait_for_peer(self, peer: tuple[str, int], timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            while peer not in self.peers:
                self._changed.clear()
                await self._changed.wait()

    async def wait_for(self, count: int, timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.peers) < count:
                self._changed.clear()
                await self._changed.wait()


async def marker_reported(recorder: Recorder, lsd_port: int, host: str, port: int) -> None:
    """Send an announcement from ``host`` and wait until on_peer got it.

    A node handles datagrams in the order they arrive, and on loopback a datagram is queued on the
    receiving socket when sendto() returns: once the marker is reported, everything sent before it
    has been handled. "Nothing was reported" is then proven, not hoped for after a sleep.
    """
    async with raw_sender(host) as send:
        send(encode_announcement(Announcement(node_id(99), port, b"\x99" * 8)), lsd_port)
        await recorder.wait_for_peer((host, port))
    assert recorder.peers[-1] == (host, port), "reported after the marker: handled out of order"


def node_id(n: int) -> bytes:
    return bytes([n]) * 20


def make(
    n: int,
    recorder: Recorder,
    *,
    lsd_port: int = 0,
    host: str | None = None,
    interval_s: float = 60.0,
    min_interval_s: float = 0.05,
) -> LANDiscovery:
    host = host or peer_address(n, 1)
    return LANDiscovery(
        node_id=node_id(n),
        host=host,
        dht_port=free_port(host),
        on_peer=recorder,
        lsd_port=lsd_port,
        interval_s=interval_s,
        min_interval_s=min_interval_s,
    )


def exclusive_bind(port: int) -> None:
    """Bind (BCAST, port) without SO_REUSE*: succeeds only if no LAN listener holds the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((BCAST, port))


@asynccontextmanager
async def raw_sender(host: str) -> AsyncIterator[Callable[[bytes, int], None]]:
    """A broadcast-capable socket at ``host``, as an attacker or a foreign program on the LAN."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.bind((host, 0))

    def send(data: bytes, port: int) -> None:
        sock.sendto(data, (BCAST, port))

    try:
        yield send
    finally:
        sock.close()


@asynccontextmanager
async def raw_listener(port: int) -> AsyncIterator[DatagramServer]:
    """A second listener sharing the discovery port, to see what actually goes on the wire."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((BCAST, port))
    stream = await asyncio_dgram.from_socket(sock)
    assert isinstance(stream, DatagramServer)
    try:
        yield stream
    finally:
        stream.close()


async def wait_heard_from(wire: DatagramServer, hosts: set[str], timeout_s: float = 5.0) -> None:
    """Receive on ``wire`` until a datagram from each of ``hosts`` came. A broadcast reaches every
    socket on the port in the one sendto(), so the nodes' listeners have them queued too."""
    async with asyncio.timeout(timeout_s):
        while hosts:
            _, addr = await wire.recv()
            assert isinstance(addr, tuple)
            hosts.discard(addr[0])


async def test_two_nodes_find_each_other_without_bootstrap() -> None:
    seen_by_a, seen_by_b = Recorder(), Recorder()
    async with make(1, seen_by_a) as a:
        # b starts after a's first announcement went unheard: a must answer b's announcement.
        await asyncio.sleep(0.1)
        async with make(2, seen_by_b, lsd_port=a.lsd_port) as b:
            await seen_by_a.wait_for(1)
            await seen_by_b.wait_for(1)
            assert seen_by_a.peers == [(peer_address(2, 1), b._dht_port)]
            assert seen_by_b.peers == [(peer_address(1, 1), a._dht_port)]
            # Both intervals are 60 s: more announcements in the next moments must not re-report.
            async with raw_listener(a.lsd_port) as wire:
                a.announce_now()
                b.announce_now()
                await wait_heard_from(wire, {peer_address(1, 1), peer_address(2, 1)})
            # Each re-announcement is on the other's socket; a marker sent after it is handled after.
            marker = peer_address(2, 9)
            await marker_reported(seen_by_a, a.lsd_port, marker, 4999)
            await marker_reported(seen_by_b, b.lsd_port, marker, 4999)
            assert seen_by_a.peers == [(peer_address(2, 1), b._dht_port), (marker, 4999)]
            assert seen_by_b.peers == [(peer_address(1, 1), a._dht_port), (marker, 4999)]


async def test_three_nodes_on_one_host_share_the_port() -> None:
    host = peer_address(3, 1)
    recorders = [Recorder() for _ in range(3)]
    first = make(3, recorders[0], host=host)
    async with first:
        others = [make(3 + i, recorders[i], host=host, lsd_port=first.lsd_port) for i in (1, 2)]
        async with others[0], others[1]:
            for recorder in recorders:
                await recorder.wait_for(2)
            nodes = [first, *others]
            for i, recorder in enumerate(recorders):
                expected = {(host, n._dht_port) for j, n in enumerate(nodes) if j != i}
                assert set(recorder.peers) == expected


async def test_own_announcements_are_ignored() -> None:
    recorder = Recorder()
    async with make(4, recorder) as node, raw_listener(node.lsd_port) as wire:
        for _ in range(3):
            node.announce_now()
            async with asyncio.timeout(5):
                data, addr = await wire.recv()
            # The announcement really went out, from the node's own address ...
            assert isinstance(addr, tuple)
            assert addr[0] == peer_address(4, 1)
            assert data[11] == 1
            assert data[12:32] == node_id(4)
            assert int.from_bytes(data[32:34], "big") == node._dht_port
        # ... and the node's own listener heard it too (before a marker sent after it), but did
        # not report itself.
        await marker_reported(recorder, node.lsd_port, peer_address(4, 9), 4999)
        assert node.announcements_sent >= 3
        assert recorder.peers == [(peer_address(4, 9), 4999)]


async def test_malformed_datagrams_are_dropped_and_discovery_keeps_working(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="p2pmega.net.lan")
    recorder = Recorder()
    good = Announcement(node_id=node_id(9), dht_port=4242, cookie=b"\x01" * 8)
    valid = encode_announcement(good)
    garbage = [
        b"",
        b"BT-SEARCH * HTTP/1.1\r\nHost: 239.192.152.143:6771\r\nPort: 1\r\n\r\n\r\n",
        b"P2PMEGA-LSD",
        b"P2PMEGA-LSD\x02" + valid[12:],
        valid[:-1],
        valid[:20],
        valid + b"\x00",
        valid + b"A" * 1400,
        b"P2PMEGA-LSD\x01" + node_id(9)[:19] + valid[32:],
        b"P2PMEGA-LSD\x01" + node_id(9) + b"\x00\x00" + b"\x01" * 8,
    ]
    async with make(5, recorder) as node, raw_sender(peer_address(6, 1)) as send:
        for data in garbage:
            send(data, node.lsd_port)
        send(valid, node.lsd_port)
        await recorder.wait_for(1)
        assert node.running
    # The peer is the datagram's source address; a payload cannot name another host.
    assert recorder.peers == [(peer_address(6, 1), 4242)]
    dropped = [r for r in caplog.records if r.getMessage().startswith("dropped LAN datagram")]
    assert len(dropped) == len(garbage)
    assert all(peer_address(6, 1) in r.getMessage() for r in dropped)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_flooding_source_is_rate_limited() -> None:
    recorder = Recorder()
    async with make(7, recorder) as node, raw_sender(peer_address(7, 9)) as send:
        for i in range(MAX_ANNOUNCEMENTS_PER_SOURCE * 3):
            # Same port over and over, then many fake ports: both are bounded.
            port = 5000 if i < 10 else 5000 + i
            send(encode_announcement(Announcement(node_id(8), port, b"\x02" * 8)), node.lsd_port)
        # The honest peer's announcement is handled after the whole flood: once it is reported,
        # everything the flood could cause has been reported too.
        await marker_reported(recorder, node.lsd_port, peer_address(7, 8), 6000)
    flooder = [p for p in recorder.peers if p[0] == peer_address(7, 9)]
    assert flooder[0] == (peer_address(7, 9), 5000)
    # 10 repeats of one peer were reported once, and the source's allowance ran out after 16.
    assert len(flooder) == 1 + MAX_ANNOUNCEMENTS_PER_SOURCE - 10
    assert len(set(flooder)) == len(flooder)
    assert (peer_address(7, 8), 6000) in recorder.peers


async def test_on_peer_errors_are_logged_at_debug_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="p2pmega.net.lan")
    recorder = Recorder(fail=True)
    async with make(10, recorder) as node, raw_sender(peer_address(10, 2)) as send:
        send(encode_announcement(Announcement(node_id(1), 7001, b"\x04" * 8)), node.lsd_port)
        await recorder.wait_for(1)
        send(encode_announcement(Announcement(node_id(2), 7002, b"\x05" * 8)), node.lsd_port)
        await recorder.wait_for(2)
    # on_peer raised and was logged in the same step as it recorded the call: no wait needed.
    assert recorder.peers == [(peer_address(10, 2), 7001), (peer_address(10, 2), 7002)]
    failures = [r for r in caplog.records if r.getMessage().startswith("on_peer(")]
    assert [r.levelno for r in failures] == [logging.DEBUG, logging.DEBUG]
    assert failures[0].exc_info is not None
    assert "refuses" in str(failures[0].exc_info[1])


async def test_periodic_announcements_and_min_interval() -> None:
    loop = asyncio.get_running_loop()
    node = make(11, Recorder(), interval_s=0.2, min_interval_s=0.1)
    async with node:
        started = loop.time()
        await asyncio.sleep(1.0)
        elapsed = loop.time() - started
    # One at start, then one per 0.2 s +- 10 % jitter (never closer than 0.18 s).
    assert 3 <= node.announcements_sent <= 1 + elapsed / 0.18
    burst = make(12, Recorder(), interval_s=60.0, min_interval_s=0.25)
    async with burst:
        started = loop.time()
        for _ in range(100):
            burst.announce_now()
            await asyncio.sleep(0.01)
        elapsed = loop.time() - started
    # announce_now() every 10 ms yields only one announcement per min_interval_s.
    assert 3 <= burst.announcements_sent <= 1 + elapsed / 0.25


async def test_switched_off_opens_no_socket_and_stop_releases_it() -> None:
    recorder = Recorder()
    port = free_port(BCAST)
    node = make(13, recorder, lsd_port=port)
    node.announce_now()  # a no-op while not running
    exclusive_bind(port)  # nothing holds the port: constructing opened no socket
    await node.start()
    try:
        assert node.running
        with pytest.raises(OSError, match=r"in use") as info:
            exclusive_bind(port)
        assert info.value.errno == errno.EADDRINUSE
        with pytest.raises(RuntimeError, match=r"already started"):
            await node.start()
    finally:
        await node.stop()
    await node.stop()  # idempotent
    assert [node.running] == [False]
    exclusive_bind(port)
    assert recorder.peers == []


async def test_port_held_exclusively_raises_network_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind((BCAST, 0))
        port = squatter.getsockname()[1]
        node = make(14, Recorder(), lsd_port=port)
        with pytest.raises(NetworkError, match=r"--no-lan") as info:
            await node.start()
        assert f"{BCAST}:{port}" in str(info.value)
        assert not node.running
        await node.stop()


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"node_id": b"short"}, "node id must be 20 bytes"),
        ({"dht_port": 0}, "DHT port 0"),
        ({"dht_port": 70000}, "DHT port 70000"),
        ({"lsd_port": -1}, "discovery port -1"),
        ({"interval_s": 1.0, "min_interval_s": 2.0}, "min"),
        ({"min_interval_s": 0.0}, "min"),
        ({"host": "localhost"}, "IPv4"),
        ({"host": "::1"}, "IPv4"),
        ({"broadcast_addr": "bcast"}, "IPv4"),
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, object], reason: str) -> None:
    args: dict[str, object] = {
        "node_id": node_id(1),
        "host": "127.0.0.1",
        "dht_port": 4000,
        "on_peer": Recorder(),
    }
    args.update(kwargs)
    with pytest.raises(BadOption, match=reason):
        LANDiscovery(**args)  # type: ignore[arg-type]


def test_default_broadcast_address_follows_the_host() -> None:
    assert default_broadcast_addr("127.3.1.1") == "127.255.255.255"
    assert default_broadcast_addr("192.168.1.7") == "255.255.255.255"
    node = LANDiscovery(node_id=node_id(1), host="127.9.9.1", dht_port=1, on_peer=Recorder())
    assert node.broadcast_addr == "127.255.255.255"
    assert node.lsd_port == DEFAULT_LSD_PORT == 6772


def add_contact_then_set(dht: DHTNode, event: asyncio.Event) -> Callable[[str, int], Any]:
    """on_peer as the node wires it (DHTNode.add_contact), plus an event for the test to wait on."""

    async def on_peer(host: str, port: int) -> bool:
        added = await dht.add_contact(host, port)
        if added:
            event.set()
        return added

    return on_peer


async def test_two_dht_nodes_join_each_other_over_the_lan() -> None:
    """The node wires on_peer to DHTNode.add_contact: two DHTs with no bootstrap meet on the LAN."""
    identities = [Identity.from_seed(crypto.new_signing_seed()) for _ in range(2)]
    hosts = [peer_address(21, 1), peer_address(22, 1)]
    ids = [i.node_id_at(h) for i, h in zip(identities, hosts, strict=True)]
    async with (
        DHTNode(host=hosts[0], seed=identities[0].seed, rpc_timeout_s=1.0) as dht_a,
        DHTNode(host=hosts[1], seed=identities[1].seed, rpc_timeout_s=1.0) as dht_b,
    ):
        assert dht_a.contacts() == []
        assert dht_b.contacts() == []
        added = [asyncio.Event(), asyncio.Event()]
        lan_a = LANDiscovery(
            node_id=ids[0],
            host=hosts[0],
            dht_port=dht_a.port,
            on_peer=add_contact_then_set(dht_a, added[0]),
            lsd_port=0,
            min_interval_s=0.05,
        )
        async with lan_a:
            lan_b = LANDiscovery(
                node_id=ids[1],
                host=hosts[1],
                dht_port=dht_b.port,
                on_peer=add_contact_then_set(dht_b, added[1]),
                lsd_port=lan_a.lsd_port,
                min_interval_s=0.05,
            )
            async with lan_b, asyncio.timeout(10):
                await added[0].wait()
                await added[1].wait()
        assert [(p.node_id, p.host, p.port) for p in dht_a.contacts()] == [
            (ids[1], hosts[1], dht_b.port)
        ]
        assert [(p.node_id, p.host, p.port) for p in dht_b.contacts()] == [
            (ids[0], hosts[0], dht_a.port)
        ]


async def test_hanging_on_peer_times_out_and_does_not_block_others(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="p2pmega.net.lan")
    monkeypatch.setattr(lan_module, "ON_PEER_TIMEOUT_S", 0.3)
    calls: list[int] = []
    second = asyncio.Event()
    first_hanging: list[bool] = []  # when the second call came, was the first still waiting?
    hanging = False

    async def on_peer(host: str, port: int) -> None:
        nonlocal hanging
        calls.append(port)
        if port == 7101:
            hanging = True
            try:
                await asyncio.Event().wait()  # a peer that never answers the ping
            finally:
                hanging = False
        first_hanging.append(hanging)
        second.set()

    timed_out = asyncio.Event()

    class OnTimeout(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("on_peer("):
                timed_out.set()

    handler = OnTimeout()
    logging.getLogger("p2pmega.net.lan").addHandler(handler)
    node = LANDiscovery(
        node_id=node_id(15),
        host=peer_address(15, 1),
        dht_port=4000,
        on_peer=on_peer,
        lsd_port=0,
        min_interval_s=0.05,
    )
    try:
        async with node, raw_sender(peer_address(15, 2)) as send:
            send(encode_announcement(Announcement(node_id(1), 7101, b"\x06" * 8)), node.lsd_port)
            send(encode_announcement(Announcement(node_id(2), 7102, b"\x07" * 8)), node.lsd_port)
            async with asyncio.timeout(5):
                await second.wait()
                await timed_out.wait()
    finally:
        logging.getLogger("p2pmega.net.lan").removeHandler(handler)
    # Served while the first call still hung, not after its timeout freed a slot.
    assert first_hanging == [True]
    assert calls == [7101, 7102]
    failures = [r for r in caplog.records if r.getMessage().startswith("on_peer(")]
    assert len(failures) == 1
    assert "7101" in failures[0].getMessage()
    assert failures[0].exc_info is not None
    assert failures[0].exc_info[0] is TimeoutError
