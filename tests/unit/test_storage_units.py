"""parse_size: the pure part of p2pmega.storage (the store itself is in tests/integration)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pmega.errors import BadOption, UsageError
from p2pmega.storage import DEFAULT_QUOTA_BYTES, parse_size

MULTIPLIERS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
    "T": 1000**4,
    "TB": 1000**4,
    "Ki": 1024,
    "KiB": 1024,
    "Mi": 1024**2,
    "MiB": 1024**2,
    "Gi": 1024**3,
    "GiB": 1024**3,
    "Ti": 1024**4,
    "TiB": 1024**4,
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10GB", 10_000_000_000),
        ("512MiB", 536_870_912),
        ("1.5G", 1_500_000_000),
        ("100000", 100_000),
        ("0", 0),
        ("1b", 1),
        ("2kib", 2048),
        (" 3 MB ", 3_000_000),
        ("1.1KiB", 1126),  # 1126.4 rounds down to a whole byte
        (".5K", 500),
        ("7.", 7),
    ],
)
def test_parse_size_examples(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@given(
    number=st.integers(min_value=0, max_value=10**6),
    unit=st.sampled_from(sorted(MULTIPLIERS)),
    lower=st.booleans(),
)
def test_parse_size_integer_with_any_unit(number: int, unit: str, lower: bool) -> None:
    text = f"{number}{unit.lower() if lower else unit}"
    assert parse_size(text) == number * MULTIPLIERS[unit]


@given(st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False))
def test_parse_size_fraction_is_exact_then_rounds_down(value: Decimal) -> None:
    assert parse_size(f"{value}GiB") == int(value * 1024**3)


@pytest.mark.parametrize(
    "text", ["", " ", "GB", "-5", "1e3", "10XB", "10 G B", "1,5G", "1.2.3", "٣GB", "10gb!"]
)
def test_parse_size_rejects_and_names_text(text: str) -> None:
    with pytest.raises(BadOption) as info:
        parse_size(text)
    assert repr(text) in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UsageError)
    assert info.value.exit_code == 2


def test_default_quota_is_ten_gigabytes() -> None:
    assert parse_size("10GB") == DEFAULT_QUOTA_BYTES


def test_format_size_uses_the_units_quota_takes() -> None:
    """Sizes read in one unit family: the quota's decimal units (issue 21, bug 8)."""
    from p2pmega.storage.sizes import format_size, parse_size

    assert format_size(0) == "0 B"
    assert format_size(999) == "999 B"
    assert format_size(1500) == "1.5 kB"
    assert format_size(10 * 1000**3) == "10 GB"
    assert format_size(2 * 1024**2) == "2.1 MB"
    assert parse_size(format_size(10 * 1000**3).replace(" ", "")) == 10 * 1000**3
