"""Byte counts people type: the quota option's parser and its default."""

from __future__ import annotations

import re
from decimal import Decimal

from p2pmega.errors import BadOption

# 10 GB is a share of a laptop disk most users will not notice, yet holds ~5,000 chunks of the default 2 MiB.
DEFAULT_QUOTA_BYTES = 10 * 1000**3

# Decimal units are 1000-based and binary units 1024-based (IEC 80000-13); a bare number is bytes.
_SIZE_UNITS = {"": 1, "b": 1} | {
    unit: base**power
    for power, prefix in enumerate("kmgt", start=1)
    for unit, base in (
        (prefix, 1000),
        (prefix + "b", 1000),
        (prefix + "i", 1024),
        (prefix + "ib", 1024),
    )
}
_SIZE_TEXT = re.compile(
    r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*", re.ASCII | re.IGNORECASE
)


def parse_size(text: str) -> int:
    """Parse a human byte count such as ``10GB``, ``512MiB``, ``1.5G`` or ``100000``.

    Args:
        text: A non-negative number, optionally with a unit (case-insensitive): B, K/KB, M/MB,
            G/GB, T/TB (powers of 1000) or Ki/KiB, Mi/MiB, Gi/GiB, Ti/TiB (powers of 1024).

    Returns:
        The number of bytes, rounded down to a whole byte.

    Raises:
        BadOption: ``text`` is not a number with a known unit.
    """
    match = _SIZE_TEXT.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise BadOption(
            f"size {text!r} is not a byte count; write e.g. 10GB, 512MiB, 1.5G or 100000"
        )
    return int(Decimal(match.group(1)) * _SIZE_UNITS[unit])


def format_size(count: int) -> str:
    """A byte count as people read it, in the decimal units --quota takes by default: ``1.5 GB``, ``640 kB``.

    Args:
        count: bytes, >= 0.

    Returns:
        At most three significant digits and a unit (B, kB, MB, GB, TB).
    """
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{count} B" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1000
    return f"{value:.3g} TB"
