"""Walking a file's manifest tree from the network: the chunk list of a read or keep-alive link."""

from __future__ import annotations

import asyncio

from p2pmega.core.chunking import short_id
from p2pmega.core.magnet import KeepCap, ReadCap
from p2pmega.core.manifest import Manifest
from p2pmega.core.manifest_walk import ManifestWalker
from p2pmega.errors import ManifestNotFound, NotFoundError
from p2pmega.replicate.locator import HolderLocator


async def walk_manifest(locator: HolderLocator, cap: ReadCap | KeepCap) -> Manifest:
    """Fetch and decode the manifest tree.

    Raises:
        ManifestNotFound: no holder has the root.
        IntegrityError: a manifest chunk is corrupt and no holder has a good copy.
    """
    walker = ManifestWalker(cap)
    while not walker.done:
        wanted = walker.wanted()
        try:
            blobs = await asyncio.gather(*(locator.fetch(c) for c in wanted))
        except NotFoundError as exc:
            raise ManifestNotFound(
                f"no reachable holder has the manifest of {short_id(cap.root)}; "
                "the file may have expired, or check --bootstrap"
            ) from exc
        for chunk_id, data in zip(wanted, blobs, strict=True):
            walker.feed(chunk_id, bytes(data))
    return walker.result()
