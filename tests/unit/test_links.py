"""The sharer's link list: forgetting a file (``ls``'s and the web app's forget)."""

from __future__ import annotations

import stat
from pathlib import Path

from p2pmega.storage.links import LinkEntry, forget_link, links_path, load_links, record_link


def _entry(n: int, shared_at: float) -> LinkEntry:
    return LinkEntry(f"magnet:?xt=urn:p2pmega:{n}", f"{n:02x}" * 32, f"{n}.txt", n, shared_at)


def test_forget_drops_only_that_file_and_keeps_the_list_private(tmp_path: Path) -> None:
    for n in (1, 2, 3):
        record_link(tmp_path, _entry(n, float(n)))
    assert forget_link(tmp_path, "02" * 32) is True
    assert [e.name for e in load_links(tmp_path)] == ["1.txt", "3.txt"]
    assert stat.S_IMODE(links_path(tmp_path).stat().st_mode) == 0o600
    assert forget_link(tmp_path, "02" * 32) is False
    assert [e.name for e in load_links(tmp_path)] == ["1.txt", "3.txt"]


def test_forget_on_no_list_writes_nothing(tmp_path: Path) -> None:
    assert forget_link(tmp_path, "01" * 32) is False
    assert not links_path(tmp_path).exists()
