#!/usr/bin/env python3
"""Upload throughput, CPU and memory of the real server, beside the machine's limits.

Starts `twistd -n incoming` on loopback with a temporary storage directory, and
drives it with a fast protocol client (threads, blocking sockets, frames masked
once in advance) that has its own small backend answering the handover.

    python bench/upload_bench.py [--runs 3] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from websockets.speedups import apply_mask

MiB = 1024 * 1024
TWISTD = str(Path(sys.executable).parent / "twistd")
ROOT = Path(__file__).resolve().parent.parent
MASK = b"\x9a\x3c\x51\xe7"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Handover(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("content-length", 0))
        fields = urllib.parse.parse_qs(self.rfile.read(length).decode())
        self.server.handovers.append(fields)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-length", "4")
        self.end_headers()
        self.wfile.write(b"done")

    def log_message(self, *args: Any) -> None:
        pass


class _Backend(ThreadingHTTPServer):
    # Uploads that finish together hand over together: with http.server's backlog of 5,
    # SYNs dropped (retried after 1 s, 3 s...) measured the backend, not the server.
    request_queue_size = 1024


def start_backend() -> tuple[ThreadingHTTPServer, str]:
    server = _Backend(("127.0.0.1", 0), _Handover)
    server.handovers = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/handover"


class Daemon:
    """One `twistd -n incoming` process with its own storage directory."""

    def __init__(self, extra: list[str] | None = None) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="incoming-bench-")
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logfile=/dev/null", "incoming",
             "--listen", f"tcp:{self.port}:interface=127.0.0.1",
             "--storage-dir", self.dir.name, *(extra or [])],
            env=env, cwd=self.dir.name,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("server did not start") from None
                time.sleep(0.05)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)
        self.dir.cleanup()


def http_post(port: int, path: str, form: dict[str, str]) -> str:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = urllib.parse.urlencode(form)
    conn.request("POST", path, body, {"content-type": "application/x-www-form-urlencoded"})
    response = conn.getresponse()
    text = response.read().decode()
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {text}")
    return text


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (with the bench's fixed mask, so chunks mask once)."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0xFE, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0xFF, size)
    return header + MASK + apply_mask(payload, MASK)


class WsClient:
    """Blocking WebSocket client speaking the upload protocol."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(
            b"GET /incoming/frontend/upload_ws HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(head.decode())

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise RuntimeError("server closed the connection")
        return data

    def send(self, msg_type: str, **data: Any) -> None:
        text = json.dumps({"MsgType": msg_type, "MsgData": data}).encode()
        self.sock.sendall(client_frame(1, text))

    def receive(self) -> dict[str, Any]:
        while True:
            while len(self.buffer) < 2 or len(self.buffer) < self._frame_end():
                self.buffer += self._recv()
            end = self._frame_end()
            opcode, start = self.buffer[0] & 0x0F, end - self._payload_size()
            payload, self.buffer = self.buffer[start:end], self.buffer[end:]
            if opcode == 1:
                message: dict[str, Any] = json.loads(payload)
                if message["MsgType"] == "MsgError":
                    raise RuntimeError(message)
                return message
            if opcode == 8:
                raise RuntimeError("closed")
            if opcode == 9:  # ping: answer so the server keeps us
                self.sock.sendall(client_frame(10, payload))

    def _payload_size(self) -> int:
        size = self.buffer[1] & 0x7F
        if size == 126:
            return int(struct.unpack_from("!H", self.buffer, 2)[0]) if len(self.buffer) >= 4 else 0
        if size == 127:
            return int(struct.unpack_from("!Q", self.buffer, 2)[0]) if len(self.buffer) >= 10 else 0
        return size

    def _frame_end(self) -> int:
        size = self.buffer[1] & 0x7F
        header = 2 + (2 if size == 126 else 8 if size == 127 else 0)
        if len(self.buffer) < header:
            return header + 1
        return header + self._payload_size()

    def upload(self, ticket: str, size: int, chunk_frame: bytes, chunk: int) -> None:
        self.send("MsgUploadReq", Id=ticket, LengthBytes=size, Name="bench.bin")
        conf = self.receive()["MsgData"]
        if conf["ChunkSizeKB"] * 1024 != chunk:
            raise RuntimeError(f"server announced {conf}")
        self.send("MsgAck", Ack=True)
        sent, unacked, window = conf["FilePos"], 0, conf["SendAhead"]
        last = (
            client_frame(2, (chunk_frame_payload(chunk))[: size % chunk]) if size % chunk else b""
        )
        while sent < size:
            if unacked == window:
                self._ack()
                unacked -= 1
            if size - sent >= chunk:
                self.sock.sendall(chunk_frame)
                sent += chunk
            else:
                self.sock.sendall(last)
                sent = size
            unacked += 1
        while True:
            message = self.receive()
            if message["MsgType"] == "MsgAllDone":
                break
        self.sock.close()

    def _ack(self) -> None:
        message = self.receive()
        if message["MsgType"] != "MsgChunkAck":
            raise RuntimeError(message)


