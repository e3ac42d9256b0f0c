"""What the storage peers a share or repair found lack for the placement rule, in one clause of an error."""

from __future__ import annotations

from p2pmega.core.placement import PoolSummary


def shortfall(summary: PoolSummary, replicas: int, min_countries: int, *, geo_table: bool) -> str:
    """What the storage peers found lack for the rule, and which option (or peers) would help.

    Args:
        summary: what the storage peers offer (core.placement.summarize).
        replicas: the rule's holders per chunk.
        min_countries: the rule's countries per chunk.
        geo_table: whether a geo table was given (unknown countries then need lines in it, not the option).

    Returns:
        One clause for a share error: "need ..., but found ...; <what to do>".
    """
    need = (
        f"need {replicas} holders on distinct /24 (IPv6 /48) networks in {min_countries} countries"
    )
    found = _found(summary)
    if summary.short_of_holders(replicas):
        if summary.networks == 0:
            hint = "start storage peers (p2pmega seed) or check --bootstrap"
        else:
            hint = f"lower --replicas to {summary.networks} or add storage peers"
    elif summary.short_of_countries(min_countries):
        lower = (
            f" or lower --min-countries to {summary.max_countries}"
            if summary.max_countries >= 1
            else ""
        )
        if summary.unknown and not geo_table:
            hint = (
                "unknown never counts as a country: pass --geo-table FILE (or set P2PMEGA_GEO_TABLE) "
                f"mapping their addresses to countries{lower}"
            )
        elif summary.unknown:
            hint = f"unknown never counts as a country: add their networks to the geo table{lower}"
        else:
            hint = f"lower --min-countries to {summary.max_countries} or add storage peers in other countries"
    else:
        # Enough networks and enough countries, but not both at once (the countries sit on shared networks).
        hint = "lower --replicas or --min-countries, or add storage peers in other countries"
    return f"{need}, but {found}; {hint}"


def _found(summary: PoolSummary) -> str:
    if summary.peers == 0:
        return "found no storage peer"
    peers = f"{summary.peers} storage peer{'s' if summary.peers != 1 else ''}"
    if summary.networks < summary.peers:
        peers += f" on {summary.networks} distinct networks"
    if not summary.countries:
        return f"found {peers}, all of unknown country"
    where = f"found {peers} in {', '.join(summary.countries)}"
    if summary.unknown:
        where += f" and {summary.unknown} of unknown country"
    return where
