#!/usr/bin/env python3
"""CPU and memory of three server-side WebSocket decoders fed the same client frames.

Decoders: ours (`incoming.rfc6455`), bare wsproto (what
`twisted.web.websocket` runs, with its reassembly of messages), and autobahn's Twisted
server protocol. Each is handshaken in-process, then fed a stream of masked binary
frames (random payload and mask per frame; 512 KiB frames, the upload chunk size, and
64 KiB frames; 1 GiB of payload each) in reads of 256 KiB, what the server reads per
`dataReceived`. The stream is built once per scenario; only the feeding loop is timed.

Figures: CPU-seconds (user + system, `time.process_time`) per GiB of payload, MB/s
(payload over wall-clock time), minor page faults per GiB, and peak extra memory while
decoding (tracemalloc's peak over the loop, including the reads in flight or held, in a
separate untimed pass that also checks the sha256, size and count of the messages delivered).

glibc returns a freed top of the heap to the kernel, so a decoder's large buffers may be
page-faulted afresh for every frame (about 0.8 CPU-s/GiB more), or not, depending on what
else the process allocated before. For figures that do not depend on that, the script keeps
freed memory in the process (mallopt: no trimming, no mmap below 32 MiB) unless given
`--glibc-trim`, which leaves glibc's defaults: run both to see the range.

A decoder whose package is missing is skipped with a note, so run it once in the project's
venv and once in a venv with autobahn:

    .venv/bin/python bench/ws_framing_bench.py --decoders ours,wsproto
    /tmp/benchenv/bin/python bench/ws_framing_bench.py --decoders autobahn
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import importlib
import importlib.metadata
import random
import resource
import statistics
import struct
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024
READ = 256 * KiB
HANDSHAKE = (
    b"GET /upload HTTP/1.1\r\nHost: localhost:8080\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's `incoming`

Feed = Callable[[bytes], None]


class Sink:
    """Where a decoder hands whole messages; hashes them only in the checking pass."""

    def __init__(self, check: bool) -> None:
        self.size = self.count = 0
        self.sha = hashlib.sha256() if check else None

    def __call__(self, data: bytes) -> None:
        self.size += len(data)
        self.count += 1
        if self.sha is not None:
            self.sha.update(data)


def build(frame_size: int, total: int) -> tuple[list[bytes], str]:
    """Masked binary frames cut into reads; and the sha256 of their payloads."""
    rng, sha, buf, reads = random.Random(frame_size), hashlib.sha256(), bytearray(), []
    if frame_size < 1 << 16:
        header = struct.pack("!BBH", 0x82, 0x80 | 126, frame_size)
    else:
        header = struct.pack("!BBQ", 0x82, 0x80 | 127, frame_size)
    for _ in range(total // frame_size):
        payload, mask = rng.randbytes(frame_size), rng.randbytes(4)
        sha.update(payload)
        key = int.from_bytes(mask * (frame_size // 4))
        buf += header + mask + (int.from_bytes(payload) ^ key).to_bytes(frame_size)
        while len(buf) >= READ:
            reads.append(bytes(buf[:READ]))
            del buf[:READ]
    return reads + [bytes(buf)] if buf else reads, sha.hexdigest()


def ours(sink: Sink, max_size: int) -> Feed:
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    ws = importlib.import_module("incoming.rfc6455")

    class Handler:
        def connected(self, connection: object) -> None: ...

        def text_received(self, text: str) -> None:
            raise AssertionError("text message")

        def binary_received(self, data: bytes) -> None:
            sink(data)

        def message_refused(self, why: str, close_code: int) -> None:
            raise AssertionError(why)

        def connection_lost(self) -> None: ...

    connection = ws.WebSocketConnection(Handler(), Clock(), 60.0, max_binary=max_size)
    connection.makeConnection(StringTransport())
    feed: Feed = connection.dataReceived
    return feed


def wsproto(sink: Sink, max_size: int) -> Feed:
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, BytesMessage, Request

    connection = WSConnection(ConnectionType.SERVER)
    connection.receive_data(HANDSHAKE)
    assert isinstance(next(connection.events()), Request)
    connection.send(AcceptConnection())
    message = b""

    def feed(data: bytes) -> None:
        nonlocal message
        connection.receive_data(data)
        for event in connection.events():
            assert isinstance(event, BytesMessage), event
            message += event.data  # as twisted.web.websocket's Buffer does
            if event.message_finished:
                sink(message)
                message = b""

    return feed


def autobahn(sink: Sink, max_size: int) -> Feed:
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    class Server(WebSocketServerProtocol):  # type: ignore[misc]
        def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
            assert isBinary
            sink(payload)

    factory = WebSocketServerFactory("ws://localhost:8080")
    factory.protocol = Server
    factory.setProtocolOptions(
        maxFramePayloadSize=max_size, maxMessagePayloadSize=max_size, openHandshakeTimeout=0
    )
    server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    server.makeConnection(transport)
    server.dataReceived(HANDSHAKE)
    assert transport.value().startswith(b"HTTP/1.1 101"), transport.value()[:200]
    transport.clear()
    return server.dataReceived  # type: ignore[no-any-return]


DECODERS: dict[str, Callable[[Sink, int], Feed]] = {
    "ours": ours,
    "wsproto": wsproto,
    "autobahn": autobahn,
}


def run(
    decoder: Callable[[Sink, int], Feed], reads: list[bytes], frame_size: int, check: bool
) -> tuple[float, float, int, int, Sink]:
    """One pass: CPU s, wall s, minor faults, tracemalloc's peak (0 unless checking), sink."""
    sink = Sink(check)
    feed = decoder(sink, frame_size)
    gc.collect()
    if check:
        tracemalloc.start()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu, wall = time.process_time(), time.perf_counter()
    for data in reads:  # when checking, each read is a new object, as from recv()
        feed(bytes(memoryview(data)) if check else data)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    peak = tracemalloc.get_traced_memory()[1] if check else 0
    tracemalloc.stop()
    return cpu, wall, faults, peak, sink


