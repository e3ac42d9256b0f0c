"""Use cases: share, fetch, check, the long-running peers, the test network and the demo.

Async functions that return values and never print; the CLI shows what they return.
"""
