#!/usr/bin/env python3
"""Checks bench/linkem.py against its model with raw TCP through it, and measures its
own ceiling: prints each figure beside what the model predicts, `ok` or `MISSED`.

- its ceiling: 1 GiB with no delay and no rate limit (and its CPU), then at 400 Mbit/s
  with no delay: the rate reached, and the CPU it costs at that rate;
- a ping-pong at 150 ms: the round trip (the first one also pays the handshake);
- slow start: the bytes delivered in each round trip of a new connection (doubling from
  10 segments), and the times of short transfers against the model's;
- long transfers up, down, and four at once: the rate once slow start is over, the peak
  of the router's queue against its bound;
- a receiver that stops reading: the sender is held back (bounded bytes accepted);
- idle restart: the same transfer on a warm connection, then after an idle spell
  longer than the RTO;
- loss stalls: a transfer with and without them.

    python bench/linkem_check.py [--rtt-ms 150] [--rate-mbit 400]
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from linkem import INITIAL_WINDOW, MIN_RTO, LinkProcess  # noqa: E402

MiB = 1024 * 1024
BLOCK = bytes(range(256)) * 1024  # 256 KiB


class Peer:
    """A loopback server for the checks. A connection opens with one command byte:
    `E` echoes every byte; `R` reads (8-byte length, then that many bytes) and answers
    one byte, again and again, keeping the time and size of every read; `D` sends
    (8-byte length) that many bytes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.reads: list[list[tuple[float, int]]] = []  # per `R` connection
        self.hold = threading.Event()  # set: `R` connections stop reading while it lasts
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            command = conn.recv(1)
            if command == b"E":
                while data := conn.recv(65536):
                    conn.sendall(data)
            elif command == b"R":
                reads: list[tuple[float, int]] = []
                self.reads.append(reads)
                buffer = bytearray(1 * MiB)
                while header := _recv_exactly(conn, 8):
                    left = struct.unpack("!Q", header)[0]
                    while left:
                        while self.hold.is_set():
                            time.sleep(0.01)
                        n = conn.recv_into(buffer, min(left, len(buffer)))
                        if not n:
                            return
                        reads.append((time.perf_counter(), n))
                        left -= n
                    conn.sendall(b"!")
            elif command == b"D":
                left = struct.unpack("!Q", _recv_exactly(conn, 8))[0]
                while left:
                    n = min(left, len(BLOCK))
                    conn.sendall(BLOCK[:n])
                    left -= n


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = conn.recv(size - len(data))
        if not more:
            return b""
        data += more
    return data


