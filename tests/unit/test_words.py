"""core.words: "1 peer", never "1 peers" (issue 21, bug 8)."""

from p2pmega.core.words import counted


def test_counted() -> None:
    assert counted(1, "peer") == "1 peer"
    assert counted(0, "peer") == "0 peers"
    assert counted(2, "country", "countries") == "2 countries"
    assert counted(1, "country", "countries") == "1 country"
