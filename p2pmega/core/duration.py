"""Durations as people type them on the command line: ``90``, ``2s``, ``10m``, ``1h``, ``1.5d``."""

from __future__ import annotations

import math
import re

from p2pmega.errors import BadOption

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
# A year: longer than any interval or lease this tool has a use for, short enough to stay exact as a float.
MAX_DURATION_S = 366 * 86400.0


def parse_duration(text: str, *, option: str) -> float:
    """Seconds in ``text``: a number with an optional unit (s, m, h, d); a bare number is seconds.

    Args:
        text: what the user typed.
        option: the option's name, for the error ("--repair-interval").

    Raises:
        BadOption: not a positive duration of at most a year, naming the option and the forms it takes.
    """
    match = _DURATION.match(text.lower())
    if match is None:
        raise BadOption(f"{option} {text!r} is not a duration; write it like 2s, 10m, 1h or 1d")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_DURATION_S):
        raise BadOption(f"{option} {text!r}: give more than 0 and at most 366d")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest of ``45s``, ``10m``, ``2h``, ``30d`` (rounded) that reads naturally."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size:
            value = seconds / size
            return (
                f"{value:.0f}{unit}" if value >= 10 or value.is_integer() else f"{value:.1f}{unit}"
            )
    return f"{seconds:.0f}s"
