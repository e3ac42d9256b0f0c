"""Pipelined replication's pure rules: the expectations a holder keeps, and where a holder forwards to."""

from __future__ import annotations

import pytest

from p2pmega.core.ids import ChunkId
from p2pmega.replicate.forward import same_scope
from p2pmega.storage.expect import Expectations

KEY = bytes(range(32))
SHARER, OTHER = b"net-a", b"net-b"


def cid(n: int) -> ChunkId:
    return ChunkId(n.to_bytes(32, "big"))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_expectation_is_taken_once_with_the_sharers_terms() -> None:
    table = Expectations(clock=Clock())
    assert table.expect(SHARER, [cid(1), cid(2)], lease_s=600, renew_key=KEY) == [True, True]
    terms = table.take(cid(1))
    assert terms is not None
    assert (terms.source, terms.lease_s, terms.renew_key) == (SHARER, 600, KEY)
    assert table.take(cid(1)) is None, "one forward fulfils it"
    assert len(table) == 1


def test_an_expectation_lapses_after_its_ttl() -> None:
    clock = Clock()
    table = Expectations(ttl_s=120.0, clock=clock)
    table.expect(SHARER, [cid(1)], lease_s=600, renew_key=KEY)
    clock.now += 119.0
    table.expect(SHARER, [cid(2)], lease_s=600, renew_key=KEY)
    clock.now += 2.0
    assert table.take(cid(1)) is None
    assert table.take(cid(2)) is not None


def test_another_network_cannot_rewrite_a_sharers_terms() -> None:
    table = Expectations(clock=Clock())
    table.expect(SHARER, [cid(1)], lease_s=600, renew_key=KEY)
    assert table.expect(OTHER, [cid(1)], lease_s=5, renew_key=bytes(32)) == [False]
    terms = table.take(cid(1))
    assert terms is not None
    assert (terms.source, terms.lease_s) == (SHARER, 600)


def test_a_network_at_its_cap_replaces_its_own_oldest() -> None:
    table = Expectations(per_source=2, clock=Clock())
    assert table.expect(SHARER, [cid(1), cid(2), cid(3)], lease_s=1, renew_key=KEY) == [True] * 3
    assert (table.take(cid(1)), len(table)) == (None, 2)
    # Renewing an id already expected takes no new room.
    assert table.expect(SHARER, [cid(3)], lease_s=1, renew_key=KEY) == [True]
    assert table.take(cid(2)) is not None


def test_a_flood_from_a_few_networks_cannot_keep_a_sharer_out() -> None:
    """Review finding: 16 networks x 4096 ids filled the table and switched forwarding off for everyone."""
    table = Expectations(per_source=4, total=8, clock=Clock())
    for n in range(4):
        flood = [cid(1000 * n + i) for i in range(4)]
        table.expect(b"attacker-%d" % n, flood, lease_s=1, renew_key=KEY)
    assert len(table) == 8
    assert table.expect(SHARER, [cid(1), cid(2)], lease_s=600, renew_key=KEY) == [True, True]
    assert len(table) == 8
    assert table.take(cid(1)) is not None
    # Each place came from the network holding most at the time, never from the sharer's own.
    table.expect(b"attacker-0", [cid(9000 + i) for i in range(4)], lease_s=1, renew_key=KEY)
    assert table.take(cid(2)) is not None


def test_a_lapsed_expectation_makes_room_first() -> None:
    clock = Clock()
    table = Expectations(per_source=4, total=2, ttl_s=10.0, clock=clock)
    table.expect(OTHER, [cid(1)], lease_s=1, renew_key=KEY)
    clock.now += 5
    table.expect(b"net-c", [cid(2)], lease_s=1, renew_key=KEY)
    clock.now += 6  # cid(1) lapsed
    assert table.expect(SHARER, [cid(3)], lease_s=1, renew_key=KEY) == [True]
    assert table.take(cid(2)) is not None


def test_the_largest_network_cannot_take_more_when_full() -> None:
    table = Expectations(per_source=4, total=4, clock=Clock())
    table.expect(SHARER, [cid(1), cid(2), cid(3)], lease_s=1, renew_key=KEY)
    table.expect(OTHER, [cid(4)], lease_s=1, renew_key=KEY)
    assert table.expect(SHARER, [cid(5)], lease_s=1, renew_key=KEY) == [False]
    assert table.take(cid(4)) is not None


def test_a_failed_forward_puts_the_expectation_back_while_it_lives() -> None:
    clock = Clock()
    table = Expectations(ttl_s=100.0, clock=clock)
    table.expect(SHARER, [cid(1)], lease_s=600, renew_key=KEY)
    terms = table.take(cid(1))
    assert terms is not None
    table.put_back(cid(1), terms)
    assert table.take(cid(1)) == terms
    clock.now += 101
    table.put_back(cid(1), terms)
    assert table.take(cid(1)) is None, "a lapsed expectation is never restored"


def test_take_never_returns_a_lapsed_expectation() -> None:
    clock = Clock()
    table = Expectations(ttl_s=10.0, clock=clock)
    table.expect(SHARER, [cid(1)], lease_s=600, renew_key=KEY)
    clock.now += 10
    assert table.take(cid(1)) is None
    assert len(table) == 0


@pytest.mark.parametrize(
    ("requester", "target", "allowed"),
    [
        ("127.1.1.1", "127.2.1.1", True),
        ("10.77.16.2", "10.77.32.2", True),
        ("192.0.2.1", "8.8.8.8", False),  # a documentation range counts as private
        ("8.8.4.4", "1.1.1.1", True),
        ("8.8.4.4", "127.0.0.1", False),  # a sharer on the internet aiming at our loopback
        ("8.8.4.4", "192.168.1.10", False),  # ...or at our LAN
        ("10.0.0.5", "127.0.0.1", False),
        ("127.1.1.1", "8.8.8.8", False),
        ("8.8.4.4", "224.0.0.1", False),  # multicast
        ("8.8.4.4", "0.0.0.0", False),
        ("10.0.0.5", "169.254.169.254", False),  # link-local: a cloud's metadata service
        ("fe80::1", "fe80::2", False),
        ("2001:4860::1", "2606:4700::1111", True),
        ("2001:4860::1", "::1", False),
        ("8.8.4.4", "not an address", False),
    ],
)
def test_a_forward_stays_in_the_requesters_address_scope(
    requester: str, target: str, allowed: bool
) -> None:
    assert same_scope(requester, target) is allowed
