"""Node ids bound to a node's key and to its network, in the spirit of BEP 42 (pure, no I/O).

A node id is 20 bytes. Its first 21 bits come from the node's network (its IPv4 /24 or IPv6 /48)
and a 3-bit ``r``; every other bit, ``r`` included, comes from a hash of its Ed25519 public key:

    k      = BLAKE2b-160(public_key, person="p2pmega-nodeid")
    r      = k[19] & 7
    p      = BLAKE2b-24(network_bytes || r, person="p2pmega-net")
    id     = p[0] || p[1] || (p[2] & 0xF8 | k[2] & 0x07) || k[3:20]

So one key has one id per network, one network has at most 8 prefixes, and whoever wants an id
next to a given key must hold an address in one of the few networks whose prefixes are near it:
grinding keys moves only the low bits. A peer proves its id by proving its key (a signature or
the transfer handshake) from an address in that network. The format is documented in
docs/IDENTITY.md ("Node ids") and pinned by tests/unit/test_node_id.py.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

NODE_ID_BYTES = 20
PREFIX_BITS = 21
IPV4_NETWORK_BITS = 24
IPV6_NETWORK_BITS = 48
_KEY_PERSON = b"p2pmega-nodeid"
_NET_PERSON = b"p2pmega-net"
_PUBLIC_KEY_BYTES = 32


def network_of(ip: str) -> bytes:
    """The network an address counts in: its IPv4 /24 or IPv6 /48 (IPv4-mapped IPv6 is IPv4).

    Args:
        ip: an IPv4 or IPv6 address in text form.

    Returns:
        4 bytes (IPv4, low byte zeroed) or 16 bytes (IPv6, low 80 bits zeroed).

    Raises:
        ValueError: ``ip`` is not an IP address.
    """
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    bits = IPV4_NETWORK_BITS if address.version == 4 else IPV6_NETWORK_BITS
    network = ipaddress.ip_network(f"{address}/{bits}", strict=False)
    return network.network_address.packed


def _key_hash(public_key: bytes) -> bytes:
    if not isinstance(public_key, bytes) or len(public_key) != _PUBLIC_KEY_BYTES:
        raise ValueError(f"a public key is {_PUBLIC_KEY_BYTES} bytes")
    return hashlib.blake2b(public_key, digest_size=NODE_ID_BYTES, person=_KEY_PERSON).digest()


def _prefix(network: bytes, r: int) -> bytes:
    return hashlib.blake2b(network + bytes([r]), digest_size=3, person=_NET_PERSON).digest()


def node_id_for(public_key: bytes, ip: str) -> bytes:
    """The node id of the key ``public_key`` at address ``ip``.

    Args:
        public_key: the node's 32-byte Ed25519 public key.
        ip: the address the node is reached at (the one others connect to).

    Returns:
        ``NODE_ID_BYTES`` bytes.

    Raises:
        ValueError: ``public_key`` is not 32 bytes or ``ip`` is not an IP address.
    """
    k = _key_hash(public_key)
    p = _prefix(network_of(ip), k[-1] & 7)
    return p[:2] + bytes([(p[2] & 0xF8) | (k[2] & 0x07)]) + k[3:]


def prefix_matches(node_id: bytes, ip: str) -> bool:
    """Whether ``node_id`` may belong to a node at ``ip`` (checks the 21 network bits only).

    Cheap and needs no key: a first filter for contacts, before the key is proven.

    Args:
        node_id: a claimed node id.
        ip: the address the claim came from.

    Returns:
        True if the id's first 21 bits are those of ``ip``'s network for the id's ``r``.
    """
    if not isinstance(node_id, bytes) or len(node_id) != NODE_ID_BYTES:
        return False
    try:
        p = _prefix(network_of(ip), node_id[-1] & 7)
    except ValueError:
        return False
    return node_id[:2] == p[:2] and (node_id[2] & 0xF8) == (p[2] & 0xF8)


def matches(node_id: bytes, public_key: bytes, ip: str) -> bool:
    """Whether ``node_id`` is the id of ``public_key`` at ``ip`` (constant time in the id).

    Args:
        node_id: a claimed node id.
        public_key: the Ed25519 public key the peer proved it holds.
        ip: the address we reached the peer at.

    Returns:
        True only if ``node_id == node_id_for(public_key, ip)``; False for malformed input.
    """
    if not isinstance(node_id, bytes) or len(node_id) != NODE_ID_BYTES:
        return False
    try:
        expected = node_id_for(public_key, ip)
    except ValueError:
        return False
    return hmac.compare_digest(expected, node_id)