def keep_freed_memory() -> bool:
    """glibc: never trim the heap, never mmap below 32 MiB; False if not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-1, 1 << 30) and mallopt(-3, 32 * MiB))  # M_TRIM_, M_MMAP_THRESHOLD


def versions() -> str:
    found = []
    for name in ("twisted", "wsproto", "websockets", "autobahn", "wsaccel"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} absent")
    return f"Python {sys.version.split()[0]}; " + ", ".join(found)


def spread(values: list[float], digits: int) -> str:
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoders", default="ours,wsproto,autobahn")
    parser.add_argument("--frames-kib", default="512,64", help="frame sizes, one scenario each")
    parser.add_argument("--total-mib", type=int, default=1024, help="payload per scenario")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--glibc-trim", action="store_true", help="leave malloc's defaults")
    args = parser.parse_args()
    print(versions())
    kept = not args.glibc_trim and keep_freed_memory()
    print(f"malloc: {'freed memory kept (no trim)' if kept else 'glibc defaults (trim)'}")
    chosen = {}
    for name in args.decoders.split(","):
        try:
            DECODERS[name](Sink(False), 1024)
            chosen[name] = DECODERS[name]
        except ImportError as e:
            print(f"note: {name} skipped ({e})")
    if "autobahn" in chosen:
        from autobahn.websocket import USES_NVX

        print(f"autobahn unmasks with NVX (CFFI, SIMD): {USES_NVX}")
    print(
        f"{'decoder':9} {'frame':>7} {'CPU-s/GiB median (min-max)':>28} "
        f"{'MB/s median (min-max)':>26} {'faults/GiB':>10} {'peak MiB':>9}  check"
    )
    for frame_kib in map(int, args.frames_kib.split(",")):
        reads, digest = build(frame_kib * KiB, args.total_mib * MiB)
        frames = args.total_mib * MiB // (frame_kib * KiB)
        for name, decoder in chosen.items():
            *_, peak, sink = run(decoder, reads, frame_kib * KiB, check=True)
            ok = sink.count == frames and sink.size == frames * frame_kib * KiB
            verdict = "sha256 ok" if ok and sink.sha and sink.sha.hexdigest() == digest else "FAIL"
            cpus, rates, faults = [], [], []
            for _ in range(args.runs):
                cpu, wall, fault, _, sink = run(decoder, reads, frame_kib * KiB, check=False)
                cpus.append(cpu * GiB / sink.size)
                rates.append(sink.size / wall / 1e6)
                faults.append(fault * GiB / sink.size)
            print(
                f"{name:9} {frame_kib:4} KiB {spread(cpus, 3):>28} {spread(rates, 0):>26} "
                f"{statistics.median(faults):10.0f} {peak / MiB:9.2f}  {verdict}"
            )
        del reads
    if "autobahn" in chosen:
        print(f"wsaccel imported by autobahn: {'wsaccel' in sys.modules}")


if __name__ == "__main__":
    main()
