"""fetch's exit-4 message counts the missing chunks and says what was kept (issue 21, bug 7)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pmega.api.download import _unavailable, safe_name
from p2pmega.errors import ChunkUnavailable
from p2pmega.storage.part_file import ResumeState


def test_counts_missing_chunks_and_names_the_part_file(tmp_path: Path) -> None:
    part = tmp_path / ".f.p2pmega-part"
    resume = ResumeState(
        part=part, state=tmp_path / "s", root="r", size=10, done={0, 1, 2, 3, 4, 5}
    )
    err = _unavailable(4, 10, resume, ChunkUnavailable("no reachable holder has chunk 06"))
    assert str(err) == (
        "4 of 10 chunks have no reachable holder (no reachable holder has chunk 06); "
        f"6 of 10 chunks are saved in {str(part)!r}: run the same command again later to resume"
    )
    one = _unavailable(1, 10, resume, ChunkUnavailable("x"))
    assert str(one).startswith("1 of 10 chunks has no reachable holder (x)")


@pytest.mark.parametrize("name", ["é" * 255, "a" * 300, "x" * 254 + "€", "日本" * 100])
def test_a_long_name_is_cut_to_255_bytes_between_characters(name: str) -> None:
    """255 "é" are 510 bytes: the file system refused it with a traceback (issue 16, item 7)."""
    safe = safe_name(name, "fallback")
    assert 0 < len(safe.encode("utf-8")) <= 255
    assert name.startswith(safe)


@given(st.text())
def test_a_safe_name_is_one_short_printable_name(name: str) -> None:
    safe = safe_name(name, "fallback")
    assert len(safe.encode("utf-8")) <= 255
    assert "/" not in safe
    assert "\x00" not in safe
    assert safe not in ("", ".", "..")
    assert all(ch.isprintable() for ch in safe)
