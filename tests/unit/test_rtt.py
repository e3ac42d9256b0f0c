"""core.rtt: RFC 6298's estimator and the stall time a lookup waits on a query."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pmega.core.rtt import GRANULARITY_S, RttEstimate, RttTable


def test_rfc_6298_first_sample_then_averages() -> None:
    est = RttEstimate.first(0.100)
    assert (est.srtt_s, est.rttvar_s) == (0.100, 0.050)
    assert est.rto_s == pytest.approx(0.300)
    est.update(0.200)
    # RTTVAR = 3/4 x 0.05 + 1/4 x |0.1 - 0.2| = 0.0625; SRTT = 7/8 x 0.1 + 1/8 x 0.2 = 0.1125
    assert est.rttvar_s == pytest.approx(0.0625)
    assert est.srtt_s == pytest.approx(0.1125)
    assert est.rto_s == pytest.approx(0.1125 + 4 * 0.0625)


def test_steady_samples_converge_to_the_rtt_plus_granularity() -> None:
    est = RttEstimate.first(0.080)
    for _ in range(200):
        est.update(0.080)
    assert est.rto_s == pytest.approx(0.080 + GRANULARITY_S, abs=1e-6)


def test_a_peer_heard_before_keeps_its_own_estimate() -> None:
    table = RttTable(floor_s=0.05, ceiling_s=0.5)
    assert table.stall_after("anyone") == 0.5, "nothing measured yet: the ceiling"
    for _ in range(50):
        table.sample("fast", 0.0003)
    table.sample("slow", 0.4)
    for _ in range(50):
        table.sample("fast", 0.0003)
    assert table.stall_after("fast") == 0.05, "loopback: the floor"
    assert table.stall_after("stranger") == 0.05, "a peer never heard from: everyone's estimate"
    assert table.stall_after("slow") >= 0.4, "a slow peer that answered is waited for"


def test_the_table_is_bounded() -> None:
    table = RttTable(floor_s=0.01, ceiling_s=1.0, max_peers=3)
    for peer in range(10):
        table.sample(peer, 0.5)
    assert len(table._peers) == 3
    assert table.stall_after(0) == table.stall_after("never")


@given(st.lists(st.floats(min_value=0.0, max_value=30.0), min_size=1, max_size=50))
def test_stall_stays_within_floor_and_ceiling(samples: list[float]) -> None:
    table = RttTable(floor_s=0.05, ceiling_s=0.5)
    for i, rtt in enumerate(samples):
        table.sample(i % 3, rtt)
    for peer in (0, 1, 2, "other"):
        assert 0.05 <= table.stall_after(peer) <= 0.5


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="floor"):
        RttTable(floor_s=0.5, ceiling_s=0.1)
