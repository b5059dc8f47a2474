"""How far a WebSocket client may send ahead (SPEC: Long fat links).

A window of `SendAhead` chunks lets a client have at most that many bytes on their
way before an acknowledgement, so it moves at most a window per round trip: 2 MiB
(the 2014 defaults, 512 KiB x 4) fill 400 Mbit/s only up to a 40 ms round trip. So
the window announced in `MsgUploadConf` covers the connection's bandwidth-delay
product: its round trip times the rate the server is sized for (`--window-rate`),
never below the configured `SendAhead` and, above it, never beyond `--max-window`.

The round trip is measured end to end, from the server's `101 Switching Protocols`
to the client's first bytes after it (`rfc6455.WebSocketConnection.rtt`), not read
from the kernel (TCP_INFO): behind a proxy that ends TCP (nginx, a load balancer)
the kernel sees only the hop to the proxy.

With syncing on (SPEC: Acknowledged means durable), acknowledgements wait for an
fdatasync, which the window must cover too: it is never below `least_bytes` (8 MiB:
what a fast local client sends while a sync of a few milliseconds runs; a window of
the 2014 defaults left it idle then, 0.6-0.75 x the MB/s on loopback), unless
`--max-window 0` pins it to `SendAhead`.

What the window costs the server is not the window: the bytes in flight are in the
network and in the kernel's socket buffers. The session stops reading the socket
while `max_pending` bytes wait for the disk, so memory per connection stays bounded
by the configured window whatever the announced one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SYNC_COVER = 8 * 1024 * 1024  # bytes: the window's least with syncing on


@dataclass(frozen=True)
class Window:
    """The window policy of a server's WebSocket connections."""

    chunk_size: int  # bytes
    send_ahead: int  # chunks: the least announced (UploadSendAhead), and the memory bound
    max_bytes: int  # the most announced (--max-window); 0: always `send_ahead`
    rate: float  # bytes a second the window is sized for (--window-rate)
    least_bytes: int = 0  # the least it covers: what a client sends during a sync

    def for_rtt(self, rtt: float | None) -> int:
        """`SendAhead` for a connection of round trip `rtt` seconds (None: unknown)."""
        in_flight = max((rtt or 0.0) * self.rate, self.least_bytes)
        if in_flight <= 0:
            return self.send_ahead
        wanted = math.ceil(in_flight / self.chunk_size)
        most = max(self.send_ahead, self.max_bytes // self.chunk_size)
        return max(self.send_ahead, min(wanted, most))

    @property
    def max_pending(self) -> int:
        """Bytes that may wait for the disk before the connection stops reading."""
        return self.chunk_size * self.send_ahead
