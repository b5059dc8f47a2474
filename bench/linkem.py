#!/usr/bin/env python3
"""A long fat link on loopback: a user-space TCP proxy that puts the delay, rate, router
buffer and slow start of a wide-area path between clients and servers, for benchmarks
(this machine's kernel has no netem).

    python bench/linkem.py --rtt-ms 150 --rate-mbit 400 --forward 127.0.0.1:8080 [...]

Prints `forward PORT HOST:PORT` for each --forward (connect to PORT instead of HOST:PORT),
then `ready`; on SIGTERM or SIGINT it prints `stats {...}` (JSON) and exits.
`LinkProcess` runs it so from Python.

The model: each direction of the path (client to server, server to client) is one
line shared by every connection through the proxy.

- Propagation: bytes reach the far end rtt/2 after they left the line.
- Rate: the line carries `rate` bytes of TCP payload a second, in the order they were
  queued: a virtual transmitter, `free_at` (when it has sent all it holds) moving on by
  size/rate for every piece, so the bytes queued are (free_at - now) x rate. The proxy's
  own scheduling delays none of it: it only decides when bytes join the queue.
- Router buffer (1.25 x the bandwidth-delay product by default, 1 MiB at least),
  drop-tail: what finds it full is held back (not read again from the sender's socket
  until there is room), so the sender's TCP waits; the proxy's own socket buffers are
  small (SO_RCVBUF, SO_SNDBUF: 64 KiB) so that its kernel hides little of the bound. The
  connection that met the full buffer takes it as a loss: its window is cut.
- Congestion window: the proxy counts each connection's bytes in flight (put on the
  line and not yet acknowledged; an acknowledgement leaves the far end when the bytes
  are delivered and takes rtt/2, plus the reverse queue's delay, to come back) against
  a window: 10 segments of 1448 bytes on a new connection, growing by the bytes
  acknowledged (slow start: doubling every round trip) until the first loss, as CUBIC's
  after it (RFC 9438: x 0.7 at a loss, once per round trip, then the cubic curve back,
  never slower than Reno), and only while the window is used (RFC 7661, as Linux). After
  an idle spell (nothing in flight) longer than the retransmission timeout it starts
  again from 10 segments (RFC 5681 4.1). The RTO is Linux's: the smoothed RTT (RFC 6298,
  from the times acknowledgements take, the queue's delay in them) + at least 200 ms.
- Set-up and close: the server is connected rtt/2 after the client connected, and the
  client's bytes go on the line a round trip after it connected (SYN, SYN-ACK); the
  server's may go from rtt/2. A close (FIN) follows the bytes sent before it; a reset
  reaches the other end rtt/2 later.
- Loss stalls (`--loss-per-mb P`, none by default): each megabyte put on the line is
  lost with probability P; the connection's bytes then reach the far end RTT + RTO late
  (a retransmission after a timeout, the bytes behind it waiting, in order) and its
  window is cut.
- The receiver: a destination that does not read (its socket and 256 KiB of the
  proxy's full) stops its sender as a closed receive window would.

Limits, what it leaves out:
- The endpoints' own TCP runs over loopback (about 0 RTT) and sees nothing of the
  emulated path: a server's TCP_INFO (tcpi_rtt, cwnd) describes the loopback hop. What
  sizes anything from the kernel's RTT estimate cannot be measured through a user-space
  proxy (nor works behind a load balancer that ends TCP, for that matter).
- The endpoints' kernel windows: a real receiver keeps the bytes in flight within its
  receive window (Linux: up to tcp_rmem's maximum, 6 MiB by default, a window of about
  3 to 5 MiB), a real sender within its send buffer (tcp_wmem's maximum, 4 MiB by
  default), both below the 7.5 MB that 150 ms at 400 Mbit/s hold. By default there is
  no such cap (hosts tuned for long fat links); `--window-limit-mib W` caps each
  connection's bytes in flight.
- No HyStart (slow start ends at the first loss: with a buffer over a BDP, after the line
  is full), no pacing, no BBR. Once slow start has filled the line none of them leaves it
  idle with such a buffer; how soon slow start fills it, which this models, is the same.
- Bytes move in reads of at most 64 KiB, not 1448-byte segments: a read goes on the line
  whole (1.3 ms at 50 MB/s). No header overhead (a 400 Mbit/s Ethernet carries about
  94 % of that as TCP payload); acknowledgements take no bandwidth.
- No reordering, duplication, jitter or corruption; a loss costs its delay only (the
  retransmitted bytes do not take the line twice).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MSS = 1448  # bytes of payload per segment (Ethernet MTU 1500, TCP timestamps)
INITIAL_WINDOW = 10 * MSS  # RFC 6928, Linux's default
MIN_RTO = 0.2  # seconds, Linux's TCP_RTO_MIN
READ_SIZE = 64 * 1024  # the most the proxy reads from a socket at once
SOCKET_BUFFER = 64 * 1024  # SO_RCVBUF and SO_SNDBUF of the proxy's sockets
WRITE_HIGH = 256 * 1024  # bytes a receiver has not taken before its sender must wait
MIN_BUFFER = 1024 * 1024  # the router buffer at least: 20 ms at 50 MB/s (a BDP of 0 has none)
CUBIC_BETA = 0.7  # RFC 9438's multiplicative decrease
CUBIC_C = 0.4  # segments / s^3
RENO_ALPHA = 3 * (1 - CUBIC_BETA) / (1 + CUBIC_BETA)  # its Reno-friendly growth
PRIORITY = -10  # its nice value, where it may


@dataclass
class Settings:
    """The emulated path."""

    rtt: float  # seconds
    rate: float  # bytes of payload a second; 0: unlimited
    buffer: float  # bytes the router holds per direction
    loss_per_mb: float = 0.0
    window_limit: float = math.inf  # bytes in flight per connection at most
    seed: int = 1

    @property
    def max_window(self) -> float:
        """More than the path can hold: a window never needs to grow beyond."""
        if not self.rate:
            return math.inf
        return 2 * (self.rate * self.rtt + self.buffer) + 4 * READ_SIZE


@dataclass
class LineStats:
    bytes: int = 0
    peak_queue: float = 0.0  # bytes
    full: int = 0  # times a sender met a full buffer (a drop, for it)
    loss_stalls: int = 0
    max_cwnd: float = 0.0


class Line:
    """One direction of the path: a transmitter at the path's rate behind a drop-tail
    buffer, then the propagation delay. Shared by all connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: Settings) -> None:
        self.loop = loop
        self.path = path
        self.delay = path.rtt / 2
        self.free_at = 0.0  # when the transmitter will have sent all it holds
        self.waiting: list[Flow] = []  # flows that met a full buffer
        self.wakeup: asyncio.TimerHandle | None = None
        self.stats = LineStats()

    def queue_delay(self, now: float) -> float:
        return max(0.0, self.free_at - now)

    def room(self, now: float) -> float:
        if not self.path.rate:
            return math.inf
        return self.path.buffer - self.queue_delay(now) * self.path.rate

    def transmit(self, now: float, size: int) -> float:
        """Queues `size` bytes; returns when they reach the far end."""
        if self.path.rate:
            self.free_at = max(now, self.free_at) + size / self.path.rate
            queued = (self.free_at - now) * self.path.rate
            self.stats.peak_queue = max(self.stats.peak_queue, queued)
        else:
            self.free_at = now
        self.stats.bytes += size
        return self.free_at + self.delay

    def wait_for_room(self, flow: Flow) -> None:
        """`flow.pump()` once a read's worth of the buffer is free again."""
        if flow not in self.waiting:
            self.waiting.append(flow)
        if self.wakeup is None:
            want = min(READ_SIZE, self.path.buffer / 2)
            at = self.free_at - (self.path.buffer - want) / self.path.rate
            self.wakeup = self.loop.call_at(at, self._wake)

    def _wake(self) -> None:
        self.wakeup = None
        flows, self.waiting = self.waiting, []
        for flow in flows:
            flow.pump()


