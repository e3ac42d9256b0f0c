"""Transfer throughput on loopback: one client fetching chunks from 4 holders.

Run from the repository root:
``python -m bench.transfer [--mib 256] [--chunk-kib 2048] [--inflight 16] [--rounds 3]``.
Chunks default to the size share cuts (DEFAULT_CHUNK_SIZE).
Prints, from the same run: raw loopback TCP (an asyncio stream, and blocking sockets with a thread
per end), the chunk-id hash rate, and TransferClient fetching from 4 TransferServers with real
ChunkStores, in this process and in 4 child processes.
Each rate is the best of ``--rounds`` measurements (as bench/core.py does): on a shared 2-core
machine one run of 256 MiB varies by +-5%, the three rates alike. CPU per MiB is over all rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

from p2pmega.allocator import tune_allocator
from p2pmega.core.chunking import DEFAULT_CHUNK_SIZE, ChunkId, chunk_id_of
from p2pmega.net.transfer_client import TransferClient
from p2pmega.net.transfer_server import TransferServer
from p2pmega.storage import ChunkStore
from p2pmega.storage.sources import SourceLimits

MiB = 1 << 20
HOLDERS = [f"127.{c}.1.1" for c in range(1, 5)]
CLIENT_HOST = "127.5.1.1"
LEASE_S = 3600


# One benchmark client is one source network: without this, its per-network share and rate would be measured.
UNLIMITED = SourceLimits(network_share=1.0, rate_bytes_per_min=0)


def make_chunks(total_mib: int, chunk_size: int) -> list[tuple[ChunkId, bytes]]:
    chunks = []
    for _ in range(total_mib * MiB // chunk_size):
        data = bytes((2, 0)) + os.urandom(
            chunk_size - 2
        )  # a stored chunk's header: holders check it
        chunks.append((chunk_id_of(data), data))
    return chunks


def hash_rate(chunks: Sequence[tuple[ChunkId, bytes]]) -> float:
    started = time.perf_counter()
    for _, data in chunks:
        chunk_id_of(data)
    return sum(len(data) for _, data in chunks) / MiB / (time.perf_counter() - started)


async def raw_tcp_rate(total_mib: int) -> float:
    """A plain asyncio stream sending ``total_mib`` MiB over loopback, read in 1 MiB pieces."""
    block = os.urandom(MiB)
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = 0
        while received < total_mib * MiB:
            piece = await reader.read(MiB)
            if not piece:
                break
            received += len(piece)
        done.set_result(received)
        writer.close()

    server = await asyncio.start_server(sink, host=HOLDERS[0], port=0, limit=8 * MiB)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection(HOLDERS[0], port, local_addr=(CLIENT_HOST, 0))
        started = time.perf_counter()
        for _ in range(total_mib):
            writer.write(block)
            await writer.drain()
        received = await done
        elapsed = time.perf_counter() - started
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    return received / MiB / elapsed


def raw_socket_rate(total_mib: int) -> float:
    """Blocking sockets, sender and receiver each in its own thread: what the kernel can do.

    The asyncio figure above runs both ends on one event loop, so it is capped by one core; this
    one uses both, as the holders and the client (separate processes) do.
    """
    block = os.urandom(MiB)
    with socket.create_server((HOLDERS[0], 0)) as listener:
        port = listener.getsockname()[1]
        received = 0

        def sink() -> None:
            nonlocal received
            conn, _ = listener.accept()
            room = bytearray(MiB)
            with conn:
                while received < total_mib * MiB:
                    n = conn.recv_into(room)
                    if not n:
                        break
                    received += n

        with socket.create_connection((HOLDERS[0], port), source_address=(CLIENT_HOST, 0)) as out:
            receiver = threading.Thread(target=sink)
            started = time.perf_counter()
            receiver.start()
            for _ in range(total_mib):
                out.sendall(block)
            receiver.join(timeout=120)
            elapsed = time.perf_counter() - started
    return received / MiB / elapsed


def fill_stores(root: Path, chunks: Sequence[tuple[ChunkId, bytes]]) -> list[list[ChunkId]]:
    """Put chunk i on holder i % 4, straight into the stores (not part of the measurement).

    Written through the page cache (direct_io=False). The holders then open the stores as a seed
    does (direct I/O where the filesystem has it), so they read every chunk from the disk with
    O_DIRECT, as a real holder serves a chunk it stored (docs/STORAGE.md, "Reads").
    """
    per_holder: list[list[ChunkId]] = [[] for _ in HOLDERS]
    for index, host in enumerate(HOLDERS):
        quota = len(chunks) * 2 * MiB
        with ChunkStore(root / host, quota_bytes=quota, direct_io=False) as store:
            for chunk_id, data in chunks[index :: len(HOLDERS)]:
                store.put(chunk_id, data, lease_s=LEASE_S)
                per_holder[index].append(chunk_id)
    return per_holder


async def fetch_all(
    addrs: Sequence[tuple[str, int]], per_holder: Sequence[Sequence[ChunkId]], inflight: int
) -> float:
    """Fetch every chunk (round robin over holders) with ``inflight`` requests outstanding."""
    work = [
        (addrs[h], per_holder[h][i])
        for i in range(max(map(len, per_holder)))
        for h in range(len(addrs))
        if i < len(per_holder[h])
    ]
    queue: asyncio.Queue[tuple[tuple[str, int], ChunkId]] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    received = 0
    async with TransferClient(local_host=CLIENT_HOST, max_connections_per_peer=4) as client:

        async def worker() -> None:
            nonlocal received
            while not queue.empty():
                addr, chunk_id = queue.get_nowait()
                # As fetch does: hash-checked and consumed in one worker thread, the receive
                # buffer then reused. Await first: ``received += await ...`` would load
                # ``received`` before the await and lose the other workers' updates.
                size = await client.fetch_into(addr, chunk_id, len)
                received += size

        # Warm up the pool so connection setup is not measured.
        await asyncio.gather(*(client.has(addr, [per_holder[0][0]]) for addr in addrs))
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        elapsed = time.perf_counter() - started
    return received / MiB / elapsed


@contextlib.asynccontextmanager
async def servers_in_process(root: Path) -> AsyncIterator[list[tuple[str, int]]]:
    stores = [ChunkStore(root / host, quota_bytes=1 << 40, limits=UNLIMITED) for host in HOLDERS]
    servers = [TransferServer(s, host=h, port=0) for s, h in zip(stores, HOLDERS, strict=True)]
    try:
        for server in servers:
            await server.start()
        yield [(h, s.port) for h, s in zip(HOLDERS, servers, strict=True)]
    finally:
        for server in servers:
            await server.stop()
        for store in stores:
            store.close()


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def servers_in_processes(root: Path) -> Iterator[tuple[list[tuple[str, int]], list[int]]]:
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.transfer", "--serve", host, str(root / host)],
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
            text=True,
        )
        for host in HOLDERS
    ]
    try:
        ports = [int(child.stdout.readline()) for child in children if child.stdout]
        yield list(zip(HOLDERS, ports, strict=True)), [child.pid for child in children]
    finally:
        for child in children:
            if child.stdin:
                child.stdin.close()  # the child stops when its stdin closes
        for child in children:
            child.wait(timeout=30)


async def serve_until_stdin_closes(host: str, root: str) -> None:
    with ChunkStore(Path(root), quota_bytes=1 << 40, limits=UNLIMITED) as store:
        server = TransferServer(store, host=host, port=0)
        await server.start()
        print(server.port, flush=True)
        try:
            await asyncio.to_thread(sys.stdin.read)
        finally:
            await server.stop()


async def main(total_mib: int, chunk_size: int, inflight: int, rounds: int) -> None:
    chunks = make_chunks(total_mib, chunk_size)
    total_mib = len(chunks) * chunk_size // MiB
    print(f"{len(chunks)} chunks of {chunk_size // 1024} KiB, {total_mib} MiB ...", flush=True)
    hashing = max(hash_rate(chunks) for _ in range(rounds))
    raw = max([await raw_tcp_rate(total_mib) for _ in range(rounds)])
    raw_sockets = max(raw_socket_rate(total_mib) for _ in range(rounds))
    fetched_mib = total_mib * rounds
    with tempfile.TemporaryDirectory(prefix="p2pmega-bench-") as tmp:
        root = Path(tmp)
        per_holder = fill_stores(root, chunks)
        async with servers_in_process(root) as addrs:
            cpu_started = time.process_time()
            in_process = max([await fetch_all(addrs, per_holder, inflight) for _ in range(rounds)])
            # CPU of every thread of this process (holders and client) per MiB fetched.
            cpu_ms_per_mib = (time.process_time() - cpu_started) * 1000 / fetched_mib
        with servers_in_processes(root) as (addrs, pids):
            holders_started = sum(map(process_cpu_s, pids))
            cpu_started = time.process_time()
            separate = max([await fetch_all(addrs, per_holder, inflight) for _ in range(rounds)])
            client_ms_per_mib = (time.process_time() - cpu_started) * 1000 / fetched_mib
            holder_ms_per_mib = (
                (sum(map(process_cpu_s, pids)) - holders_started) * 1000 / fetched_mib
            )
    # The stricter of the two raw figures: the faster one.
    floor = min(max(raw, raw_sockets), hashing)
    print(f"raw loopback TCP (asyncio stream)   {raw:8.0f} MiB/s  (both ends on one event loop)")
    print(f"raw loopback TCP (blocking sockets) {raw_sockets:8.0f} MiB/s  (one thread per end)")
    print(f"chunk_id_of hash rate (1 thread)    {hashing:8.0f} MiB/s")
    for label, rate in (("in one process", in_process), ("in 4 processes", separate)):
        print(
            f"fetch, 4 holders {label:<18} {rate:8.0f} MiB/s  "
            f"= {rate / floor:.0%} of the slower of the faster raw TCP and the hash (target >= 50%)"
        )
    cores = os.cpu_count() or 1
    print(
        f"in one process: {cpu_ms_per_mib:.2f} ms CPU per MiB (holder + client, all threads), "
        f"so {cores} cores cap it near {cores * 1000 / cpu_ms_per_mib:.0f} MiB/s; "
        f"two hashes per chunk (holder re-verifies, client verifies) are {2000 / hashing:.2f} ms"
    )
    print(
        f"in 4 processes: client {client_ms_per_mib:.2f} ms CPU per MiB, holders "
        f"{holder_ms_per_mib:.2f} ms CPU per MiB served (sum of the 4 holder processes)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="MiB to fetch")
    parser.add_argument(
        "--chunk-kib", type=int, default=DEFAULT_CHUNK_SIZE // 1024, help="chunk size in KiB"
    )
    parser.add_argument("--inflight", type=int, default=16, help="requests outstanding at once")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs of each")
    parser.add_argument("--serve", nargs=2, metavar=("HOST", "STORE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    # As every p2pmega command does (cli._run): chunk buffers stay warm instead of being faulted in anew.
    tune_allocator()
    if args.serve:
        asyncio.run(serve_until_stdin_closes(*args.serve))
    else:
        asyncio.run(main(args.mib, args.chunk_kib * 1024, args.inflight, args.rounds))
