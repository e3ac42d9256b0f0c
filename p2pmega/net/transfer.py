"""Asyncio pump around core.wire: TransferServer serves a ChunkStore; TransferClient pools links.

The two sides live in p2pmega.net.transfer_server and p2pmega.net.transfer_client, on one
connection pump (p2pmega.net.pump); import them from here. This layer only moves bytes and maps
errors; the protocol rules and timeouts live in p2pmega.core.wire.
"""

from p2pmega.core.ids import Address
from p2pmega.net.transfer_client import TransferClient
from p2pmega.net.transfer_server import ServerLimits, TransferServer

__all__ = ["Address", "ServerLimits", "TransferClient", "TransferServer"]
