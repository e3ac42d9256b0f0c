"""allocator.tune_allocator: chunk-sized buffers stay warm after glibc is tuned."""

from __future__ import annotations

import subprocess
import sys

import pytest

from p2pmega.core.chunking import MAX_CHUNK_SIZE, ROOT_EXTRA_MAX_BYTES

# Seals and opens a chunk 20 times, as share and fetch do, and counts the minor page faults: with glibc's
# defaults the buffers of each round are fresh pages (about 256 faults per MiB, four buffers a round),
# tuned they are reused. Modes: "tuned" calls tune_allocator, "default" does nothing, "imported" only
# imports what a library user imports.
_ROUNDS = 20
_PROBE = """
import resource, sys
from p2pmega.allocator import tune_allocator
from p2pmega.core import crypto
mode, size = sys.argv[1], int(sys.argv[2])
if mode == "imported":
    import p2pmega.api.fetch, p2pmega.api.share
tuned = tune_allocator() if mode == "tuned" else False
key, blob = crypto.new_key(), bytes(size)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[3])):
    assert crypto.open_sealed(key, crypto.seal(key, blob, b"aad"), b"aad") == blob
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
_MIB = 1 << 20
# The largest chunk a holder stores or a fetch opens (a root chunk with its extra bytes).
_LARGEST = MAX_CHUNK_SIZE + ROOT_EXTRA_MAX_BYTES
glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


def _faults(mode: str, size_bytes: int) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode, str(size_bytes), str(_ROUNDS)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    return out[0] == "True", int(out[1])


def _tuned_faults(size_bytes: int) -> int:
    tuned, faults = _faults("tuned", size_bytes)
    if not tuned:
        pytest.skip("not glibc")
    return faults


@glibc_only
def test_tuned_process_reuses_chunk_buffers_instead_of_faulting_fresh_pages():
    tuned_faults = _tuned_faults(_MIB)
    _, default_faults = _faults("default", _MIB)
    # Measured: 20611 faults with the defaults (four fresh MiB per round), 1244 tuned (the first round).
    assert default_faults > _ROUNDS * 256
    assert tuned_faults < default_faults / 10


@glibc_only
def test_tuning_covers_the_largest_chunk():
    # The mmap threshold must sit above the largest chunk, or its buffers are mmapped fresh each time.
    tuned_faults = _tuned_faults(_LARGEST)
    _, default_faults = _faults("default", _LARGEST)
    # Measured: 84447 faults with the defaults, 5084 tuned.
    assert default_faults > _ROUNDS * 4 * 256
    assert tuned_faults < default_faults / 10


@glibc_only
def test_importing_p2pmega_changes_no_allocator_setting():
    # Only the CLI entry point tunes; a library user's process is left alone: its chunk buffers
    # fault in fresh pages every round, as in an untuned process.
    tuned_faults = _tuned_faults(_LARGEST)
    _, imported_faults = _faults("imported", _LARGEST)
    assert imported_faults > _ROUNDS * 4 * 256
    assert imported_faults > 10 * tuned_faults
    assert "allocator" not in {name.rsplit(".", 1)[-1] for name in _modules_after_import()}


def _modules_after_import() -> list[str]:
    code = "import sys, p2pmega.api.fetch, p2pmega.api.share; print(' '.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return out.stdout.split()
