"""Networking: the hardened DHT, LAN discovery and the chunk transfer protocol (asyncio only)."""
