"""The duties a seed runs, assembled: announcer, garbage collector, re-announcer, repairer, keeper, summary."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from p2pmega.core.geo import GeoTable
from p2pmega.core.magnet import KeepCap
from p2pmega.defaults import GC_INTERVAL_S, LEASE_S, REANNOUNCE_INTERVAL_S
from p2pmega.node import Duty, Node, NodeSettings
from p2pmega.replicate.duties import Announcer, GarbageCollector, Reannouncer, Summary
from p2pmega.replicate.forward import Forwarder
from p2pmega.replicate.keeper import Keeper
from p2pmega.replicate.repair import Repairer, RepairPolicy


@dataclass(frozen=True, kw_only=True)
class HolderDuties:
    """What a seed does over time, beyond answering requests; the defaults are the production values."""

    geo: GeoTable | None = None
    gc_interval_s: float = GC_INTERVAL_S
    reannounce_s: float = REANNOUNCE_INTERVAL_S
    repair: RepairPolicy | None = field(
        default_factory=RepairPolicy
    )  # None: this holder never repairs
    keep: Sequence[KeepCap] = ()
    keep_lease_s: float = LEASE_S
    announce_quiet_s: float | None = None  # None: the announcer's default
    announce_delay_s: float | None = None


@dataclass(eq=False)
class Duties:
    """The duties of one node, made when it starts (``Node(settings, duties=Duties(...))``)."""

    config: HolderDuties | None  # None: a DHT-only node (bootstrap), which only reports its summary
    report: Callable[[str], None]
    summary: Summary | None = None
    repairer: Repairer | None = None
    keeper: Keeper | None = None

    def __call__(self, node: Node) -> Sequence[Duty]:
        self.summary = Summary(node, self.report)
        if self.config is None or node.store is None:
            return [self.summary]
        c = self.config
        announcer = Announcer(node)
        if c.announce_quiet_s is not None:
            announcer.quiet_s = c.announce_quiet_s
        if c.announce_delay_s is not None:
            announcer.delay_s = c.announce_delay_s
        self.summary.announcer = announcer
        forwarder = Forwarder(node)
        self.summary.extra.append(forwarder.summary)
        duties: list[Duty] = [
            announcer,
            forwarder,
            GarbageCollector(node, c.gc_interval_s),
            Reannouncer(node, announcer, c.reannounce_s),
        ]
        if c.repair is not None:
            self.repairer = Repairer(node, c.geo, c.repair)
            self.summary.extra.append(self.repairer.summary)
            duties.append(self.repairer)
        if c.keep:
            policy = c.repair or RepairPolicy()
            self.keeper = Keeper(node, list(c.keep), c.geo, c.keep_lease_s, policy)
            self.summary.extra.append(self.keeper.summary)
            duties.append(self.keeper)
        return [*duties, self.summary]

    @property
    def announcer(self) -> Announcer | None:
        return self.summary.announcer if self.summary is not None else None

    def line(self) -> str:
        """The node's summary line (the last one, at exit)."""
        return self.summary.line() if self.summary is not None else ""


def holder_node(settings: NodeSettings, config: HolderDuties | None = None) -> tuple[Node, Duties]:
    """A holder node with its duties (the production ones unless ``config``); the duties report to the log."""
    duties = Duties(
        config or HolderDuties(geo=settings.geo), logging.getLogger("p2pmega.node").info
    )
    return Node(settings, duties=duties), duties
