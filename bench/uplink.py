"""Share over a slow uplink: wall time of ``p2pmega share`` of one file at several shaped upload rates.

Run from the repository root, as root on Linux with iproute2 (tc, ip):
``python -m bench.uplink [--mib 16] [--rates-mbit 1,8,20] [--python PATH] [--limit-s 900]``.

Starts ``p2pmega testnet`` (8 seeds in 4 countries on 127.C.N.1), limits what the sharer's address
(127.250.1.1) sends to each rate in turn (tests/shaping.py: an HTB class on lo for that source
address only, a one-second queue, Ethernet-sized segments; nothing else on lo is slowed), runs
``p2pmega share --host 127.250.1.1`` and prints its wall time, exit code and last stderr line, then
fetches the file back unshaped and compares it. Two copies of every chunk go up, so 16 MiB cannot take
less than 2 x 16 MiB / rate (268 s at 1 Mbit/s, 34 s at 8, 13 s at 20).

``--python`` runs the testnet and the commands with another interpreter, e.g. a venv with the code
from before a change (``pip install`` a checkout of it, not ``-e``). Commands run in a temporary
directory, so ``-m p2pmega`` imports that interpreter's p2pmega, not this checkout's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.shaping import SHAPED_HOST, shaped_uplink, shaping_unavailable

MIB = 1 << 20


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("P2PMEGA_")}


@contextlib.contextmanager
def testnet(python: str, work: Path) -> Iterator[dict[str, str]]:
    """``p2pmega testnet`` until exit; yields the environment that points commands at it."""
    base = work / "net"
    proc = subprocess.Popen(
        [python, "-m", "p2pmega", "testnet", "--data-dir", str(base)],
        cwd=work,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the export line, once every peer listens
        if not line.startswith("export "):
            raise SystemExit(f"testnet did not start: {line!r}")
        env = clean_env()
        for part in line.split():
            if "=" in part:
                key, value = part.split("=", 1)
                env[key] = value
        yield env
    finally:
        pids = []
        with contextlib.suppress(OSError, ValueError):
            pids = [p["pid"] for p in json.loads((base / "peers.json").read_text())["peers"]]
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in pids:  # never leave a seed running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def run(
    python: str, args: list[str], env: dict[str, str], cwd: Path, limit_s: float
) -> tuple[float, int, str, str]:
    """Run one p2pmega command; (wall seconds, exit code, stdout, last stderr line)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [python, "-m", "p2pmega", *args],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=limit_s,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, -1, "", f"killed after {limit_s:.0f} s"
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return time.perf_counter() - start, proc.returncode, proc.stdout.strip(), last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--rates-mbit", default="1,8,20")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--limit-s", type=float, default=900.0, help="kill a share after this")
    args = parser.parse_args()
    reason = shaping_unavailable()
    if reason is not None:
        raise SystemExit(f"cannot shape the uplink: {reason}")
    rates = [float(r) for r in args.rates_mbit.split(",")]
    with tempfile.TemporaryDirectory(prefix="p2pmega-uplink-") as tmp:
        work = Path(tmp)
        src = work / "file.bin"
        src.write_bytes(os.urandom(args.mib * MIB))
        version = subprocess.run(
            [args.python, "-c", "import p2pmega; print(p2pmega.__file__)"],
            cwd=work,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        print(f"p2pmega from {version}; {args.mib} MiB, 2 replicas in 2 of 4 countries")
        with testnet(args.python, work) as env:
            for i, mbit in enumerate(rates):
                client = ["--data-dir", str(work / f"client-{i}")]
                with shaped_uplink(SHAPED_HOST, int(mbit * 1000)):
                    wall, code, link, last = run(
                        args.python,
                        ["share", str(src), "--host", SHAPED_HOST, *client],
                        env,
                        work,
                        args.limit_s,
                    )
                floor_s = 2 * args.mib * MIB * 8 / (mbit * 1e6)
                line = f"{mbit:5g} Mbit/s: share exit {code} in {wall:6.1f} s (link floor {floor_s:.0f} s)"
                if code != 0:
                    print(f"{line}: {last}")
                    continue
                out = work / f"back-{i}.bin"
                _, fcode, _, flast = run(
                    args.python, ["fetch", link, "-o", str(out), *client], env, work, args.limit_s
                )
                same = fcode == 0 and out.read_bytes() == src.read_bytes()
                print(f"{line}; fetched back identical={same}{'' if fcode == 0 else ': ' + flast}")


if __name__ == "__main__":
    main()
