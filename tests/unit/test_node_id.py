"""core.node_id: vectors, the network binding, and tamper cases."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pmega.core.node_id import matches, network_of, node_id_for, prefix_matches

KEY = bytes(range(32))

# Pinned so that the id derivation never changes by accident (docs/IDENTITY.md, "Node ids").
VECTORS = [
    ("127.1.1.1", "a2c5a29cbfdb4a48790c0b2c820c592e60a57b22"),
    ("127.1.1.200", "a2c5a29cbfdb4a48790c0b2c820c592e60a57b22"),
    ("127.1.2.1", "fa7b7a9cbfdb4a48790c0b2c820c592e60a57b22"),
    ("2001:db8:1:2::5", "f7d89a9cbfdb4a48790c0b2c820c592e60a57b22"),
    ("::ffff:127.1.1.9", "a2c5a29cbfdb4a48790c0b2c820c592e60a57b22"),
]


@pytest.mark.parametrize(("ip", "expected_hex"), VECTORS)
def test_vectors(ip, expected_hex):
    assert node_id_for(KEY, ip).hex() == expected_hex
    assert matches(bytes.fromhex(expected_hex), KEY, ip)
    assert prefix_matches(bytes.fromhex(expected_hex), ip)


def test_networks_are_slash24_and_slash48():
    assert network_of("10.1.2.3") == bytes([10, 1, 2, 0])
    assert network_of("::ffff:10.1.2.3") == bytes([10, 1, 2, 0])
    assert network_of("2001:db8:1:2:3::1") == bytes.fromhex("20010db8000100000000000000000000")


def test_same_key_other_network_is_another_id_with_the_same_tail():
    a, b = node_id_for(KEY, "127.1.1.1"), node_id_for(KEY, "127.9.9.1")
    assert a != b
    assert a[3:] == b[3:]
    assert not matches(a, KEY, "127.9.9.1")
    assert not prefix_matches(a, "127.9.9.1")


@given(st.binary(min_size=32, max_size=32), st.integers(0, 2**32 - 1), st.integers(0, 159))
def test_any_flipped_bit_is_refused(key, ip_int, bit):
    ip = ".".join(str((ip_int >> s) & 0xFF) for s in (24, 16, 8, 0))
    node_id = node_id_for(key, ip)
    tampered = bytearray(node_id)
    tampered[bit // 8] ^= 0x80 >> (bit % 8)
    assert matches(node_id, key, ip)
    assert not matches(bytes(tampered), key, ip)


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_another_key_is_refused(key, other):
    if key != other:
        assert not matches(node_id_for(key, "127.3.4.1"), other, "127.3.4.1")


@given(st.lists(st.binary(min_size=32, max_size=32), min_size=40, max_size=60, unique=True))
def test_one_network_has_at_most_eight_prefixes(keys):
    prefixes = {node_id_for(k, "127.5.6.1")[:3] for k in keys}
    masked = {p[:2] + bytes([p[2] & 0xF8]) for p in prefixes}
    assert len(masked) <= 8


@pytest.mark.parametrize(
    ("node_id", "key", "ip"),
    [
        (b"\x00" * 19, KEY, "127.0.0.1"),
        (b"\x00" * 20, KEY[:31], "127.0.0.1"),
        (b"\x00" * 20, KEY, "nope"),
    ],
)
def test_malformed_input_never_matches(node_id, key, ip):
    assert not matches(node_id, key, ip)


def test_prefix_check_refuses_malformed():
    assert not prefix_matches(b"\x00" * 19, "127.0.0.1")
    assert not prefix_matches(node_id_for(KEY, "127.0.0.1"), "not an ip")