class Flow:
    """One direction of one connection: its sender's congestion window and its bytes on
    their way (pending: read, not yet on the line; arrivals: on the line; acks: delivered,
    their acknowledgement on its way back)."""

    def __init__(
        self, connection: Connection, line: Line, reverse: Line, source: Side, sink: Side,
        opens_at: float,
    ) -> None:  # fmt: skip
        self.connection, self.line, self.reverse = connection, line, reverse
        self.link = connection.link
        self.path, self.loop = self.link.path, self.link.loop
        self.source, self.sink = source, sink
        self.opens_at = opens_at
        self.cwnd: float = INITIAL_WINDOW
        self.ssthresh = math.inf
        self.in_flight = 0
        self.last_sent = self.loop.time()
        self.round_end = 0.0  # the round trip `round_peak` is of ends then
        self.round_peak = 0  # the most bytes in flight in this round trip
        self.recovery_until = 0.0  # no second window cut before then
        self.w_max = 0.0  # CUBIC: the window at the last loss
        self.epoch: float | None = None  # CUBIC: when congestion avoidance (re)started
        self.origin = self.k = self.w_reno = 0.0
        self.pending: deque[bytes] = deque()  # b"": the sender's FIN
        self.pending_size = 0
        self.fin_read = False
        self.arrivals: deque[tuple[float, bytes, float]] = deque()  # due, bytes, sent
        self.last_arrival = 0.0
        self.acks: deque[tuple[float, int, float]] = deque()  # due, size, sent
        # RFC 6298's estimate (the queue's delay in it), as after the handshake's sample
        self.srtt, self.rttvar = self.path.rtt, self.path.rtt / 2
        self.last_ack = 0.0
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.receiver_ready = True
        self.finished = False  # the FIN delivered

    def allowed(self) -> int:
        """Bytes the window lets the sender put on the line now."""
        return int(min(self.cwnd, self.path.window_limit)) - self.in_flight

    def read_size(self) -> int:
        """How much to read from the sender now: what the window allows (at least a
        segment: the socket is readable). What then finds the buffer full waits in
        `pending`, the sender having lost it (a read a time, not a segment a time: cheap)."""
        return max(MSS, min(self.allowed(), READ_SIZE))

    def offer(self, data: bytes) -> None:
        """Bytes (or b"": the FIN) read from the sender."""
        if self.fin_read:
            return
        self.fin_read = not data
        self.pending.append(data)
        self.pending_size += len(data)
        self.pump()

    def pump(self) -> None:
        """Puts what the window and the buffer allow on the line; reads more when it can."""
        now = self.loop.time()
        if now < self.opens_at:
            self._timer("open", self.opens_at, self._open)
            self.source.reading(False)
            return
        while self.pending and self.receiver_ready:
            head = self.pending[0]
            if not head:  # the FIN: after the last bytes, taking no time on the line
                self.pending.popleft()
                self._arrive(now + self.line.delay, b"", now)
                continue
            if self.in_flight == 0 and now - self.last_sent > self.rto:
                self._restart()
            allowed = self.allowed()
            if allowed <= 0:
                break
            room = self.line.room(now)
            if room < min(len(head), MSS):  # drop-tail: the sender loses and waits
                self._cut_window(now)
                self.line.stats.full += 1
                self.line.wait_for_room(self)
                break
            size = int(min(len(head), allowed, room))  # at least 1: both checked above
            if size < len(head):
                self.pending[0] = head[size:]
                head = head[:size]
            else:
                self.pending.popleft()
            self.pending_size -= size
            self._send(now, head)
        self.source.reading(
            not self.pending and self.receiver_ready and self.allowed() > 0 and not self.fin_read
        )

    def _open(self) -> None:
        self.timers.pop("open")
        self.pump()

    def _send(self, now: float, data: bytes) -> None:
        self.in_flight += len(data)
        self.last_sent = now
        self.round_peak = max(self.round_peak, self.in_flight)
        arrival = self.line.transmit(now, len(data))
        if self.path.loss_per_mb and self.link.random.random() < (
            self.path.loss_per_mb * len(data) / 1e6
        ):
            arrival += self.srtt + self.rto
            self.line.stats.loss_stalls += 1
            self._cut_window(now, force=True)
        self._arrive(arrival, data, now)

    def _arrive(self, at: float, data: bytes, sent: float) -> None:
        at = max(at, self.last_arrival)  # in order, behind a stalled piece
        self.last_arrival = at
        self.arrivals.append((at, data, sent))
        self._timer("arrival", self.arrivals[0][0], self._deliver)

    def _deliver(self) -> None:
        self.timers.pop("arrival")
        now = self.loop.time()
        back = self.reverse.delay + self.reverse.queue_delay(now)
        while self.arrivals and self.arrivals[0][0] <= now:
            at, data, sent = self.arrivals.popleft()
            if not data:
                self.finished = True
                self.sink.write_eof()
                self.connection.flow_finished()
                continue
            self.sink.write(data)
            # from when it was due: the loop's lateness does not add up round after round
            self.last_ack = max(self.last_ack, at + back)
            self.acks.append((self.last_ack, len(data), sent))
        if self.arrivals:
            self._timer("arrival", self.arrivals[0][0], self._deliver)
        if self.acks:
            self._timer("ack", self.acks[0][0], self._acknowledged)

    def _acknowledged(self) -> None:
        self.timers.pop("ack")
        now = self.loop.time()
        acked, rtt = 0, 0.0
        while self.acks and self.acks[0][0] <= now:
            due, size, sent = self.acks.popleft()
            acked, rtt = acked + size, due - sent
        if self.acks:
            self._timer("ack", self.acks[0][0], self._acknowledged)
        if not acked:
            return
        self._measured(rtt)
        self.in_flight -= acked
        if now >= self.round_end:
            self.round_end = now + self.path.rtt
            self.round_peak = self.in_flight + acked
        if self.cwnd < self.ssthresh:
            if self.cwnd < 2 * self.round_peak:  # Linux's tcp_is_cwnd_limited in slow start
                self.cwnd = min(self.cwnd + acked, self.ssthresh)
        elif self.round_peak >= self.cwnd - 2 * MSS:
            self._cubic(now, acked)
        self.cwnd = min(self.cwnd, self.path.max_window)
        self.line.stats.max_cwnd = max(self.line.stats.max_cwnd, self.cwnd)
        self.pump()

    @property
    def rto(self) -> float:
        """The retransmission timeout, as Linux's: at least 200 ms over the smoothed RTT."""
        return self.srtt + max(MIN_RTO, 4 * self.rttvar)

    def _measured(self, rtt: float) -> None:
        """An RTT sample (RFC 6298)."""
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
        self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def _cubic(self, now: float, acked: int) -> None:
        """Congestion avoidance as CUBIC's (RFC 9438): towards W_cubic(t + RTT), never
        slower than Reno would grow."""
        if self.epoch is None:
            self.epoch = now
            self.origin = max(self.w_max, self.cwnd)
            self.k = ((self.origin - self.cwnd) / MSS / CUBIC_C) ** (1 / 3)
            self.w_reno = self.cwnd
        t = now - self.epoch + self.path.rtt
        target = min(self.origin + MSS * CUBIC_C * (t - self.k) ** 3, 1.5 * self.cwnd)
        if target > self.cwnd:
            self.cwnd += (target - self.cwnd) * acked / self.cwnd
        self.w_reno += MSS * RENO_ALPHA * acked / self.cwnd
        self.cwnd = max(self.cwnd, self.w_reno)

    def _cut_window(self, now: float, force: bool = False) -> None:
        """A loss: CUBIC's multiplicative decrease, once per round trip."""
        if now < self.recovery_until and not force:
            return
        self.w_max = self.cwnd
        self.ssthresh = self.cwnd = max(self.cwnd * CUBIC_BETA, 2 * MSS)
        self.epoch = None
        # once per window: until what is on the line now has come back
        self.recovery_until = now + self.path.rtt + self.line.queue_delay(now)

    def _restart(self) -> None:
        """After an idle spell, slow start again from the initial window (RFC 5681 4.1;
        Linux halves the window per RTO idle instead, down to the same)."""
        self.cwnd = min(self.cwnd, INITIAL_WINDOW)
        self.epoch = None

    def _timer(self, name: str, at: float, callback: Any) -> None:
        """One timer per purpose, (re)set to fire at `at`; each callback pops its own."""
        timer = self.timers.get(name)
        if timer is not None:
            if timer.when() == at:
                return
            timer.cancel()
        self.timers[name] = self.loop.call_at(at, callback)

    def stop(self) -> None:
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        self.pending.clear()
        self.arrivals.clear()
        self.acks.clear()
        if self in self.line.waiting:
            self.line.waiting.remove(self)


