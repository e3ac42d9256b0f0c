"""allocator.tune_allocator: chunk-sized buffers stay warm after glibc is tuned."""

from __future__ import annotations

import subprocess
import sys

import pytest

from p2pmega import allocator

# Seals and opens a 1 MiB chunk 50 times, as share and fetch do, and counts the minor page faults: with
# glibc's defaults the buffers of each round are fresh pages (about 256 faults per MiB), tuned they are
# reused.
_PROBE = """
import resource, sys
from p2pmega.allocator import tune_allocator
from p2pmega.core import crypto
tuned = tune_allocator() if sys.argv[1] == "tuned" else False
key, blob = crypto.new_key(), bytes(1 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    assert crypto.open_sealed(key, crypto.seal(key, blob, b"aad"), b"aad") == blob
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_process_reuses_chunk_buffers_instead_of_faulting_fresh_pages():
    tuned, tuned_faults = _faults("tuned")
    if not tuned:
        pytest.skip("not glibc")
    _, default_faults = _faults("default")
    # Measured: 50389 faults with the defaults (four fresh MiB per round), 1257 tuned (the first round).
    assert default_faults > 50 * 256
    assert tuned_faults < default_faults / 10


def test_importing_p2pmega_changes_no_allocator_setting():
    # Only the CLI entry point tunes; a library user's process is left alone.
    assert allocator.MMAP_THRESHOLD_BYTES > (4 << 20) + 4096
    assert "allocator" not in {name.rsplit(".", 1)[-1] for name in _modules_after_import()}


def _modules_after_import() -> list[str]:
    code = "import sys, p2pmega.api.fetch, p2pmega.api.share; print(' '.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return out.stdout.split()
