"""Running the real ``p2pmega`` console script, and a real ``p2pmega testnet``, from tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The console script of the environment running the tests (the one `pip install -e .` made).
P2PMEGA = [sys.executable, "-m", "p2pmega"]
COMMAND_TIMEOUT_S = 120.0
TESTNET_START_TIMEOUT_S = 60.0


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus any P2PMEGA_* of the developer's shell, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PMEGA_")}
    env.update(extra)
    return env


def run(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = COMMAND_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*P2PMEGA, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@dataclass
class RunningTestnet:
    """A ``p2pmega testnet`` process and what it printed."""

    process: subprocess.Popen[str]
    base_dir: Path
    env: dict[str, str]
    peers: list[dict[str, Any]]

    def peers_of(self, country: str) -> list[dict[str, Any]]:
        return [p for p in self.peers if p["country"] == country]

    def kill_peer(self, address: str) -> None:
        """SIGKILL one seed (as a seizure would) and wait until it is gone."""
        peer = next(p for p in self.peers if p["address"] == address)
        with contextlib.suppress(ProcessLookupError):
            os.kill(peer["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(peer["pid"], 0)
            except ProcessLookupError:
                return
            # A killed child of the testnet stays a zombie until the testnet reaps it; that is gone enough.
            try:
                if "\nState:\tZ" in Path(f"/proc/{peer['pid']}/status").read_text():
                    return
            except (FileNotFoundError, ProcessLookupError):
                return  # reaped between the two checks (reading /proc of a dying process gives ESRCH)
            time.sleep(0.02)
        raise AssertionError(f"peer {address} did not die")


@contextlib.contextmanager
def running_testnet(base_dir: Path, *args: str) -> Iterator[RunningTestnet]:
    """Start ``p2pmega testnet --data-dir base_dir ARGS``; stop it with SIGINT (as Ctrl-C) on exit."""
    proc = subprocess.Popen(
        [*P2PMEGA, "testnet", "--data-dir", str(base_dir), *args],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the network is up (or the process died)
        if not line.startswith("export "):
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"testnet did not start: {line!r} {err[-2000:]}")
        env = clean_env()
        for part in line.split():
            if "=" in part:
                key, value = part.split("=", 1)
                env[key] = value
        doc = json.loads((base_dir / "peers.json").read_text())
        yield RunningTestnet(proc, base_dir, env, [p for p in doc["peers"] if p["country"]])
    finally:
        pids = _pids(base_dir)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
    left = [pid for pid in pids if _alive(pid)]
    for pid in left:  # fail the test, but never leave a peer running after it
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"testnet left peers running: {left}"


def _pids(base_dir: Path) -> list[int]:
    try:
        doc = json.loads((base_dir / "peers.json").read_text())
    except (OSError, ValueError):
        return []
    return [p["pid"] for p in doc["peers"] if p.get("pid")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone while we looked
        return False


def stored_chunk_files(base_dir: Path) -> list[Path]:
    """Every chunk file in every seed's store of a testnet."""
    return [
        p
        for p in (base_dir / "peers").glob("*/store/chunks/**/*")
        if p.is_file() and "tmp" not in p.name
    ]
