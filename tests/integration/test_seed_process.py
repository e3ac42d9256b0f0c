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
from p2pmega.net.transfer import TransferClient
from p2pmega.storage import ChunkStore
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
    data = os.urandom(DEFAULT_CHUNK_SIZE)
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


def test_seed_killed_mid_chunk_restarts_consistent(tmp_path: Path) -> None:
    port = free_port(HOST)
    seed = ("seed", "--data-dir", str(tmp_path))
    kept = os.urandom(1000)
    half_sent = os.urandom(DEFAULT_CHUNK_SIZE)
    with started(*seed, host=HOST, port=port) as proc:

        async def store_one() -> None:
            async with TransferClient(local_host="127.61.9.1", timeout_s=10) as client:
                async with asyncio.timeout(30):
                    await client.store((HOST, port), chunk_id_of(kept), kept, 3600)

        asyncio.run(store_one())
        frames = TransferConnection(role=Role.CLIENT).send(
            StoreRequest(
                request_id=1, chunk_id=chunk_id_of(half_sent), lease_s=3600, data=half_sent
            )
        )
        wire = b"".join(frames)
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(wire[: len(wire) // 2])
            time.sleep(0.2)  # the holder is now buffering a half-received chunk
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

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
    with ChunkStore(tmp_path / "store") as store:
        assert store.ids() == [chunk_id_of(kept)]
        assert store.get(ChunkId(chunk_id_of(kept))) == kept
        assert not store.repair_report.repaired
        files = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
        chunk_files = [p for p in files if p.parent.parent.name == "chunks"]
        assert [p.name for p in chunk_files] == [chunk_id_of(kept).hex()]
        assert not list((tmp_path / "store" / "tmp").iterdir())
