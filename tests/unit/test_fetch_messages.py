"""fetch's exit-4 message counts the missing chunks and says what was kept (issue 21, bug 7)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from p2pmega.api.common import HolderLocator
from p2pmega.api.fetch import _Resume, _unavailable
from p2pmega.core.chunking import ChunkId
from p2pmega.errors import ChunkUnavailable


class FakeLocator:
    def __init__(self, held: set[ChunkId]) -> None:
        self.held = held

    def live_holders(self, chunk_id: ChunkId) -> list[tuple[str, int]]:
        return [("127.0.0.1", 1)] if chunk_id in self.held else []


def test_counts_missing_chunks_and_names_the_part_file(tmp_path: Path) -> None:
    ids = [ChunkId(bytes([i]) * 32) for i in range(10)]
    part = tmp_path / ".f.p2pmega-part"
    resume = _Resume(part=part, state=tmp_path / "s", root="r", size=10, done={0, 1, 2, 3})
    # Chunks 4 and 5 have holders (not reached before the stop); 6-9 have none.
    locator = cast(HolderLocator, FakeLocator({ids[4], ids[5]}))
    err = _unavailable(locator, ids, resume, ChunkUnavailable("no reachable holder has chunk 06"))
    assert str(err) == (
        "4 of 10 chunks have no reachable holder (no reachable holder has chunk 06); "
        f"4 of 10 chunks are saved in {str(part)!r}: run the same command again later to resume"
    )
