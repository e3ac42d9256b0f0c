"""Fast when peers are dead (issue 15): lookups follow measured round trips, never wait on a dead node twice, and
a fetch from hinted holders does not wait for the DHT join."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncio_dgram
import pytest
import umsgpack

from p2pmega.api.common import NetSettings
from p2pmega.api.download import FETCH_CONCURRENCY
from p2pmega.api.fetch import _download, fetch
from p2pmega.api.share import share
from p2pmega.core.chunking import chunk_id_of
from p2pmega.core.geo import parse_geo_table
from p2pmega.core.manifest import FileEncoder
from p2pmega.core.wire import (
    NEED_DATA,
    FetchRequest,
    HasReply,
    HasRequest,
    ProtocolViolation,
    Role,
    TransferConnection,
)
from p2pmega.errors import RemoteProtocolError
from p2pmega.net.dht import DHTNode
from p2pmega.net.transfer_client import TransferClient
from p2pmega.node import Node, NodeSettings
from p2pmega.replicate.holder import HolderDuties, holder_node
from p2pmega.replicate.locator import HolderLocator
from p2pmega.replicate.manifest import walk_manifest
from tests.channel_helpers import SecureStream
from tests.chunk_bytes import shaped
from tests.conftest import peer_address
from tests.integration.dht_helpers import FakeKey, parse_request
from tests.integration.test_transfer import holder

pytestmark = pytest.mark.integration

STEP_S = 20.0
SLOW_S = 0.4


# How a fake DHT peer answers one request: the reply payload, or None to stay silent.
Answer = Callable[[str, int], Awaitable[object | None]]


@contextlib.asynccontextmanager
async def fake_dht_peer(host: str, answer: Answer) -> AsyncIterator[tuple[tuple[str, int], bytes]]:
    """A raw UDP DHT peer: ``answer(rpc name, nth request so far)`` gives each reply (each in its own task, so a
    slow answer holds up no other). Yields its address and node id."""
    sock = await asyncio_dgram.bind((host, 0))
    key = FakeKey(host)
    node_id = key.node_id
    tasks: set[asyncio.Task[None]] = set()

    async def reply(data: bytes, addr: Any, nth: int) -> None:
        name, args = parse_request(data)
        # An id_proof is answered when a ping would be (nodes now join by asking for one).
        payload = await answer("ping" if name == "id_proof" else name, nth)
        if payload is not None and name == "id_proof":
            payload = key.proof(args)
        if payload is not None:
            await sock.send(b"\x01" + data[1:21] + umsgpack.packb(payload), addr)

    async def serve() -> None:
        nth = 0
        while True:
            data, addr = await sock.recv()
            if data[:1] == b"\x00":
                task = asyncio.create_task(reply(data, addr, nth))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                nth += 1

    server = asyncio.create_task(serve())
    try:
        yield sock.sockname[:2], node_id
    finally:
        for task in [server, *tasks]:
            task.cancel()
        await asyncio.gather(server, *tasks, return_exceptions=True)
        sock.close()


def slow_peer(host: str, delay_s: float) -> Any:
    """Answers every request correctly, ``delay_s`` late (ping: its id; find_node: nobody)."""
    holder: dict[str, bytes] = {}

    async def answer(name: str, _nth: int) -> object:
        await asyncio.sleep(delay_s)
        return holder["id"] if name == "ping" else []

    return _with_id(fake_dht_peer(host, answer), holder)


def answers_once(host: str) -> Any:
    """Answers its first ping, then never anything again (seized after it joined)."""
    holder: dict[str, bytes] = {}

    async def answer(name: str, nth: int) -> object | None:
        return holder["id"] if name == "ping" and nth == 0 else None

    return _with_id(fake_dht_peer(host, answer), holder)


@contextlib.asynccontextmanager
async def _with_id(
    peer: contextlib.AbstractAsyncContextManager[tuple[tuple[str, int], bytes]],
    holder: dict[str, bytes],
) -> AsyncIterator[tuple[tuple[str, int], bytes]]:
    async with peer as (addr, node_id):
        holder["id"] = node_id
        yield addr, node_id


async def test_a_slow_but_alive_peer_is_waited_for_not_taken_for_dead() -> None:
    async with contextlib.AsyncExitStack() as stack, asyncio.timeout(STEP_S):
        fast = DHTNode(host=peer_address(61, 1))
        me = DHTNode(host=peer_address(61, 2))
        for node in (fast, me):
            await node.start()
            stack.push_async_callback(node.stop)
        slow_addr, slow_id = await stack.enter_async_context(slow_peer(peer_address(61, 3), SLOW_S))
        await me.join([(fast.host, fast.port)])
        for _ in range(30):  # everyone else answers in well under a millisecond
            assert await me.node_id_at(fast.host, fast.port) == fast.node_id
        assert await me.node_id_at(*slow_addr) == slow_id  # answered in 0.4 s: alive
        for _ in range(30):
            await me.node_id_at(fast.host, fast.port)
        proto = me.server._proto()
        assert proto.rtt.stall_after(("127.0.0.9", 1)) < SLOW_S, "the network at large is fast"
        assert proto.rtt.stall_after(slow_addr) >= SLOW_S, "but this peer is known to be slow"
        found = await me.find_peers(os.urandom(20))
        assert slow_id in {p.node_id for p in found}, "a lookup waits for the slow peer's answer"
        assert not proto.suspect(
            next(n for n in proto.router.all_contacts() if n.id == slow_id), 0.0
        )


async def test_a_fetch_from_hinted_holders_does_not_wait_for_the_dht_join(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    geo = parse_geo_table("127.62.0.0/16 DE\n127.63.0.0/16 NZ\n")
    async with contextlib.AsyncExitStack() as stack, asyncio.timeout(STEP_S):
        boot = Node(NodeSettings(host=peer_address(64, 1), data_dir=tmp_path / "boot"))
        await stack.enter_async_context(boot)
        for c in (62, 63):  # two holders: every chunk of the file is on both, the link names them
            node, _ = holder_node(
                NodeSettings(
                    host=peer_address(c, 1),
                    data_dir=tmp_path / f"h{c}",
                    bootstrap=[boot.address],
                    holder=True,
                    geo=geo,
                ),
                HolderDuties(geo=geo, repair=None),
            )
            await stack.enter_async_context(node)
        source = tmp_path / "one.bin"
        source.write_bytes(os.urandom(3000))
        net = NetSettings(bootstrap=[boot.address], data_dir=tmp_path / "sharer", geo=geo)
        shared = await share(source, net=net)

        # The fetcher's only entry node never answers: a join would wait for its (long) timeout.
        hole = await asyncio_dgram.bind((peer_address(64, 9), 0))
        stack.callback(hole.close)
        joins: list[str] = []
        real_join = DHTNode.join

        async def watched(self: DHTNode, bootstrap: list[tuple[str, int]]) -> int:
            try:
                result = await real_join(self, bootstrap)
            except asyncio.CancelledError:
                joins.append("cancelled")
                raise
            except Exception:
                joins.append("failed")
                raise
            joins.append("joined")
            return result

        monkeypatch.setattr(DHTNode, "join", watched)
        fetcher = NetSettings(
            bootstrap=[hole.sockname[:2]],
            data_dir=tmp_path / "fetcher",
            geo=geo,
            host=peer_address(64, 2),
            rpc_timeout_s=15.0,
        )
        result = await fetch(shared.read_link, net=fetcher, output=tmp_path / "out.bin")
        assert result.path.read_bytes() == source.read_bytes()
        assert joins == ["cancelled"], (
            "the fetch finished from the hinted holders while the join still waited"
        )


async def test_a_contact_that_went_silent_is_not_asked_by_the_next_command(tmp_path: Path) -> None:
    contacts = tmp_path / "contacts.json"
    async with contextlib.AsyncExitStack() as stack, asyncio.timeout(STEP_S):
        boot = DHTNode(host=peer_address(65, 1))
        await boot.start()
        stack.push_async_callback(boot.stop)
        dead_addr, _dead_id = await stack.enter_async_context(answers_once(peer_address(65, 2)))
        assert await boot.add_contact(*dead_addr), "the bootstrap node lists the peer, alive then"

        async def one_command(n: int) -> set[tuple[str, int]]:
            """A client that joins and looks up once, as share does; the addresses it sent requests to."""
            client = DHTNode(host=peer_address(65, 10 + n), contacts_path=contacts)
            await client.start()
            asked: set[tuple[str, int]] = set()
            proto = client.server._proto()
            real_request = proto.request

            def spy(address: tuple[str, int], name: str, args: list[object]) -> Any:
                asked.add((address[0], address[1]))
                return real_request(address, name, args)

            proto.request = spy  # type: ignore[method-assign]
            try:
                await client.join([(boot.host, boot.port)])
                await client.find_peers(os.urandom(20))
            finally:
                await client.stop()
            return asked

        assert dead_addr in await one_command(1), "the first command meets the silent peer"
        assert dead_addr not in await one_command(2), (
            "the next one, with the same data dir, skips it"
        )


@contextlib.contextmanager
def unanswered_listener(host: str) -> Any:
    """A TCP address whose connects hang: a listener that never accepts, its one-slot backlog already full,
    so the kernel drops further SYNs (as a seized host behind a firewall does)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers = []
    try:
        listener.bind((host, 0))
        listener.listen(0)
        for _ in range(3):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(listener.getsockname())
            fillers.append(filler)
        yield listener.getsockname()[:2]
    finally:
        for s in fillers:
            s.close()
        listener.close()


