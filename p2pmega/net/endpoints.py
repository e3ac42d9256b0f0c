"""Bind a peer's two endpoints on one port number: the DHT (UDP) and, for a holder, the transfer server (TCP)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from p2pmega.core.ids import ChunkId
from p2pmega.errors import NetworkError
from p2pmega.net.dht import DHTNode

if TYPE_CHECKING:
    from p2pmega.net.transfer_server import Forward, TransferServer
    from p2pmega.storage.store import ChunkStore

# With port 0 the UDP side picks a number that the TCP side may find taken: this many tries.
BIND_ATTEMPTS = 20


async def bind_endpoints(
    *,
    host: str,
    port: int,
    seed: bytes,
    rpc_timeout_s: float,
    record_ttl_s: float,
    contacts_path: Path,
    read_only: bool,
    store: ChunkStore | None,
    on_stored: Callable[[ChunkId], None],
    on_forward: Forward | None = None,
    identity_seed: bytes | None = None,
) -> tuple[DHTNode, TransferServer | None]:
    """Start the DHT node and, when there is a ``store`` to serve, the transfer server on the same port number.

    Raises:
        NetworkError: the address cannot be bound (it names the address and what to pass instead).
    """
    for _attempt in range(BIND_ATTEMPTS):
        dht = DHTNode(
            host=host,
            port=port,
            seed=seed,
            rpc_timeout_s=rpc_timeout_s,
            record_ttl_s=record_ttl_s,
            contacts_path=contacts_path,
            read_only=read_only,
        )
        await dht.start()  # raises NetworkError naming the address when it cannot bind
        if store is None:
            return dht, None
        from p2pmega.net.transfer_server import TransferServer

        server = TransferServer(
            store,
            host=host,
            port=dht.port,
            node_id=dht.node_id,  # the id a signed renewal names: our DHT id, as keepers learn it
            on_stored=on_stored,
            on_forward=on_forward,
            identity_seed=identity_seed,
        )
        try:
            await server.start()
        except OSError as exc:
            await dht.stop()
            if port != 0:
                raise NetworkError(
                    f"cannot bind TCP {host}:{port}: {exc.strerror}; pick another --port"
                ) from exc
            continue
        return dht, server
    raise NetworkError(f"no port on {host} is free for both UDP and TCP; pass --port")
