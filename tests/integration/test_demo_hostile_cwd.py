"""`p2pmega demo` run from a folder holding a hostile p2pmega.py and p2pmega/ package (issue 21, bug 1).

The demo's peers are child processes; started as `python -m p2pmega` with the caller's directory first on
sys.path, they imported the folder's code instead of the installed package.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.cli_helpers import clean_env

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
