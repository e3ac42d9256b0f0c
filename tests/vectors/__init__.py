"""Golden and upstream test vectors; see README.md."""