class Side(asyncio.BufferedProtocol):
    """One of a connection's two sockets (the client's or the server's)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.transport: asyncio.Transport | None = None
        self.out_flow: Flow  # the bytes read here go out by it
        self.in_flow: Flow  # and it brings the bytes written here
        self.buffer = memoryview(bytearray(READ_SIZE))
        self.outbox: list[bytes] = []  # written before the socket was connected
        self.is_reading = True
        self.eof_pending = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        for data in self.outbox:
            transport.write(data)
        self.outbox.clear()
        if self.eof_pending:
            self.write_eof()
        self.out_flow.pump()

    def reading(self, on: bool) -> None:
        if self.transport is None or self.closed or on == self.is_reading:
            return
        self.is_reading = on
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer[: self.out_flow.read_size()]

    def buffer_updated(self, nbytes: int) -> None:
        self.out_flow.offer(self.buffer[:nbytes].tobytes())

    def eof_received(self) -> bool:
        self.out_flow.offer(b"")
        return True  # half-closed: keep writing to it

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.connection.lost(self, exc)

    def pause_writing(self) -> None:
        self.in_flow.receiver_ready = False

    def resume_writing(self) -> None:
        self.in_flow.receiver_ready = True
        self.in_flow.pump()

    def write(self, data: bytes) -> None:
        if self.transport is None:
            self.outbox.append(data)
        elif not self.closed and not self.transport.is_closing():
            self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is None:
            self.eof_pending = True
        elif not self.closed and not self.transport.is_closing():
            try:
                self.transport.write_eof()
            except OSError:  # the peer is gone already
                self.transport.abort()


class Connection:
    """A client's connection through the link to its target, and the two flows of it."""

    def __init__(self, link: Link, target: tuple[str, int]) -> None:
        self.link = link
        self.target = target
        now = link.loop.time()
        self.client, self.server = Side(self), Side(self)
        self.up = Flow(self, link.up, link.down, self.client, self.server, now + link.path.rtt)
        self.down = Flow(
            self, link.down, link.up, self.server, self.client, now + link.path.rtt / 2
        )
        self.client.out_flow = self.server.in_flow = self.up
        self.server.out_flow = self.client.in_flow = self.down
        self.ended = False
        link.loop.call_at(now + link.path.rtt / 2, self._connect)

    def _connect(self) -> None:
        self.link.tasks.add(task := self.link.loop.create_task(self._open()))
        task.add_done_callback(self.link.tasks.discard)

    async def _open(self) -> None:
        if self.ended:
            return
        sock = small_socket()
        sock.setblocking(False)
        try:
            await self.link.loop.sock_connect(sock, self.target)
            await self.link.loop.create_connection(lambda: self.server, sock=sock)
        except OSError as e:
            sock.close()
            self.lost(self.server, e)

    def lost(self, side: Side, exc: Exception | None) -> None:
        """A socket closed: after a reset (or a failed connect) the other end is reset
        rtt/2 later; a close without an error is that side's FIN."""
        if self.ended:
            return
        if exc is None:
            side.out_flow.offer(b"")
            return
        other = self.server if side is self.client else self.client
        self.ended = True
        self.up.stop()
        self.down.stop()
        self.link.loop.call_later(self.link.path.rtt / 2, self._abort, other)
        self.link.connections.discard(self)

    def _abort(self, side: Side) -> None:
        if side.transport is not None:
            side.transport.abort()
        else:
            side.closed = True

    def flow_finished(self) -> None:
        if self.up.finished and self.down.finished:
            self._end()

    def _end(self) -> None:
        self.ended = True
        for side in (self.client, self.server):
            if side.transport is not None:
                side.transport.close()
        self.up.stop()
        self.down.stop()
        self.link.connections.discard(self)


