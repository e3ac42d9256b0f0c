"""The LAN announcement datagram (version 1) and the receive-side rate limiter: pure, no sockets."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pmega.core.lan_codec import (
    ANNOUNCEMENT_BYTES,
    LSD_MAGIC,
    LSD_VERSION,
    Announcement,
    AnnouncementLimiter,
    Verdict,
    check_source_host,
    decode_announcement,
    encode_announcement,
)
from p2pmega.errors import RemoteProtocolError

NODE_ID = bytes(range(20))
COOKIE = b"\xc0\x0c\x1e\x00\x01\x02\x03\x04"

announcements = st.builds(
    Announcement,
    node_id=st.binary(min_size=20, max_size=20),
    dht_port=st.integers(min_value=1, max_value=65535),
    cookie=st.binary(min_size=8, max_size=8),
)


@given(announcements)
def test_decode_inverts_encode(announcement: Announcement) -> None:
    data = encode_announcement(announcement)
    assert len(data) == ANNOUNCEMENT_BYTES == 42
    assert decode_announcement(data) == announcement


def test_golden_datagram_byte_by_byte() -> None:
    """Freezes the version-1 layout of docs/LAN.md; a diff here means: bump the version."""
    data = encode_announcement(Announcement(node_id=NODE_ID, dht_port=0x1A2B, cookie=COOKIE))
    assert data == b"P2PMEGA-LSD" + b"\x01" + NODE_ID + b"\x1a\x2b" + COOKIE
    assert data.hex() == (
        "5032504d4547412d4c534401000102030405060708090a0b0c0d0e0f101112131a2bc00c1e0001020304"
    )


def test_announcement_has_no_host_field() -> None:
    """A forged host is impossible by construction: receivers only ever see the source address."""
    assert [f.name for f in dataclasses.fields(Announcement)] == ["node_id", "dht_port", "cookie"]


VALID = encode_announcement(Announcement(node_id=NODE_ID, dht_port=4000, cookie=COOKIE))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "magic"),
        (b"BT-SEARCH * HTTP/1.1\r\nHost: 239.192.152.143:6771\r\n\r\n", "magic"),
        (b"p2pmega-lsd" + VALID[11:], "magic"),
        (LSD_MAGIC, "truncated"),
        (LSD_MAGIC + b"\x02" + VALID[12:], "unknown version 2"),
        (LSD_MAGIC + b"\x00" + VALID[12:], "unknown version 0"),
        (VALID[:-1], "41 bytes"),
        (VALID[:12], "12 bytes"),
        (VALID + b"\x00", "43 bytes"),
        (VALID + b"x" * 60000, "60042 bytes"),
        # A 19-byte node id makes the datagram one byte short, a 21-byte one one byte long.
        (LSD_MAGIC + b"\x01" + NODE_ID[:19] + b"\x0f\xa0" + COOKIE, "41 bytes"),
        (LSD_MAGIC + b"\x01" + NODE_ID + b"\x00" + b"\x0f\xa0" + COOKIE, "43 bytes"),
        (LSD_MAGIC + b"\x01" + NODE_ID + b"\x00\x00" + COOKIE, "port 0"),
    ],
)
def test_malformed_datagrams_are_rejected(data: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason) as info:
        decode_announcement(data)
    assert "\n" not in str(info.value)


@given(st.binary(max_size=100))
def test_decode_of_arbitrary_bytes_returns_or_raises_protocol_error(data: bytes) -> None:
    try:
        announcement = decode_announcement(data)
    except RemoteProtocolError:
        return
    assert encode_announcement(announcement) == data


@given(st.binary(min_size=30, max_size=30))
def test_any_well_framed_body_decodes_unless_port_zero(body: bytes) -> None:
    data = LSD_MAGIC + bytes([LSD_VERSION]) + body
    if data[32:34] == b"\x00\x00":
        with pytest.raises(RemoteProtocolError):
            decode_announcement(data)
    else:
        assert decode_announcement(data).dht_port == int.from_bytes(data[32:34], "big")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"node_id": NODE_ID[:19], "dht_port": 1, "cookie": COOKIE},
        {"node_id": NODE_ID, "dht_port": 0, "cookie": COOKIE},
        {"node_id": NODE_ID, "dht_port": 65536, "cookie": COOKIE},
        {"node_id": NODE_ID, "dht_port": 1, "cookie": COOKIE[:7]},
    ],
)
def test_announcement_refuses_bad_fields(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"must be"):
        Announcement(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["127.3.1.1", "192.168.1.20", "10.0.0.1"])
def test_unicast_sources_pass(host: str) -> None:
    check_source_host(host)


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("0.0.0.0", "non-unicast"),
        ("255.255.255.255", "non-unicast"),
        ("224.0.0.1", "non-unicast"),
        ("::1", "non-IPv4"),
        ("example.org", "non-IPv4"),
    ],
)
def test_non_unicast_sources_are_rejected(host: str, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        check_source_host(host)


def test_limiter_reports_a_peer_once_per_window() -> None:
    limiter = AnnouncementLimiter(window_s=10.0, max_per_source=100, max_entries=10)
    assert limiter.admit("127.1.1.1", 4000, now=0.0) is Verdict.REPORT
    assert limiter.admit("127.1.1.1", 4000, now=5.0) is Verdict.DUPLICATE
    assert limiter.admit("127.1.1.1", 4000, now=9.9) is Verdict.DUPLICATE
    # Another port on the same host is another node; another host with the same port too.
    assert limiter.admit("127.1.1.1", 4001, now=9.9) is Verdict.REPORT
    assert limiter.admit("127.2.1.1", 4000, now=9.9) is Verdict.REPORT
    assert limiter.admit("127.1.1.1", 4000, now=10.0) is Verdict.REPORT


def test_limiter_caps_announcements_per_source() -> None:
    limiter = AnnouncementLimiter(window_s=10.0, max_per_source=3, max_entries=100)
    verdicts = [limiter.admit("127.9.1.1", 5000 + i, now=1.0) for i in range(5)]
    assert verdicts == [Verdict.REPORT] * 3 + [Verdict.RATE_LIMITED] * 2
    # Other sources are unaffected, and the flooder gets a fresh allowance in the next window.
    assert limiter.admit("127.8.1.1", 5000, now=1.0) is Verdict.REPORT
    assert limiter.admit("127.9.1.1", 6000, now=11.0) is Verdict.REPORT


def test_limiter_memory_is_bounded_and_recovers_after_a_window() -> None:
    limiter = AnnouncementLimiter(window_s=10.0, max_per_source=100, max_entries=4)
    assert [limiter.admit(f"127.0.{i}.1", 1, now=0.0) for i in range(4)] == [Verdict.REPORT] * 4
    assert limiter.admit("127.0.9.1", 1, now=5.0) is Verdict.FULL
    # A known source announcing a new port is refused too: the peer table is full.
    assert limiter.admit("127.0.0.1", 2, now=5.0) is Verdict.FULL
    # Once the old entries are a window old they are purged to make room.
    assert limiter.admit("127.0.9.1", 1, now=10.0) is Verdict.REPORT


def test_limiter_forget_allows_a_retry() -> None:
    limiter = AnnouncementLimiter(window_s=10.0, max_per_source=100, max_entries=10)
    assert limiter.admit("127.1.1.1", 4000, now=0.0) is Verdict.REPORT
    limiter.forget("127.1.1.1", 4000)
    assert limiter.admit("127.1.1.1", 4000, now=1.0) is Verdict.REPORT
    limiter.forget("127.5.5.5", 1)  # unknown peers are ignored


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window_s": 0.0, "max_per_source": 1, "max_entries": 1},
        {"window_s": 1.0, "max_per_source": 0, "max_entries": 1},
        {"window_s": 1.0, "max_per_source": 1, "max_entries": 0},
    ],
)
def test_limiter_refuses_non_positive_limits(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must be positive"):
        AnnouncementLimiter(**kwargs)  # type: ignore[arg-type]
