"""`p2pmega demo` whose peer processes meet a hostile or broken local environment (issue 21, bug 1).

The demo's peers are child processes; started as `python -m p2pmega` with the caller's directory first on
sys.path, they imported the folder's code instead of the installed package. A peer that cannot start is a local
problem (exit 8) whose log survives the demo's clean-up, not a network error (exit 3).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pmega.api.testnet import TestNet
from tests.integration.cli_helpers import clean_env, run

pytestmark = pytest.mark.integration

HOSTILE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\nraise SystemExit(99)\n"


def test_demo_ignores_code_in_the_working_directory(tmp_path: Path) -> None:
    marker = tmp_path / "hostile-code-ran"
    cwd = tmp_path / "work"
    (cwd / "p2pmega").mkdir(parents=True)
    (cwd / "p2pmega.py").write_text(HOSTILE.format(marker=str(marker)))
    (cwd / "p2pmega" / "__init__.py").write_text(HOSTILE.format(marker=str(marker)))
    (cwd / "p2pmega" / "__main__.py").write_text(HOSTILE.format(marker=str(marker)))
    # The installed console script, as a user runs it (its own directory, not cwd, is on sys.path).
    script = Path(sys.executable).parent / "p2pmega"
    assert script.exists(), "the test environment has no p2pmega console script (pip install -e .)"
    done = subprocess.run(
        [str(script), "demo"],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert not marker.exists(), "a peer ran the p2pmega code of the working directory"
    assert done.returncode == 0, done.stderr[-2000:]
    assert "byte-identical" in done.stdout


async def test_peers_run_in_their_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-P alone is not enough: an empty PYTHONPATH entry (``export PYTHONPATH=$PYTHONPATH:/x`` with it unset)
    puts the working directory back on sys.path, so a peer must not run in the caller's directory either."""
    marker = tmp_path / "hostile-code-ran"
    cwd = tmp_path / "work"
    (cwd / "p2pmega").mkdir(parents=True)
    for name in ("p2pmega.py", "p2pmega/__init__.py", "p2pmega/__main__.py"):
        (cwd / name).write_text(HOSTILE.format(marker=str(marker)))
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PYTHONPATH", os.pathsep + os.environ.get("PYTHONPATH", ""))
    async with (
        asyncio.timeout(60),
        TestNet(base_dir=tmp_path / "net", countries=("DE",), peers_per_country=1) as net,
    ):
        assert len(net.seeds) == 1
    assert not marker.exists(), "a peer ran the p2pmega code of the working directory"


# Loaded by every Python process started with this PYTHONPATH: the testnet's bootstrap peer stops at start-up, as
# it would on a machine where its environment is broken; the demo process itself runs on.
BROKEN_PEER = """import os, sys
if "bootstrap" in sys.orig_argv:
    sys.stderr.write("simulated start-up failure of this machine\\n")
    sys.stderr.flush()
    os._exit(70)
"""


def test_a_peer_that_cannot_start_is_a_local_error_and_its_log_is_kept(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BROKEN_PEER)
    temp = tmp_path / "tmp"
    temp.mkdir()
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    done = run("demo", env=clean_env(PYTHONPATH=path, TMPDIR=str(temp)), timeout=120)
    assert done.returncode == 8, done.stderr[-2000:]
    [work] = temp.iterdir()
    log = work / "testnet" / "logs" / "bootstrap.log"
    assert done.stderr.splitlines() == [
        "p2pmega: error: testnet peer bootstrap exited with 70: "
        f"simulated start-up failure of this machine; see {log}",
        "p2pmega: demo failed at step: starting the test network; "
        f"the peers' logs are kept in {work}",
    ]
    assert "simulated start-up failure" in log.read_text()
    # Only the logs are kept: every other file of the demo is gone.
    assert [p for p in work.rglob("*") if p.is_file()] == [log]
