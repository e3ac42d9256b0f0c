"""The kademlia RoutingTable and value storage of a p2pmega DHT node, with kademlia's defects fixed.

Inclusive bucket ranges, a neighbour search that scans every bucket, values bounded in size and count.
No networking here; the protocol that feeds them is p2pmega.net.kademlia_protocol.
"""

from __future__ import annotations

import heapq

from kademlia.node import Node
from kademlia.routing import RoutingTable
from kademlia.storage import ForgetfulStorage


class HardenedRoutingTable(RoutingTable):  # type: ignore[misc]
    """RoutingTable with inclusive bucket ranges and an neighbour search (kademlia #28)."""

    def get_bucket_for(self, node: Node) -> int:
        for index, bucket in enumerate(self.buckets):
            if bucket.has_in_range(node):
                return index
        raise ValueError("node id outside the 160-bit space")

    def find_neighbors(
        self, node: Node, k: int | None = None, exclude: Node | None = None
    ) -> list[Node]:
        # At most 160 buckets of k contacts: scanning all is cheap and, unlike TableTraverser, never
        # stops early when an empty bucket sits next to the target's bucket.
        candidates = (
            n
            for bucket in self.buckets
            for n in bucket.get_nodes()
            if n.id != node.id and (exclude is None or not n.same_home_as(exclude))
        )
        return heapq.nsmallest(k or self.ksize, candidates, key=node.distance_to)

    def add_contact(self, node: Node) -> None:
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        if bucket.add_node(node):
            return
        # Per section 4.2 of the paper: split a full bucket that covers our own id (or whose depth
        # is not 0 mod 5); else ping its least recently seen contact, evicted if it keeps missing.
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
        else:
            self.protocol.spawn(self.protocol.call_ping(bucket.head()))

    def all_contacts(self) -> list[Node]:
        return [n for bucket in self.buckets for n in bucket.get_nodes()]


class BoundedStorage(ForgetfulStorage):  # type: ignore[misc]
    """ForgetfulStorage that refuses big or non-string values; keeps at most ``max_values``."""

    def __init__(self, *, ttl_s: float, max_values: int, max_value_bytes: int) -> None:
        super().__init__(ttl=ttl_s)
        self.max_values = max_values
        self.max_value_bytes = max_value_bytes

    def accepts(self, value: object) -> bool:
        return isinstance(value, bytes | str) and len(value) <= self.max_value_bytes

    def __setitem__(self, key: bytes, value: object) -> None:
        if not self.accepts(value):
            raise ValueError("value is not bytes/str within the size cap")
        super().__setitem__(key, value)
        while len(self.data) > self.max_values:
            self.data.popitem(last=False)
