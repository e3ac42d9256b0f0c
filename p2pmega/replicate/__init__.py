"""The replication layer: where chunks live and keeping them there.

Between ``api`` (the use cases a user runs) and ``node`` (a running peer): finding a chunk's holders
(``locator``), the pool of peers a chunk may go to (``peers``), placing copies by the rule (``placer``),
walking a file's manifest (``manifest``), and a holder's long-running duties, each an object of its own
(``duties``: announcer, garbage collector, re-announcer, summary; ``repair``: the repairer; ``keeper``: lease
renewal for kept files). ``holder`` assembles the duties a seed runs.
"""
