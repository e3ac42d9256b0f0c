"""``async with`` for the long-lived parts (DHT node, LAN discovery, peer, test network)."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Service:
    """Base for objects with ``async start()`` and ``async stop()``, used as ``async with Thing(...) as t``.

    ``stop()`` also runs when ``start()`` fails half-way, so whatever was already bound or spawned is released;
    every ``stop()`` must therefore cope with a partial start (and with being called twice).
    """

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
