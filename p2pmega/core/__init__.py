"""Pure core: formats, crypto, placement. No sockets, no clock, no files."""
