"""core.record: provider-record and contacts-file codecs, reply checks, the bounded ProviderTable."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pmega.core.ids import dht_key_of
from p2pmega.core.record import (
    MAX_RECORD_TTL_S,
    ProviderLimits,
    ProviderRecord,
    ProviderTable,
    decode_contacts,
    decode_find_providers_reply,
    decode_provider_record,
    encode_provider_record,
    format_contacts_file,
    is_peer_ip,
    is_port,
    parse_contacts_file,
)
from p2pmega.errors import RemoteProtocolError

ID = bytes(range(20))

records = st.builds(
    ProviderRecord,
    node_id=st.binary(min_size=20, max_size=20),
    host=st.ip_addresses(v=4).map(str).filter(is_peer_ip),
    port=st.integers(1, 65535),
    expires_in=st.integers(1, MAX_RECORD_TTL_S),
)


@given(records)
def test_provider_record_round_trips(record: ProviderRecord) -> None:
    wire = encode_provider_record(record)
    assert wire[0] == 1
    assert decode_provider_record(wire) == record


def test_provider_record_of_a_later_version_is_skipped() -> None:
    assert decode_provider_record([2, "anything", "goes"]) is None


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        ["1", ID, "10.0.0.1", 80, 5],
        [1, ID[:19], "10.0.0.1", 80, 5],
        [1, ID, "example.org", 80, 5],
        [1, ID, "0.0.0.0", 80, 5],
        [1, ID, "10.0.0.1", 0, 5],
        [1, ID, "10.0.0.1", True, 5],
        [1, ID, "10.0.0.1", 80, 0],
        [1, ID, "10.0.0.1", 80, MAX_RECORD_TTL_S + 1],
        [1, ID, "10.0.0.1", 80],
    ],
)
def test_bad_provider_record_is_refused(raw: object) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_provider_record(raw)


def test_contact_list_is_bounded_and_typed() -> None:
    good = [[ID, "127.0.0.1", 9000]]
    assert decode_contacts(good, max_contacts=1) == [(ID, "127.0.0.1", 9000)]
    for bad in (good * 2, [[ID, "127.0.0.1"]], [[ID, "127.0.0.1", 70000]], [[1, 2, 3]], 5):
        with pytest.raises(RemoteProtocolError):
            decode_contacts(bad, max_contacts=1)


def test_find_providers_reply_decodes_and_refuses_too_many_records() -> None:
    rec = ProviderRecord(ID, "127.1.1.1", 4000, 60)
    reply = [1, [encode_provider_record(rec)], [[ID, "127.1.1.1", 9000]]]
    records_, contacts = decode_find_providers_reply(reply, max_contacts=20, max_providers=1)
    assert records_ == [rec]
    assert contacts == [(ID, "127.1.1.1", 9000)]
    with pytest.raises(RemoteProtocolError):
        decode_find_providers_reply(
            [1, [encode_provider_record(rec)] * 2, []], max_contacts=20, max_providers=1
        )
    with pytest.raises(RemoteProtocolError):
        decode_find_providers_reply([2, [], []], max_contacts=20, max_providers=1)


def test_dht_key_is_the_first_20_bytes() -> None:
    chunk_id = bytes(range(32))
    assert dht_key_of(chunk_id) == chunk_id[:20]
    with pytest.raises(ValueError, match="32 bytes"):
        dht_key_of(b"short")


@pytest.mark.parametrize("value", [1, 65535])
def test_good_ports(value: object) -> None:
    assert is_port(value)


@pytest.mark.parametrize("value", [0, 65536, True, "80", 80.0])
def test_bad_ports(value: object) -> None:
    assert not is_port(value)


@pytest.mark.parametrize("value", ["127.3.4.1", "::1", "10.0.0.1"])
def test_peer_ips(value: object) -> None:
    assert is_peer_ip(value)


@pytest.mark.parametrize(
    "value", ["localhost", "224.0.0.1", "01.2.3.4", "0.0.0.0", b"127.0.0.1", 7]
)
def test_not_peer_ips(value: object) -> None:
    assert not is_peer_ip(value)


@given(st.lists(st.tuples(st.ip_addresses(v=4).map(str).filter(is_peer_ip), st.integers(1, 65535))))
def test_contacts_file_round_trips(contacts: list[tuple[str, int]]) -> None:
    text = format_contacts_file(contacts)
    assert json.loads(text)["version"] == 1
    assert parse_contacts_file(text) == contacts


def test_contacts_file_refuses_other_versions_and_drops_bad_entries() -> None:
    with pytest.raises(ValueError, match="version 1"):
        parse_contacts_file('{"version": 2, "contacts": []}')
    with pytest.raises(ValueError, match="Expecting value"):
        parse_contacts_file("\x80pickle")
    text = '{"version": 1, "contacts": [["127.0.0.1", 5], ["host.example", 5], ["127.0.0.2", 0]]}'
    assert parse_contacts_file(text) == [("127.0.0.1", 5)]


def test_table_expires_and_refreshes_records() -> None:
    table = ProviderTable(ttl_s=10)
    key = b"k" * 20
    assert table.add(key, ID, "10.0.0.1", 4000, now=0)
    assert table.get(key, now=5) == [ProviderRecord(ID, "10.0.0.1", 4000, 5)]
    assert table.add(key, ID, "10.0.0.1", 4001, now=8)  # re-announce refreshes, not duplicates
    assert len(table) == 1
    assert table.get(key, now=12) == [ProviderRecord(ID, "10.0.0.1", 4001, 6)]
    assert table.expire(now=18) == 1
    assert table.get(key, now=18) == []
    assert len(table) == 0


def nid(i: int) -> bytes:
    return i.to_bytes(20, "big")


def test_table_caps_per_key_per_network_and_total_by_evicting_never_refusing_newcomers() -> None:
    # Issue 16: a flood from 3 addresses filled the table and every new record was refused.
    limits = ProviderLimits(
        max_per_key=3, max_per_key_per_network=2, max_per_network=4, max_total=6
    )
    table = ProviderTable(ttl_s=100, limits=limits)
    key = b"k" * 20
    assert table.add(key, nid(1), "10.0.0.1", 1, now=0)
    assert table.add(key, nid(2), "10.0.0.2", 1, now=0)  # same /24
    assert table.add(key, nid(3), "10.0.0.3", 1, now=0)  # per key per /24: replaces nid(1)
    assert {r.node_id for r in table.get(key, now=0)} == {nid(2), nid(3)}
    assert table.add(key, nid(4), "10.9.0.1", 1, now=0)  # the key is full now (3)
    # A newcomer from a third /24 pushes out the oldest record of the /24 holding the most.
    assert table.add(key, nid(5), "10.8.0.1", 1, now=0)
    assert {r.node_id for r in table.get(key, now=0)} == {nid(3), nid(4), nid(5)}
    # A /24 that already holds the most of a full key (here all hold one) cannot push others out.
    assert not table.add(key, nid(6), "10.9.0.2", 1, now=0)
    assert {r.node_id for r in table.get(key, now=0)} == {nid(3), nid(4), nid(5)}
    # Per /24 in total: the flooder's own oldest records go, others stay.
    for i in range(10):
        assert table.add(nid(100 + i), nid(8), "10.0.0.9", 1, now=1)
    assert table.network_count("10.0.0.77") == 4
    assert table.get(key, now=1)
    assert len(table) == 6
    # The whole table is full: a newcomer from a fresh /24 takes the place of the largest /24's oldest.
    assert table.add(b"n" * 20, nid(9), "10.7.0.1", 1, now=2)
    assert table.get(b"n" * 20, now=2)
    assert table.network_count("10.0.0.1") == 3
    assert len(table) == 6


def test_a_flood_from_three_networks_leaves_room_for_everyone_else() -> None:
    table = ProviderTable(ttl_s=1000, limits=ProviderLimits(max_per_network=100, max_total=1000))
    rng = random.Random(16)
    for i in range(30_000):
        table.add(rng.randbytes(20), nid(i), f"10.0.{i % 3}.1", 9, now=i / 1000)
    assert len(table) == 300
    for n in range(50):
        assert table.add(b"f" * 20, nid(n), f"10.{n + 1}.0.1", 9, now=40)
    assert len(table.get(b"f" * 20, now=40)) == 50
    assert all(table.network_count(f"10.0.{i}.1") == 100 for i in range(3))


def test_table_heap_stays_bounded_under_refresh_storm() -> None:
    table = ProviderTable(ttl_s=100)
    for i in range(10_000):
        table.add(b"k" * 20, ID, "10.0.0.1", 1, now=i / 1000)
    assert len(table) == 1
    assert len(table._expiry) <= 2 * len(table) + 1024 + 1


def test_the_contacts_file_remembers_failed_contacts_and_old_readers_ignore_them() -> None:
    from p2pmega.core.record import format_contacts_file, parse_contacts_file, parse_failed_contacts

    text = format_contacts_file([("10.0.0.1", 4000)], [("10.0.0.2", 4001, 1764806400.5)])
    assert parse_contacts_file(text) == [("10.0.0.1", 4000)]
    assert parse_failed_contacts(text) == [("10.0.0.2", 4001, 1764806400.5)]
    assert parse_failed_contacts(format_contacts_file([("10.0.0.1", 4000)])) == []
    spoiled = text.replace("1764806400.5", '"soon"')
    assert parse_failed_contacts(spoiled) == []
    assert parse_failed_contacts(text.replace('"10.0.0.2"', '"0.0.0.0"')) == []
