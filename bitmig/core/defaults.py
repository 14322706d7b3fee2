"""Operational defaults of the daemons and tools, in one place.

Protocol facts (frame kinds, limits, error codes) live in bitmig.protocol.spec.
"""

from bitmig.protocol.spec import MAX_FRAME_BYTES, KiB, MiB

PORT = 7800  # destination's TCP port
LISTEN_HOST = "127.0.0.1"  # loopback unless told otherwise
GRANULARITY = 64 * KiB  # bytes of disk per bitmap bit (QEMU's default)
CHUNK_SIZE = 1 * KiB  # serialized bytes per meta bit (the seed's agreed default)
FRAME_PAYLOAD = 1 * MiB  # serialized bytes the source packs into one bits frame at most
SMALL_THRESHOLD = 1 * MiB  # bitmaps this small skip the live phase and are sent whole
# Bytes per second zlib (Huffman only) deflates a dense payload at, measured on the
# reference machine (2-core Xeon VM: 100-110 MB/s). A RAW payload is deflated only on
# links slower than an eighth of that (12.5 MB/s, 100 Mbit/s): the measured rate (one
# bulk window at first) includes the destination's apply time, which on loopback at load
# 7-9 made it as low as 25 MB/s, and a loaded machine compresses slower.
DEFLATE_RATE = 100e6
DEFLATE_BELOW = DEFLATE_RATE / 8
DOWNTIME_MS = 50.0  # target for each frozen window (one per group of bitmaps)
MAX_PASSES = 30  # dirty passes before completion is forced
# Sizing the frozen windows (groups of bitmaps completed together): the first group of
# small bitmaps is one bitmap, whose window measures the rate that sizes the next one.
GROUP_GROWTH = 4  # a group carries at most this many times the bytes of the one before
GROUP_HISTORY = 4  # groups are sized at the slowest rate of the last this many
GROUP_AIM = 0.5  # ...to fill this fraction of the downtime target (the rest: noise)
MIN_RATE_BYTES = 64 * KiB  # a pass carrying less measures the round trip, not a rate
LIMIT_REFUSALS = 8  # `limit` refusals of one bitmap's start before it fails
CONNECT_TIMEOUT = 10.0  # seconds to establish a connection and exchange hello
IO_TIMEOUT = 30.0  # seconds any single wait for the peer may take
ACK_TIMEOUT = 120.0  # seconds the source waits for the acks after complete
RETRIES = 3  # migration attempts by the source CLI before it gives up
RETRY_DELAY = 1.0  # seconds before the first retry; doubles each time
RESUME_TIMEOUT = 300.0  # seconds a destination keeps a dropped bitmap's chunks for a retry
MEMORY_BUDGET = 8 * (1 << 30)  # bytes of bitmaps a destination rebuilds at once
MAX_CONNECTIONS = 32  # connections a destination serves at once; more are closed at accept
MAX_CONNECTIONS_PER_PEER = 4  # of those, from one peer address (a source uses one at a time)
READ_BUFFER = 1 * MiB  # a connection's read buffer limit (asyncio pauses reading at twice it)
# What one connection's partly received input can hold at most: the paused read buffer
# (2 x READ_BUFFER, plus one socket read of 256 KiB) and one partial frame.
CONNECTION_MEMORY = 2 * READ_BUFFER + 256 * KiB + MAX_FRAME_BYTES
# Every bitmap a destination holds costs at least this much of the budget (a descriptor
# while it streams, a temp file, bookkeeping), however few bytes it serializes to.
MIN_BITMAP_COST = 64 * KiB
MAX_HELD_BITMAPS = 512  # bitmaps a destination holds at once (arriving + parked), all peers
MAX_BITMAPS_PER_CONNECTION = 256  # of those, arriving on one connection
DEMO_DISK_SIZE = 16 * (1 << 40)  # 16 TiB -> 32 MiB bitmap
DEMO_DIRTY = 0.10  # fraction of clusters set before the migration
DEMO_WRITE_RATE = 10_000  # random cluster writes per second during the migration