@dataclass
class Link:
    """The path (a line each way) and the connections across it."""

    loop: asyncio.AbstractEventLoop
    path: Settings
    up: Line = field(init=False)
    down: Line = field(init=False)
    random: random.Random = field(init=False)
    connections: set[Connection] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    accepted: int = 0

    def __post_init__(self) -> None:
        self.up = Line(self.loop, self.path)
        self.down = Line(self.loop, self.path)
        self.random = random.Random(self.path.seed)

    def accept(self, target: tuple[str, int]) -> Side:
        self.accepted += 1
        connection = Connection(self, target)
        self.connections.add(connection)
        return connection.client

    def stats(self) -> dict[str, Any]:
        def line(stats: LineStats) -> dict[str, Any]:
            return {
                "bytes": stats.bytes,
                "peak_queue_bytes": round(stats.peak_queue),
                "buffer_full": stats.full,
                "loss_stalls": stats.loss_stalls,
                "max_cwnd_bytes": round(stats.max_cwnd),
            }

        return {
            "connections": self.accepted,
            "buffer_bytes": round(self.path.buffer),
            "up": line(self.up.stats),
            "down": line(self.down.stats),
        }


def small_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def make_path(
    rtt_ms: float, rate_mbit: float, buffer_bdp: float = 1.25, loss_per_mb: float = 0.0,
    window_limit_mib: float = 0.0, seed: int = 1,
) -> Settings:  # fmt: skip
    rate = rate_mbit * 1e6 / 8
    rtt = rtt_ms / 1000
    return Settings(
        rtt=rtt,
        rate=rate,
        buffer=max(MIN_BUFFER, buffer_bdp * rate * rtt),
        loss_per_mb=loss_per_mb,
        window_limit=window_limit_mib * 1024 * 1024 if window_limit_mib else math.inf,
        seed=seed,
    )


