"""Production defaults shared by more than one layer, in one place (no imports: any module may read it).

Tests and the local test network shorten the intervals through options and settings, never by editing these.
"""

from __future__ import annotations

# One DHT request waits this long for its reply (UDP; a round trip across the world is ~0.3 s).
RPC_TIMEOUT_S = 2.0
# A chunk transfer fails when no data moved on its connection for this long (idle time, not size).
TRANSFER_TIMEOUT_S = 10.0
# A provider record lives this long on the node that keeps it; holders re-announce well inside it.
RECORD_TTL_S = 24 * 3600.0
REANNOUNCE_INTERVAL_S = 12 * 3600.0
# A holder removes expired chunks this often.
GC_INTERVAL_S = 600.0
# A holder checks that the chunks it holds still meet the placement rule this often (jittered), and a keeper
# renews the leases of the files it keeps as often (replicate/repair.py, replicate/keeper.py).
REPAIR_INTERVAL_S = 600.0
# How long holders keep a shared file's chunks, unless someone renews them.
LEASE_DAYS = 30.0
LEASE_S = LEASE_DAYS * 86400
# The longest lease a holder grants, whatever a store or renew asks: a stranger cannot pin data for a century,
# and a file someone cares about is renewed well inside it (seed --keep).
MAX_LEASE_DAYS = 90.0
MAX_LEASE_S = MAX_LEASE_DAYS * 86400
# A holder lets one source network (IPv4 /24, IPv6 /48) hold at most this share of its quota, so one address or
# one operator's subnet cannot fill it: four networks are needed to fill a seed, and an honest sharer whose file
# is larger than a quarter of a seed's quota places the rest on other seeds (docs/STORAGE.md, "Per-source limits").
NETWORK_SHARE = 0.25
# ...and lets it store at most this many bytes a minute (a token bucket that holds one minute's worth). 1 GiB a
# minute is 17 MiB/s, about one honest sharer's upload to one seed; the attack of issue 16 stored 214 MiB/s.
NETWORK_RATE_BYTES_PER_MIN = 1 << 30
