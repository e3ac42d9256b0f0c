"""core.geo: the override table parser and country_of (registry lookups only, never traffic)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmega.core.geo import GeoTable, country_of, parse_address, parse_geo_table
from p2pmega.errors import BadGeoTable, UsageError


@pytest.mark.parametrize(
    ("address", "country"),
    [
        ("8.8.8.8", "US"),  # Google public DNS
        ("193.0.0.1", "NL"),  # RIPE NCC, Amsterdam
        ("202.12.29.1", "AU"),  # APNIC, Brisbane
        ("200.160.0.1", "BR"),  # NIC.br, Sao Paulo
        ("::ffff:8.8.8.8", "US"),  # IPv4-mapped form from a dual-stack socket
        ("2001:4860:4860::8888", "US"),  # Google public DNS over IPv6
        ("2001:67c:2e8::1", "NL"),  # RIPE NCC over IPv6
    ],
)
def test_registry_answers_for_well_known_addresses(address: str, country: str) -> None:
    assert country_of(address) == country


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",  # loopback
        "10.1.2.3",  # private
        "192.168.1.1",
        "172.16.0.1",
        "169.254.1.1",  # link-local
        "100.64.0.1",  # CGNAT shared address space
        "192.0.2.1",  # documentation
        "224.0.0.1",  # multicast
        "240.0.0.1",  # reserved
        "0.0.0.0",
        "::1",
        "fe80::1%eth0",
        "fc00::1",  # unique local
        "2001:db8::1",  # documentation
        "ff02::1",
        "::ffff:10.0.0.1",
        "::ffff:127.0.0.1",
    ],
)
def test_non_global_addresses_are_unknown(address: str) -> None:
    assert country_of(address) is None


@pytest.mark.parametrize("address", ["", "garbage", "example.org", "8.8.8", "8.8.8.8:53", "[::1]"])
def test_non_addresses_are_unknown_not_errors(address: str) -> None:
    assert parse_address(address) is None
    assert country_of(address) is None


def test_parse_address_strips_zone_and_unwraps_mapped() -> None:
    assert parse_address("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert parse_address("::ffff:193.0.0.1") == ipaddress.ip_address("193.0.0.1")
    assert parse_address(" 8.8.8.8 ") == ipaddress.ip_address("8.8.8.8")


def test_conftest_table_maps_loopback_test_countries(geo_table_text: str) -> None:
    table = parse_geo_table(geo_table_text)
    assert country_of("127.1.5.1", table) == "DE"
    assert country_of("127.2.5.1", table) == "NZ"
    assert country_of("127.3.5.1", table) == "IS"
    assert country_of("127.4.5.1", table) == "CH"
    assert country_of("127.5.5.1", table) is None  # not listed: loopback stays unknown
    assert country_of("::ffff:127.2.9.1", table) == "NZ"


def test_override_beats_registry_and_longest_prefix_wins() -> None:
    table = parse_geo_table(
        "8.0.0.0/8 DE\n8.8.8.0/24 fr\n8.8.8.8 --\n193.0.0.0/16 SE\n2001:4860::/32 JP\n"
    )
    assert country_of("8.8.8.8", table) is None  # /32 `--` wins over /24 and /8
    assert country_of("8.8.8.9", table) == "FR"  # /24 wins over /8; stored upper-case
    assert country_of("8.1.2.3", table) == "DE"
    assert country_of("193.0.0.1", table) == "SE"
    assert country_of("2001:4860:4860::8888", table) == "JP"
    assert country_of("202.12.29.1", table) == "AU"  # not covered: registry answer


def test_override_order_in_file_does_not_matter() -> None:
    forward = parse_geo_table("10.0.0.0/8 DE\n10.1.0.0/16 NZ\n")
    backward = parse_geo_table("10.1.0.0/16 NZ\n10.0.0.0/8 DE\n")
    for table in (forward, backward):
        assert country_of("10.1.2.3", table) == "NZ"
        assert country_of("10.2.2.3", table) == "DE"


def test_ipv6_entries_and_zone_ids() -> None:
    table = parse_geo_table("fe80::/10 IS\n2001:db8:1::/48 CH\n::/0 --\n")
    assert country_of("fe80::1%eth0", table) == "IS"
    assert country_of("2001:db8:1:2::5", table) == "CH"
    assert country_of("2001:4860:4860::8888", table) is None  # ::/0 `--` overrides the registry
    assert country_of("8.8.8.8", table) == "US"  # an IPv6 default route says nothing about IPv4


def test_zero_prefix_ipv4_entry_covers_everything() -> None:
    table = parse_geo_table("0.0.0.0/0 DE\n")
    assert country_of("8.8.8.8", table) == "DE"
    assert country_of("10.0.0.1", table) == "DE"


def test_comments_blank_lines_and_whitespace() -> None:
    table = parse_geo_table("# header\n\n   \n  10.0.0.0/8\tDE   # office\n#10.1.0.0/16 NZ\n")
    assert table.entries == ((ipaddress.ip_network("10.0.0.0/8"), "DE"),)
    assert parse_geo_table("") == GeoTable()


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("10.0.0.0/33 DE", "'10.0.0.0/33' is not an IPv4 or IPv6 address or CIDR range"),
        ("example.org DE", "'example.org' is not an IPv4 or IPv6"),
        ("10.0.0.1/8 DE", "'10.0.0.1/8' has host bits set, did you mean 10.0.0.0/8?"),
        ("10.0.0.0/8", "missing country code after '10.0.0.0/8'"),
        ("10.0.0.0/8 DE FR", "expected 'CIDR CC', got 3 fields"),
        ("10.0.0.0/8 DEU", "'DEU' is not a two-letter country code or '--'"),
        ("10.0.0.0/8 D1", "'D1' is not a two-letter country code"),
        ("10.0.0.0/8 -", "'-' is not a two-letter country code"),
        ("10.0.0.0/8 ÄÖ", "'ÄÖ' is not a two-letter country code"),
        ("10.0.0.0/8 EU", "'EU' names no single country; use '--' for unknown"),
        ("10.0.0.0/8 zz", "'zz' names no single country"),
        ("fe80::%eth0/64 IS", "zone id in 'fe80::%eth0/64'"),
        ("::ffff:10.0.0.0/104 DE", "IPv4-mapped range; write it as an IPv4 range"),
    ],
)
def test_bad_lines_are_rejected_with_source_and_line_number(line: str, fragment: str) -> None:
    text = f"# overrides\n127.1.0.0/16 DE\n{line}\n127.2.0.0/16 NZ\n"
    with pytest.raises(BadGeoTable) as info:
        parse_geo_table(text, source="/etc/p2pmega/geo.txt")
    message = str(info.value)
    assert message.startswith("/etc/p2pmega/geo.txt:3: ")
    assert fragment in message
    assert message.endswith("fix or remove the line")
    assert "\n" not in message
    assert info.value.exit_code == UsageError.exit_code


def test_duplicate_range_names_the_first_line() -> None:
    with pytest.raises(
        BadGeoTable, match=r"^<table>:4: 10\.0\.0\.0/8 is already listed on line 2;"
    ):
        parse_geo_table("\n10.0.0.0/8 DE\n# again\n10.0.0.0/8 NZ\n")


def test_table_is_frozen_and_compares_by_entries() -> None:
    one = parse_geo_table("10.0.0.0/8 DE\n")
    two = parse_geo_table("10.0.0.0/8 de  # same\n")
    assert one == two
    assert hash(one) == hash(two)
    with pytest.raises(AttributeError):
        one.entries = ()  # type: ignore[misc]


_CODES = ["DE", "NZ", "IS", "CH", None]


@settings(max_examples=60, deadline=None)
@given(
    entries=st.dictionaries(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)),
        st.sampled_from(_CODES),
        max_size=12,
    ),
    probe=st.integers(0, 2**32 - 1),
)
def test_lookup_matches_a_linear_longest_prefix_scan(
    entries: dict[tuple[int, int], str | None], probe: int
) -> None:
    networks: dict[ipaddress.IPv4Network, str | None] = {}
    for (value, plen), code in entries.items():
        networks[ipaddress.IPv4Network((value, plen), strict=False)] = code
    text = "".join(f"{net} {code or '--'}\n" for net, code in networks.items())
    table = parse_geo_table(text)
    address = ipaddress.IPv4Address(probe)
    covering = [net for net in networks if address in net]
    found, country = table.lookup(address)
    if covering:
        best = max(covering, key=lambda net: net.prefixlen)
        assert found
        assert country == networks[best]
        assert country_of(str(address), table) == networks[best]
    else:
        assert (found, country) == (False, None)