async def serve(path: Settings, targets: list[tuple[str, int]], host: str) -> None:
    with contextlib.suppress(PermissionError):  # it stands in for the kernel: a busy
        os.setpriority(os.PRIO_PROCESS, 0, PRIORITY)  # machine should not delay its timers
    loop = asyncio.get_running_loop()
    link = Link(loop, path)
    servers = []
    for target in targets:
        listener = small_socket()
        listener.bind((host, 0))
        server = await loop.create_server(functools.partial(link.accept, target), sock=listener)
        servers.append(server)
        print(f"forward {listener.getsockname()[1]} {target[0]}:{target[1]}", flush=True)
    print("ready", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()
    print(f"stats {json.dumps(link.stats())}", flush=True)


class LinkProcess:
    """linkem.py in a process of its own (its CPU time apart from the benchmark's), one
    port of it per target, all across the same emulated path."""

    def __init__(
        self, targets: list[tuple[str, int]], rtt_ms: float, rate_mbit: float,
        buffer_bdp: float = 1.25, loss_per_mb: float = 0.0, window_limit_mib: float = 0.0,
        seed: int = 1,
    ) -> None:  # fmt: skip
        command = [
            sys.executable, str(Path(__file__).resolve()), "--rtt-ms", str(rtt_ms),
            "--rate-mbit", str(rate_mbit), "--buffer-bdp", str(buffer_bdp),
            "--loss-per-mb", str(loss_per_mb), "--window-limit-mib", str(window_limit_mib),
            "--seed", str(seed),
        ]  # fmt: skip
        for host, port in targets:
            command += ["--forward", f"{host}:{port}"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.ports: list[int] = []
        for line in self.process.stdout:
            if line.startswith("forward "):
                self.ports.append(int(line.split()[1]))
            elif line.strip() == "ready":
                break
        else:
            raise RuntimeError("linkem.py did not start")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def stop(self) -> dict[str, Any]:
        """Ends it; returns its figures (`Link.stats`)."""
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=20)
        for line in out.splitlines():
            if line.startswith("stats "):
                stats: dict[str, Any] = json.loads(line[len("stats ") :])
                return stats
        raise RuntimeError("linkem.py gave no stats")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rtt-ms", type=float, required=True)
    parser.add_argument("--rate-mbit", type=float, required=True, help="0: unlimited")
    parser.add_argument("--buffer-bdp", type=float, default=1.25, help="router buffer, x BDP")
    parser.add_argument("--loss-per-mb", type=float, default=0.0, help="stall probability per MB")
    parser.add_argument(
        "--window-limit-mib", type=float, default=0.0, help="bytes in flight per connection"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--forward", action="append", required=True, help="HOST:PORT")
    args = parser.parse_args()
    targets = []
    for forward in args.forward:
        host, _, port = forward.rpartition(":")
        targets.append((host, int(port)))
    path = make_path(
        args.rtt_ms, args.rate_mbit, args.buffer_bdp, args.loss_per_mb,
        args.window_limit_mib, args.seed,
    )  # fmt: skip
    asyncio.run(serve(path, targets, args.listen_host))


if __name__ == "__main__":
    main()
