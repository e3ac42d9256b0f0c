"""How numbers read in messages: "1 peer", "2 peers". Pure; no I/O."""

from __future__ import annotations


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` and ``noun``, the noun in the plural unless the count is one.

    Args:
        count: how many.
        noun: the singular ("peer").
        plural: the plural where it is not noun + "s" ("countries").

    Returns:
        For example "1 peer", "0 peers", "2 countries".
    """
    if count == 1:
        return f"1 {noun}"
    return f"{count} {plural or noun + 's'}"
