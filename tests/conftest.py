"""Shared fixtures: loopback addresses per country, geo tables for tests."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from p2pmega.api import testnet

# CI runs the property tests with a fixed seed, so a landing is never decided by a lucky draw; a developer's
# run explores new examples every time (and keeps any failure in .hypothesis/ to replay).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Country C, peer N lives at 127.C.N.1 (its own /24); all of 127.0.0.0/8 is loopback on Linux.


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` right now (the DHT and transfer share a number)."""
    return testnet.free_port(host)


def peer_address(country: int, peer: int) -> str:
    """The loopback address of peer ``peer`` in test country ``country``: 127.C.N.1."""
    return f"127.{country}.{peer}.1"


@pytest.fixture
def geo_table_text() -> str:
    """Maps test countries 127.1-127.4 to DE, NZ, IS, CH."""
    return "127.1.0.0/16 DE\n127.2.0.0/16 NZ\n127.3.0.0/16 IS\n127.4.0.0/16 CH\n"