async def test_a_holder_that_drops_connections_costs_the_race_delay_not_the_connect_timeout(
    tmp_path: Path,
) -> None:
    host = peer_address(66, 1)
    async with holder(tmp_path, host) as (server, _store):
        data = shaped(os.urandom(5000))
        chunk_id = chunk_id_of(data)
        with unanswered_listener(peer_address(66, 2)) as hanging:
            async with TransferClient(
                local_host=peer_address(66, 3), connect_timeout_s=60.0
            ) as client:
                assert await client.store((host, server.port), chunk_id, data, 3600)
                await client.close()
            async with TransferClient(
                local_host=peer_address(66, 3), connect_timeout_s=60.0
            ) as client:
                # The hanging holder comes first; without racing, its connect would take the 60 s timeout.
                async with asyncio.timeout(STEP_S):
                    got, served_by = await client.fetch_any_into(
                        [hanging, (host, server.port)], chunk_id, bytes
                    )
        assert got == data
        assert served_by == (host, server.port)


@contextlib.asynccontextmanager
async def stalling_holder(host: str) -> AsyncIterator[tuple[tuple[str, int], list[int]]]:
    """A holder that says it has every chunk (``has``) and never sends one (``fetch`` is left unanswered).

    Yields its address and a list that grows by one per fetch request it received.
    """
    fetches: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = TransferConnection(role=Role.SERVER)
        stream = SecureStream(reader, writer, role=Role.SERVER)
        try:
            await stream.run_handshake()
            while data := await stream.read():
                conn.receive_data(data)
                while (event := conn.next_event()) is not NEED_DATA:
                    if isinstance(event, HasRequest):
                        stream.write(
                            conn.send(HasReply(event.request_id, (True,) * len(event.ids)))
                        )
                    elif isinstance(event, FetchRequest):
                        fetches.append(event.request_id)
        except (ConnectionError, ProtocolViolation, RemoteProtocolError, TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, 0)
    try:
        yield server.sockets[0].getsockname()[:2], fetches
    finally:
        server.close()


