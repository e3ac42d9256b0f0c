"""core.liveness: which contacts a lookup stops waiting on, driven by hand-set times."""

from __future__ import annotations

from p2pmega.core.liveness import Liveness
from p2pmega.core.rtt import RttTable

A, B = ("10.0.0.1", 1), ("10.0.0.2", 2)
IA, IB = b"a" * 20, b"b" * 20


def fresh() -> Liveness:
    table = RttTable(floor_s=0.05, ceiling_s=0.5)
    table.sample(A, 0.001)
    return Liveness(table, failed_ttl_s=60.0)


def test_an_unanswered_request_makes_a_contact_suspect_after_its_stall_time() -> None:
    live = fresh()
    live.sent(IB, B, now=10.0)
    assert not live.suspect(IB, B, now=10.04)
    assert live.suspect(IB, B, now=10.05)
    live.answered(IB, B)
    assert not live.suspect(IB, B, now=11.0), "any answer clears it"


def test_a_failure_lasts_the_ttl_by_id_and_by_address() -> None:
    live = fresh()
    live.missed(IA, A, now=100.0)
    assert live.suspect(IA, A, now=159.9)
    assert live.suspect(b"x" * 20, A, now=120.0), "the same address under another id"
    assert not live.suspect(IA, A, now=160.0)


def test_failed_contacts_are_the_recent_failures_and_the_silent_ones() -> None:
    live = fresh()
    live.missed(IA, A, now=0.0)
    live.sent(IB, B, now=100.0)
    assert live.failed_contacts(now=100.01) == {}, "A is too old, B not silent long enough"
    assert live.failed_contacts(now=100.2) == {B: 100.0}
    live.remember_failed(A, at=90.0)
    assert live.failed_contacts(now=100.2) == {A: 90.0, B: 100.0}


def test_the_failure_tables_are_bounded() -> None:
    live = Liveness(RttTable(floor_s=0.05, ceiling_s=0.5), max_failed=2)
    for i in range(5):
        live.missed(bytes([i]) * 20, ("10.0.0.9", i + 1), now=1.0)
    assert len(live.failed_contacts(now=2.0)) == 2