def connect(port: int, command: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(command)
    return sock


def send(sock: socket.socket, size: int) -> None:
    """One `R` transfer of `size` bytes, up to the peer's answer."""
    sock.sendall(struct.pack("!Q", size))
    while size:
        n = min(size, len(BLOCK))
        sock.sendall(BLOCK[:n])
        size -= n
    if sock.recv(1) != b"!":
        raise RuntimeError("no answer")


def steady_rate(reads: list[tuple[float, int]], skip: float) -> float:
    """Bytes a second delivered after `skip` seconds from the first byte."""
    start = reads[0][0] + skip
    later = [(t, n) for t, n in reads if t >= start]
    if len(later) < 2:
        raise RuntimeError("too short to show a steady rate")
    return sum(n for _, n in later[1:]) / (later[-1][0] - later[0][0])


def slow_start_seconds(size: int, rtt: float, rate: float) -> float:
    """The model's time from connect() to the last byte at the receiver, for `size`
    bytes sent at once on a new connection: a round trip of handshake, then windows
    doubling from 10 segments, each round trip, until the line is full."""
    elapsed, sent, window = rtt, 0.0, float(INITIAL_WINDOW)
    while size - sent > window and window < rate * rtt:
        sent += window
        window *= 2
        elapsed += rtt
    return elapsed + (size - sent) / rate + rtt / 2


class Report:
    def __init__(self) -> None:
        self.missed = 0

    def line(self, name: str, figure: str, expected: str, ok: bool) -> None:
        self.missed += not ok
        print(f"  {name:<44}{figure:>24}   {expected:<34}{'ok' if ok else 'MISSED'}")

    def near(self, name: str, value: float, model: float, unit: str, tolerance: float) -> None:
        """`value` within `tolerance` (a fraction) of `model`; ms for seconds."""
        scale, digits = (1000, 0) if unit == "ms" else (1e-6, 1)
        self.line(
            name,
            f"{value * scale:.{digits}f} {unit}",
            f"{model * scale:.{digits}f} {unit}, within {tolerance:.0%}",
            abs(value / model - 1) <= tolerance,
        )


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def through(link: LinkProcess, action: Callable[[], object]) -> tuple[float, float]:
    """Seconds `action` takes, and the proxy's CPU seconds meanwhile."""
    cpu = link.cpu_seconds()
    seconds = timed(action)
    return seconds, link.cpu_seconds() - cpu


def check_ceiling(peer: Peer, report: Report, rate_mbit: float) -> None:
    print("the proxy's own ceiling (no delay)")
    line = rate_mbit * 1e6 / 8
    link = LinkProcess([("127.0.0.1", peer.port)], rtt_ms=0, rate_mbit=0)
    sock = connect(link.ports[0], b"R")
    seconds, cpu = through(link, lambda: send(sock, 1024 * MiB))
    sock.close()
    link.stop()
    rate = 1024 * MiB / seconds
    report.line(
        "no rate limit: 1 GiB",
        f"{rate / 1e6:.0f} MB/s",
        f">= 4 x {line / 1e6:.0f} MB/s",
        rate >= 4 * line,
    )
    report.line("  its CPU", f"{cpu / (1024 * MiB / 1e9):.2f} s per GB", "", True)

    link = LinkProcess([("127.0.0.1", peer.port)], rtt_ms=0, rate_mbit=rate_mbit)
    sock = connect(link.ports[0], b"R")
    seconds, cpu = through(link, lambda: send(sock, 512 * MiB))
    sock.close()
    link.stop()
    report.near(f"{rate_mbit:.0f} Mbit/s: 512 MiB", 512 * MiB / seconds, line, "MB/s", 0.02)
    report.line(
        "  its CPU at that rate", f"{cpu / seconds:.0%} of a core", "< 50 %", cpu / seconds < 0.5
    )


def check_path(peer: Peer, report: Report, rtt_ms: float, rate_mbit: float) -> None:
    rtt, rate = rtt_ms / 1000, rate_mbit * 1e6 / 8
    print(f"\n{rtt_ms:.0f} ms, {rate_mbit:.0f} Mbit/s ({rate / 1e6:.0f} MB/s), buffer 1.25 BDP")
    link = LinkProcess([("127.0.0.1", peer.port)], rtt_ms=rtt_ms, rate_mbit=rate_mbit)
    port = link.ports[0]

    # ping-pong: the first exchange waits for the handshake too
    sock = connect(port, b"E")
    rounds = [timed(lambda: (sock.sendall(b"x"), sock.recv(1))) for _ in range(10)]
    sock.close()
    report.near("ping-pong: first exchange (+ handshake)", rounds[0], 2 * rtt, "ms", 0.05)
    report.near("ping-pong: median of the next 9", sorted(rounds[1:])[4], rtt, "ms", 0.02)

    # slow start: bytes delivered per round trip, and short transfers' times
    sock = connect(port, b"R")
    send(sock, 16 * MiB)
    sock.close()
    reads = peer.reads[-1]
    per_round = [0] * 10
    for t, n in reads:
        index = int((t - reads[0][0]) / rtt + 0.5)  # a window arrives near a multiple of RTT
        if index < len(per_round):
            per_round[index] += n
    doubling = all(1.9 <= per_round[i + 1] / per_round[i] <= 2.1 for i in range(7))
    report.line("slow start: kB per round trip, 16 MiB", "", "14.5, 29, 58, ... (x 2)", doubling)
    print(f"    {', '.join(f'{n / 1000:.0f}' for n in per_round)}")
    for size in (100_000, 1_000_000, 4_000_000):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            seconds = timed(lambda: (sock.sendall(b"R"), send(sock, size)))  # noqa: B023
        model = slow_start_seconds(size + 9, rtt, rate) + rtt / 2  # + the answer's way back
        report.near(f"  {size / 1e6:g} MB on a new connection", seconds, model, "ms", 0.05)

    # long transfers: up, down, four at once
    sock = connect(port, b"R")
    seconds, cpu = through(link, lambda: send(sock, 256 * MiB))
    sock.close()
    model = slow_start_seconds(256 * MiB, rtt, rate) + rtt / 2
    report.near("256 MiB up, overall", 256 * MiB / seconds, 256 * MiB / model, "MB/s", 0.02)
    steady = steady_rate(peer.reads[-1], skip=3 * rtt + 1.5)
    report.near("  once slow start is over", steady, rate, "MB/s", 0.02)
    report.line(
        "  the proxy's CPU", f"{cpu / seconds:.0%} of a core", "< 25 %", cpu / seconds < 0.25
    )

    sock = connect(port, b"D" + struct.pack("!Q", 128 * MiB))
    got, times = 0, []
    buffer = bytearray(1 * MiB)
    while got < 128 * MiB:
        n = sock.recv_into(buffer)
        got += n
        times.append((time.perf_counter(), n))
    sock.close()
    steady = steady_rate(times, skip=3 * rtt + 1.5)
    report.near("128 MiB down, once slow start is over", steady, rate, "MB/s", 0.02)

    before = len(peer.reads)
    socks = [connect(port, b"R") for _ in range(4)]
    threads = [threading.Thread(target=send, args=(s, 64 * MiB)) for s in socks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for s in socks:
        s.close()
    merged = sorted(r for reads in peer.reads[before:] for r in reads)
    steady = steady_rate(merged[: int(len(merged) * 0.9)], skip=3 * rtt + 1)
    report.near("4 x 64 MiB at once, together", steady, rate, "MB/s", 0.02)

    # a receiver that stops reading holds the sender back
    peer.hold.set()
    sock = connect(port, b"R")
    sock.sendall(struct.pack("!Q", 64 * MiB))
    sock.setblocking(False)
    accepted, deadline = 0, time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            accepted += sock.send(BLOCK)
        except BlockingIOError:
            time.sleep(0.01)
    peer.hold.clear()
    sock.setblocking(True)
    rest = 64 * MiB - accepted
    while rest:
        rest -= sock.send(BLOCK[: min(rest, len(BLOCK))])
    sock.recv(1)
    sock.close()
    bounded = accepted < 24 * MiB
    report.line(
        "receiver stops reading for 3 s", f"{accepted / MiB:.1f} MiB sent", "bounded", bounded
    )

    # idle restart: the same 4 MB on a warm connection, then after an idle spell
    sock = connect(port, b"R")
    send(sock, 32 * MiB)
    warm = timed(lambda: send(sock, 4_000_000))
    time.sleep(2 * rtt + 1)  # more than the RTO (the smoothed RTT + 200 ms or more)
    idle = timed(lambda: send(sock, 4_000_000))
    sock.close()
    report.near("4 MB on a warm connection", warm, 4_000_000 / rate + rtt, "ms", 0.05)
    model = slow_start_seconds(4_000_000, rtt, rate) - rtt / 2  # no handshake; the answer
    report.near("  again after an idle second (slow start)", idle, model, "ms", 0.05)

    stats = link.stop()
    queue, bound = stats["up"]["peak_queue_bytes"], stats["buffer_bytes"]
    report.line(
        "router queue at most",
        f"{queue / 1e6:.2f} MB",
        f"<= buffer, {bound / 1e6:.2f} MB",
        queue <= bound + 64 * 1024,
    )

    # loss stalls
    link = LinkProcess([("127.0.0.1", peer.port)], rtt_ms, rate_mbit, loss_per_mb=0.05)
    sock = connect(link.ports[0], b"R")
    seconds = timed(lambda: send(sock, 64 * MiB))
    sock.close()
    stalls = link.stop()["up"]["loss_stalls"]
    clean = slow_start_seconds(64 * MiB, rtt, rate) + rtt / 2
    report.line(
        "64 MiB, 0.05 loss stalls per MB",
        f"{stalls} stalls, {seconds:.2f} s",
        f"{clean:.2f} s without",
        stalls > 0 and seconds > clean + stalls * (2 * rtt + MIN_RTO),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rtt-ms", type=float, default=150)
    parser.add_argument("--rate-mbit", type=float, default=400)
    args = parser.parse_args()
    peer = Peer()
    report = Report()
    check_ceiling(peer, report, args.rate_mbit)
    check_path(peer, report, args.rtt_ms, args.rate_mbit)
    print(f"\n{report.missed} missed" if report.missed else "\nall as modelled")
    sys.exit(1 if report.missed else 0)


if __name__ == "__main__":
    main()
