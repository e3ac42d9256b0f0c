"""core.magnet: link round trips, the keep-alive derivation, and strict rejection of bad links."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings

from p2pmega.core import crypto
from p2pmega.core.chunking import ChunkId
from p2pmega.core.magnet import MAX_LINK_CHARS, KeepCap, ReadCap, format_link, parse_link
from p2pmega.errors import BadLink, UsageError
from tests.strategies import keep_caps, read_caps
from tests.vectors.make_vectors import VECTORS_PATH

ROOT = ChunkId(bytes(range(32)))
KEY = bytes(range(100, 132))
GOOD = format_link(ReadCap(ROOT, KEY, "a b.txt", 12, (("192.0.2.1", 80), ("2001:db8::2", 443))))
KEY_TEXT = GOOD.split("x.key=")[1].split("&")[0]
ROOT_TEXT = GOOD.split("urn:p2pmega:")[1].split("&")[0]
HEAD = f"magnet:?xt=urn:p2pmega:{ROOT_TEXT}&x.key={KEY_TEXT}"


@settings(max_examples=60)
@given(cap=read_caps)
def test_read_link_round_trip(cap):
    text = format_link(cap)
    assert text.startswith("magnet:?xt=urn:p2pmega:")
    assert parse_link(text) == cap
    assert len(text) <= MAX_LINK_CHARS


@settings(max_examples=60)
@given(cap=keep_caps)
def test_keep_link_round_trip(cap):
    text = format_link(cap)
    assert text.startswith("magnet:?xt=urn:p2pmega-keep:")
    assert parse_link(text) == cap


def test_canonical_text_form():
    assert (
        f"magnet:?xt=urn:p2pmega:{ROOT_TEXT}&x.key={KEY_TEXT}&dn=a%20b.txt&xl=12"
        "&x.pe=192.0.2.1:80&x.pe=[2001:db8::2]:443"
    ) == GOOD
    assert len(ROOT_TEXT) == 52
    assert len(KEY_TEXT) == 43


def test_keep_cap_is_one_way_and_drops_name_and_size():
    cap = parse_link(GOOD)
    assert isinstance(cap, ReadCap)
    keep = cap.keep_cap()
    assert keep == KeepCap(ROOT, crypto.derive_key(KEY, b"p2pmega:verify:v1"), cap.peers)
    text = format_link(keep)
    assert KEY_TEXT not in text
    assert "dn=" not in text
    assert "xl=" not in text
    assert "x.key" not in text


def test_key_is_not_in_repr():
    assert KEY.hex() not in repr(parse_link(GOOD))
    assert repr(KEY) not in repr(parse_link(GOOD))


BAD = {
    "wrong scheme": ("http:?xt=urn:p2pmega:" + ROOT_TEXT, "does not start with 'magnet:?'"),
    "bittorrent": ("magnet:?xt=urn:btih:" + ROOT_TEXT, "xt must start with"),
    "no xt": (f"magnet:?x.key={KEY_TEXT}", "xt must start with"),
    "no key": (f"magnet:?xt=urn:p2pmega:{ROOT_TEXT}", "no x.key field"),
    "short root": (HEAD.replace(ROOT_TEXT, ROOT_TEXT[:-1]), "51 characters, expected 52"),
    "bad base32": (HEAD.replace(ROOT_TEXT, "1" + ROOT_TEXT[1:]), "not valid base32"),
    "upper-case base32": (HEAD.replace(ROOT_TEXT, ROOT_TEXT.upper()), "not canonical"),
    "non-canonical base32": (HEAD.replace(ROOT_TEXT, ROOT_TEXT[:-1] + "b"), "not canonical"),
    "short key": (HEAD.replace(KEY_TEXT, KEY_TEXT[:-2]), "41 characters, expected 43"),
    "bad base64": (HEAD.replace(KEY_TEXT, "*" + KEY_TEXT[1:]), "not valid base64url"),
    "non-canonical base64": (HEAD.replace(KEY_TEXT, KEY_TEXT[:-1] + "B"), "not canonical"),
    "standard base64": (HEAD.replace(KEY_TEXT, "+" + KEY_TEXT[1:]), "not valid base64url"),
    "duplicate key": (HEAD + f"&x.key={KEY_TEXT}", "appears 2 times"),
    "duplicate dn": (HEAD + "&dn=a&dn=b", "'dn' appears 2 times"),
    "duplicate xt": (HEAD + f"&xt=urn:p2pmega:{ROOT_TEXT}", "'xt' appears 2 times"),
    "trailing &": (HEAD + "&", "is not key=value"),
    "trailing junk": (HEAD + "junk", "43"),
    "junk field": (HEAD + "&junk", "'junk' is not key=value"),
    "unknown field": (HEAD + "&tr=udp://x", "'tr' is not allowed"),
    "empty value": (HEAD + "&dn=", "is not key=value"),
    "raw space in dn": (HEAD + "&dn=a b", "must be percent-encoded"),
    "bad escape in dn": (HEAD + "&dn=a%2", "bad % escape"),
    "non-utf8 dn": (HEAD + "&dn=%FF", "not UTF-8"),
    "control char in dn": (HEAD + "&dn=a%0Ab", "control character"),
    "long dn": (HEAD + "&dn=" + "a" * 1025, "longer than 1024"),
    "negative size": (HEAD + "&xl=-1", "not a decimal size"),
    "leading zero size": (HEAD + "&xl=01", "not a decimal size"),
    "huge size": (HEAD + f"&xl={1 << 64}", "not a decimal size"),
    "peer port 0": (HEAD + "&x.pe=192.0.2.1:0", "port 1-65535"),
    "peer port too big": (HEAD + "&x.pe=192.0.2.1:65536", "port 1-65535"),
    "peer without port": (HEAD + "&x.pe=192.0.2.1", "host:port"),
    "peer hostname": (HEAD + "&x.pe=example.com:80", "not an IPv4 or [IPv6] literal"),
    "peer ipv6 without brackets": (HEAD + "&x.pe=2001:db8::1:80", "write IPv6 as [address]"),
    "peer ipv4 in brackets": (HEAD + "&x.pe=[192.0.2.1]:80", "IPv4 without []"),
    "peer ipv6 not canonical": (HEAD + "&x.pe=[2001:DB8::1]:80", "not a canonical"),
    "peer with zone": (HEAD + "&x.pe=[fe80::1%25eth0]:80", "not a canonical"),
    "duplicate peer": (HEAD + "&x.pe=192.0.2.1:80&x.pe=192.0.2.1:80", "appears twice"),
    "too many peers": (HEAD + "".join(f"&x.pe=192.0.2.1:{p}" for p in range(1, 18)), "at most 16"),
    "keep link with dn": (
        format_link(KeepCap(ROOT, KEY)) + "&dn=x",
        "'dn' is not allowed",
    ),
    "keep link with read key": (
        f"magnet:?xt=urn:p2pmega-keep:{ROOT_TEXT}&x.key={KEY_TEXT}",
        "'x.key' is not allowed",
    ),
    "non-ascii": (HEAD + "&dn=é", "non-ASCII"),
    "garbage": ("x" * 100_000, "100000 characters, over 8192"),
    "empty": ("", "does not start with"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_links_are_refused_with_a_reason(case):
    text, reason = BAD[case]
    with pytest.raises(BadLink, match=re.escape(reason)) as info:
        parse_link(text)
    assert isinstance(info.value, UsageError)
    message = str(info.value)
    assert "\n" not in message
    assert KEY_TEXT not in message
    assert len(message) < 200


@pytest.mark.parametrize("cut", [10, 30, 60, 80, 100, 110, len(HEAD) - 1])
def test_truncated_links_are_refused(cut):
    with pytest.raises(BadLink):
        parse_link(HEAD[:cut])


def test_caps_validate_their_fields():
    with pytest.raises(ValueError, match="32 bytes"):
        ReadCap(ChunkId(bytes(31)), KEY)
    with pytest.raises(ValueError, match="32 bytes"):
        KeepCap(ROOT, bytes(16))
    with pytest.raises(ValueError, match="port"):
        ReadCap(ROOT, KEY, peers=(("192.0.2.1", 0),))
    with pytest.raises(ValueError, match="canonical"):
        ReadCap(ROOT, KEY, peers=(("2001:DB8::1", 80),))


def test_golden_links_parse_to_their_values():
    vectors = json.loads(VECTORS_PATH.read_text())
    for vector in vectors["files"]:
        cap = parse_link(vector["read_link_with_peers"])
        assert isinstance(cap, ReadCap)
        assert cap.root.hex() == vector["root_id_hex"]
        assert cap.key.hex() == vector["file_key_hex"]
        assert (cap.name, cap.size) == (vector["name"], vector["size"])
        assert cap.peers == (("192.0.2.7", 4001), ("2001:db8::1", 4001))
        assert format_link(cap.keep_cap()) == vector["keep_link"] + "".join(
            f"&x.pe={p}" for p in ("192.0.2.7:4001", "[2001:db8::1]:4001")
        )
        assert format_link(cap) == vector["read_link_with_peers"]