async def test_a_stalling_holder_is_dropped_for_the_rest_of_a_fetch(tmp_path: Path) -> None:
    """Before: every chunk that listed the staller first waited for the timeout on it (issue 16, item 5)."""
    chunk_size, chunks = 4096, 40
    plaintext = os.urandom(chunk_size * chunks - 100)
    encoder = FileEncoder(name="f.bin", size=len(plaintext), chunk_size=chunk_size)
    stored = [
        encoder.encode_chunk(i, plaintext[i * chunk_size : (i + 1) * chunk_size])
        for i in range(encoder.chunk_count)
    ]
    cap, manifest_chunks = encoder.finish()
    good_host = peer_address(67, 1)
    async with holder(tmp_path, good_host) as (server, store):
        for chunk_id, data in [*stored, *manifest_chunks]:
            store.put(chunk_id, data, lease_s=3600)
        good = (good_host, server.port)
        async with stalling_holder(peer_address(67, 2)) as (staller, fetches):
            settings = NodeSettings(
                host=peer_address(67, 3),
                data_dir=tmp_path / "client",
                persistent_identity=False,
                transfer_timeout_s=1.0,
            )
            async with Node(settings) as client, asyncio.timeout(STEP_S):
                locator = HolderLocator(client, hints=[staller, good])
                manifest = await walk_manifest(locator, cap)
                target = tmp_path / "out.bin"
                await _download(locator, cap, manifest, target, None)
        assert target.read_bytes() == plaintext
        # The staller is asked at most while its first request is still waiting for the timeout: then
        # never again. Without the drop it got about half of the 40 chunks' first requests.
        assert 1 <= len(fetches) <= 1 + FETCH_CONCURRENCY, len(fetches)
