"""Jurisdiction blocs: groups of countries that act together on a seizure, so two of them are one jurisdiction.

Pure: text in, a table out. The placement rule can count blocs instead of countries (core.placement, ``blocs=``):
a chunk on a peer in New Zealand and one in the United States is in two countries but, as the Megaupload raid of
January 2012 showed (New Zealand police, at the request of the United States), under one request.

The shipped table (``DEFAULT_BLOCS_TEXT``; its sources in docs/JURISDICTIONS.md) has two blocs, Five Eyes and
EU/EEA. A country in no bloc is a bloc of its own, named by its code. Operators replace the table with their own
file (``--blocs FILE`` or ``$P2PMEGA_BLOCS``) in the same format: one ``NAME: CC CC ...`` per line, ``#`` starts
a comment; a country may be in one bloc only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from p2pmega.errors import BadBlocTable

BLOC_TABLE_VERSION = 1
_NAME = re.compile(r"[A-Z][A-Z0-9-]{2,31}")
_COUNTRY = re.compile(r"[A-Z]{2}")

DEFAULT_BLOCS_TEXT = """\
# p2pmega jurisdiction blocs, version 1 (docs/JURISDICTIONS.md gives the sources).
# Countries that act together on seizures count as one jurisdiction for placement.
# UKUSA agreement (signals intelligence) and the mutual legal assistance treaties among its members.
FIVE-EYES: AU CA GB NZ US
# European Investigation Order (Directive 2014/41/EU), freezing and confiscation orders (Regulation (EU) 2018/1805),
# Eurojust and Europol among EU members; the EEA states through the 2000 EU Convention on Mutual Assistance
# association agreements (IS, NO) and Schengen cooperation (LI).
EU-EEA: AT BE BG CY CZ DE DK EE ES FI FR GR HR HU IE IT LT LU LV MT NL PL PT RO SE SI SK IS LI NO
"""


@dataclass(frozen=True)
class BlocTable:
    """Which bloc each listed country belongs to; a country not listed is a bloc of its own.

    Attributes:
        blocs: bloc name -> its countries, in file order.
    """

    blocs: tuple[tuple[str, tuple[str, ...]], ...] = ()
    _of: dict[str, str] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_of", {c: name for name, members in self.blocs for c in members})

    def bloc_of(self, country: str) -> str:
        """The bloc ``country`` (an upper-case ISO code) belongs to: a bloc name, or the code itself."""
        return self._of.get(country, country)

    def mapping(self) -> Mapping[str, str]:
        """Country -> bloc name for every listed country (what core.placement takes as ``blocs``)."""
        return dict(self._of)

    def spanned(self, countries: Iterable[str | None]) -> list[str]:
        """The distinct blocs of ``countries`` (unknown ones never count), sorted."""
        return sorted({self.bloc_of(c) for c in countries if c is not None})


def parse_bloc_table(text: str, source: str = "<blocs>") -> BlocTable:
    """Parse a bloc table: ``NAME: CC CC ...`` per line, ``#`` starts a comment.

    Args:
        text: the whole table.
        source: a name for messages, usually the file path.

    Returns:
        The parsed table.

    Raises:
        BadBlocTable: a line is malformed, a name repeats, a name looks like a country code, or a country is in
            two blocs; the message reads ``source:line: what is wrong``.
    """
    blocs: list[tuple[str, tuple[str, ...]]] = []
    where: dict[str, tuple[str, int]] = {}
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            name, sep, rest = line.partition(":")
            name = name.strip().upper()
            if not sep:
                raise ValueError("expected 'NAME: CC CC ...'")
            if not _NAME.fullmatch(name) or _COUNTRY.fullmatch(name):
                raise ValueError(
                    f"bloc name {name!r} must be 3-32 letters, digits or '-', starting with a letter"
                )
            if name in names:
                raise ValueError(f"bloc {name} is listed twice")
            members = [c.upper() for c in rest.split()]
            if not members:
                raise ValueError(f"bloc {name} lists no country")
            for country in members:
                if not _COUNTRY.fullmatch(country):
                    raise ValueError(f"{country!r} is not a two-letter country code")
                if country in where:
                    other, line_no = where[country]
                    raise ValueError(f"{country} is already in bloc {other} (line {line_no})")
                where[country] = (name, number)
        except ValueError as exc:
            raise BadBlocTable(f"{source}:{number}: {exc}; fix or remove the line") from None
        names.add(name)
        blocs.append((name, tuple(members)))
    return BlocTable(blocs=tuple(blocs))


DEFAULT_BLOCS = parse_bloc_table(DEFAULT_BLOCS_TEXT, source="<shipped blocs>")
