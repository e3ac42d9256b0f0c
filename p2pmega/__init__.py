"""p2pmega: a peer-to-peer encrypted file store."""

__version__ = "0.1.0"