_PAYLOADS: dict[int, bytes] = {}


def chunk_frame_payload(chunk: int) -> bytes:
    if chunk not in _PAYLOADS:
        _PAYLOADS[chunk] = os.urandom(chunk)
    return _PAYLOADS[chunk]


def expected_sha256(size: int, chunk: int) -> str:
    payload, digest = chunk_frame_payload(chunk), hashlib.sha256()
    for offset in range(0, size, chunk):
        digest.update(payload[: min(chunk, size - offset)])
    return digest.hexdigest()


def timed_uploads(daemon: Daemon, backend_url: str, sizes: list[int], chunk: int) -> float:
    """Upload `sizes` concurrently; returns the wall time from first request to last MsgAllDone."""
    tickets = [
        http_post(daemon.port, "/incoming/backend/new_upload",
                  {"signalFinishURL": backend_url, "removeFileWhenFinished": "false"})
        for _ in sizes
    ]  # fmt: skip
    frame = client_frame(2, chunk_frame_payload(chunk))
    clients = [WsClient(daemon.port) for _ in sizes]
    errors: list[BaseException] = []

    def run(client: WsClient, ticket: str, size: int) -> None:
        try:
            client.upload(ticket, size, frame, chunk)
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=run, args=a) for a in zip(clients, tickets, sizes, strict=True)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    for ticket, size in zip(
        tickets, sizes, strict=True
    ):  # outside the timing: check, then free the disk
        path = Path(daemon.dir.name) / ticket
        if path.stat().st_size != size:
            raise RuntimeError(f"{ticket}: {path.stat().st_size} bytes stored, not {size}")
        if size <= 256 * MiB and sha256_file(path) != expected_sha256(size, chunk):
            raise RuntimeError(f"{ticket}: stored bytes differ")
        path.unlink()
    return elapsed


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def disk_write_mb_s(directory: str, size: int) -> float:
    block = os.urandom(4 * MiB)
    path = Path(directory) / "disk-limit.bin"
    start = time.perf_counter()
    with path.open("wb", buffering=0) as f:
        for _ in range(size // len(block)):
            f.write(block)
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return size / elapsed / 1e6


def loopback_mb_s(size: int) -> float:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = [0]

    def sink() -> None:
        conn, _ = server.accept()
        buffer = bytearray(1 * MiB)
        while n := conn.recv_into(buffer):
            received[0] += n
        conn.close()

    reader = threading.Thread(target=sink)
    reader.start()
    block = os.urandom(1 * MiB)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        for _ in range(size // len(block)):
            s.sendall(block)
    reader.join()
    elapsed = time.perf_counter() - start
    server.close()
    return size / elapsed / 1e6


def ticket_rate(daemon: Daemon, backend_url: str, count: int, connections: int = 16) -> float:
    """Tickets per second over keep-alive connections, each with one request in flight.

    One process, one epoll loop and prebuilt requests keep the client's share
    of the two cores small; Python's http.client with threads measured half as
    many tickets per second as the server can make.
    """
    import select

    body = urllib.parse.urlencode({"signalFinishURL": backend_url}).encode()
    request = (
        b"POST /incoming/backend/new_upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    poll = select.epoll()
    sockets: dict[int, socket.socket] = {}
    received: dict[int, bytes] = {}
    start = time.perf_counter()
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", daemon.port))
        sockets[s.fileno()], received[s.fileno()] = s, b""
        poll.register(s.fileno(), select.EPOLLIN)
        s.sendall(request)
    sent, done = connections, 0
    while done < count:
        for fd, _ in poll.poll(30):
            data = sockets[fd].recv(65536)
            if not data:
                raise RuntimeError("server closed a connection")
            received[fd] += data
            while (end := _response_end(received[fd])) > 0:
                if not received[fd].startswith(b"HTTP/1.1 200 "):
                    raise RuntimeError(f"new_upload: {received[fd][:60]!r}")
                received[fd] = received[fd][end:]
                done += 1
                if sent < count:
                    sockets[fd].sendall(request)
                    sent += 1
    elapsed = time.perf_counter() - start
    for s in sockets.values():
        s.close()
    poll.close()
    return count / elapsed


def _response_end(buffer: bytes) -> int:
    """Where the first whole HTTP response in `buffer` ends; 0 if it is not all there."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return 0
    head = buffer[:head_end].lower()
    if b"transfer-encoding: chunked" in head:  # other servers may answer so
        end = buffer.find(b"\r\n0\r\n\r\n", head_end)
        return 0 if end < 0 else end + 7
    end = head_end + 4 + int(head.split(b"content-length:")[1].split(b"\r\n")[0])
    return end if len(buffer) >= end else 0


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    backend, backend_url = start_backend()
    chunk = args.chunk_kb * 1024
    extra = ["--chunk-size-kb", str(args.chunk_kb)]
    if args.send_ahead is not None:
        extra += ["--send-ahead", str(args.send_ahead)]
    results: dict[str, Any] = {"chunk_kb": args.chunk_kb, "send_ahead": args.send_ahead}
    big = 256 * MiB if not args.quick else 64 * MiB
    huge = 1024 * MiB if not args.quick else 128 * MiB

    def series(name: str, sizes: list[int], runs: int, options: tuple[str, ...] = ()) -> None:
        rates, cpu = [], []
        daemon = Daemon([*extra, *options])
        try:
            for _ in range(runs):
                before = daemon.cpu_seconds()
                elapsed = timed_uploads(daemon, backend_url, sizes, chunk)
                rates.append(sum(sizes) / elapsed / 1e6)
                cpu.append((daemon.cpu_seconds() - before) / (sum(sizes) / (1024 * MiB)))
            results[name] = {"MB/s": summary(rates), "cpu_s_per_GiB": summary(cpu)}
            results[name]["peak_rss_MB"] = daemon.peak_rss_mb()
        finally:
            daemon.stop()

    def limit(name: str, fn: Callable[[], float]) -> None:
        results[name] = {"MB/s": summary([fn() for _ in range(args.runs)])}

    with tempfile.TemporaryDirectory(prefix="incoming-bench-disk-") as scratch:
        limit("limit_disk_write", lambda: disk_write_mb_s(scratch, big))
    limit("limit_loopback_tcp", lambda: loopback_mb_s(big))
    series(f"upload_1x{big // MiB}MiB", [big], args.runs)
    # the SHA-256 every handover carries, measured by its absence
    series(f"upload_1x{big // MiB}MiB_no_sha256", [big], args.runs, ("--checksum", "none"))
    series(f"upload_1x{huge // MiB}MiB", [huge], max(1, args.runs - 1))
    series("upload_8x64MiB", [64 * MiB] * 8, args.runs)
    series("upload_100x4MiB", [4 * MiB] * 100, 1)

    daemon = Daemon(extra)
    try:
        count = 5000 if not args.quick else 1000
        results["tickets_per_s"] = summary([ticket_rate(daemon, backend_url, count)
                                            for _ in range(args.runs)])  # fmt: skip
    finally:
        daemon.stop()
    backend.shutdown()
    return results


def print_table(results: dict[str, Any]) -> None:
    disk = results["limit_disk_write"]["MB/s"]["median"]
    loop = results["limit_loopback_tcp"]["MB/s"]["median"]
    ahead = results["send_ahead"] or "the server's default"
    print(f"chunk {results['chunk_kb']} KiB, send-ahead {ahead}")
    print(f"{'figure':<26}{'median':>10}{'min':>10}{'max':>10}{'CPU s/GiB':>11}"
          f"{'peak RSS MB':>13}{'/disk':>7}{'/loop':>7}")  # fmt: skip
    for name, value in results.items():
        if not isinstance(value, dict):
            continue
        figures = value.get("MB/s") or value
        unit = " MB/s" if "MB/s" in value else " /s"
        line = f"{name + unit:<26}" + "".join(
            f"{figures[k]:>10.0f}" for k in ("median", "min", "max")
        )
        if "cpu_s_per_GiB" in value:
            line += f"{value['cpu_s_per_GiB']['median']:>11.2f}{value['peak_rss_MB']:>13.1f}"
            median = figures["median"]
            line += f"{median / disk:>7.2f}{median / loop:>7.2f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk-kb", type=int, default=512)
    parser.add_argument("--send-ahead", type=int, help="SendAhead [the server's default]")
    parser.add_argument("--quick", action="store_true", help="smaller files, for a smoke run")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results = measure(args)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
