"""The long-running commands as real processes: ``p2pmega seed`` and ``p2pmega bootstrap``."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from p2pmega.core.chunking import DEFAULT_CHUNK_SIZE, ChunkId, chunk_id_of
from p2pmega.core.wire import Role, StoreRequest, TransferConnection
from p2pmega.net.transfer_client import TransferClient
from p2pmega.storage import ChunkStore
from tests.channel_helpers import handshake_blocking
from tests.chunk_bytes import shaped
from tests.conftest import free_port
from tests.integration.cli_helpers import P2PMEGA, clean_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HOST = "127.61.1.1"


@contextmanager
def started(*args: str, host: str, port: int) -> Iterator[subprocess.Popen[str]]:
    """Run ``p2pmega ARGS --host host --port port``; wait for its ``listening on`` line; stop it on exit."""
    proc = subprocess.Popen(
        [*P2PMEGA, *args, "--host", host, "--port", str(port), "--no-lan"],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stderr is not None
        seen = []
        while (line := proc.stderr.readline()) and line != f"listening on {host}:{port}\n":
            seen.append(line)
        assert line, f"exited with {proc.wait()} before listening: {seen}"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def stop(proc: subprocess.Popen[str], sig: signal.Signals) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_bootstrap_node_runs_until_signal_and_exits_0(tmp_path: Path, sig: signal.Signals) -> None:
    port = free_port(HOST)
    with started("bootstrap", "--data-dir", str(tmp_path), host=HOST, port=port) as proc:
        # It answers on UDP: a second node joins through it.
        other = "127.61.2.1"
        with started(
            "bootstrap",
            "--data-dir",
            str(tmp_path / "other"),
            "--bootstrap",
            f"{HOST}:{port}",
            host=other,
            port=free_port(other),
        ) as joined:
            assert stop(joined, signal.SIGTERM)[0] == 0
        code, err = stop(proc, sig)
    assert code == 0, err
    assert "Traceback" not in err
    assert (tmp_path / "identity.json").exists()


def test_seed_keeps_acknowledged_chunks_across_a_restart(tmp_path: Path) -> None:
    port = free_port(HOST)
    data = shaped(os.urandom(DEFAULT_CHUNK_SIZE))
    chunk_id = chunk_id_of(data)

    async def store_and_ask() -> list[bool]:
        async with TransferClient(local_host="127.61.9.1", timeout_s=10) as client:
            async with asyncio.timeout(30):
                assert await client.store((HOST, port), chunk_id, data, 3600) is True
                return await client.has((HOST, port), [chunk_id])

    async def fetch_back() -> bytes:
        async with TransferClient(local_host="127.61.9.1", timeout_s=10) as client:
            async with asyncio.timeout(30):
                return bytes(await client.fetch((HOST, port), chunk_id))

    seed = ("seed", "--data-dir", str(tmp_path))
    with started(*seed, host=HOST, port=port) as proc:
        assert asyncio.run(store_and_ask()) == [True]
        code, err = stop(proc, signal.SIGTERM)
        assert code == 0, err
    with started(*seed, host=HOST, port=port) as proc:
        assert asyncio.run(fetch_back()) == data
        stop(proc, signal.SIGINT)


def _wait_stopped(pid: int) -> None:
    """Wait until every thread of ``pid`` is stopped (SIGSTOP is delivered asynchronously)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(state in "tT" for state in states):
            return
    raise AssertionError(f"seed {pid} did not stop within 10 s")


def _kill_while_writing(
    proc: subprocess.Popen[str], port: int, store_dir: Path
) -> tuple[bytes, list[bytes]]:
    """Send whole STORE frames until the seed is SIGKILLed with one chunk half on disk.

    Returns:
        That chunk, and the chunks before it, which put() finished before the seed could be stopped.

    The kill is placed from outside: poll ``tmp/`` for the chunk's temp file, SIGSTOP the seed the
    moment it shows, and kill it only if, stopped, the temp file is still there and the chunk file
    is not (put() is between its create and its rename). If the write won the race, the seed goes on
    and the next chunk is tried.
    """
    written: list[bytes] = []
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sealer = handshake_blocking(sock)
        for request_id in range(1, 51):
            data = shaped(os.urandom(DEFAULT_CHUNK_SIZE))
            chunk_id = chunk_id_of(data)
            prefix = chunk_id.hex()[:16]
            final = store_dir / "chunks" / chunk_id.hex()[:2] / chunk_id.hex()
            frames = TransferConnection(role=Role.CLIENT).send(
                StoreRequest(request_id=request_id, chunk_id=chunk_id, lease_s=3600, data=data)
            )
            sock.sendall(sealer.seal(frames))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if any(n.startswith(prefix) for n in os.listdir(store_dir / "tmp")):
                    proc.send_signal(signal.SIGSTOP)
                    _wait_stopped(proc.pid)
                    mid_write = not final.exists() and any(
                        n.startswith(prefix) for n in os.listdir(store_dir / "tmp")
                    )
                    if mid_write:
                        proc.send_signal(signal.SIGKILL)
                        proc.wait(timeout=10)
                        return data, written
                    proc.send_signal(signal.SIGCONT)
                    break
                if final.exists():
                    break
            else:
                raise AssertionError(
                    f"chunk {request_id} never reached put(): no temp file in 10 s"
                )
            written.append(data)
    raise AssertionError("50 chunks were each written before the seed could be stopped")


def test_seed_killed_mid_chunk_restarts_consistent(tmp_path: Path) -> None:
    port = free_port(HOST)
    seed = ("seed", "--data-dir", str(tmp_path))
    kept = shaped(os.urandom(1000))
    with started(*seed, host=HOST, port=port) as proc:

        async def store_one() -> None:
            async with TransferClient(local_host="127.61.9.1", timeout_s=10) as client:
                async with asyncio.timeout(30):
                    await client.store((HOST, port), chunk_id_of(kept), kept, 3600)

        asyncio.run(store_one())
        half_sent, written = _kill_while_writing(proc, port, tmp_path / "store")
        # Killed between create and rename: the temp file is on disk for the restart to find.
        assert [n for n in os.listdir(tmp_path / "store" / "tmp") if not n.startswith("direct-io")]

    # Restarted, it serves what it acknowledged and knows nothing of the half chunk.
    with started(*seed, host=HOST, port=port) as proc:

        async def ask() -> list[bool]:
            async with TransferClient(local_host="127.61.9.1", timeout_s=10) as client:
                async with asyncio.timeout(30):
                    ids = [chunk_id_of(kept), chunk_id_of(half_sent)]
                    return await client.has((HOST, port), ids)

        assert asyncio.run(ask()) == [True, False]
        assert stop(proc, signal.SIGTERM)[0] == 0

    # The store on disk: no partial file, index and files agree.
    # Chunks fully written before the one killed mid-write may be there too, whole.
    with ChunkStore(tmp_path / "store") as store:
        ids = store.ids()
        assert chunk_id_of(kept) in ids
        assert set(ids) <= {chunk_id_of(c) for c in [kept, *written]}
        for chunk in [kept, *written]:
            if chunk_id_of(chunk) in ids:
                assert store.get(ChunkId(chunk_id_of(chunk))) == chunk
        assert not store.repair_report.repaired
        files = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
        chunk_files = [p for p in files if p.parent.parent.name == "chunks"]
        assert sorted(p.name for p in chunk_files) == sorted(i.hex() for i in ids)
        assert not list((tmp_path / "store" / "tmp").iterdir())
