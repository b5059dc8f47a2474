#!/usr/bin/env python3
"""Load: many idle WebSocket connections and many uploads at once, on loopback.

Starts `twistd -n incoming`, opens --idle connections that each send an upload
request for a ticket of their own and then stay silent (answering pings), and
meanwhile runs --uploads concurrent uploads of --size MiB. Prints errors, time,
throughput and the server's memory; exits non-zero on any error.

    python bench/load.py [--idle 1000] [--uploads 100] [--size 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import struct
import sys
import time
from pathlib import Path
from typing import Any

from upload_bench import (
    Daemon,
    MiB,
    chunk_frame_payload,
    client_frame,
    expected_sha256,
    http_post,
    sha256_file,
    start_backend,
)

HANDSHAKE = (
    b"GET /incoming/frontend/upload_ws HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class Socket:
    """An asyncio WebSocket client connection speaking the upload protocol."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Socket:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HANDSHAKE)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(head[:80])
        return cls(reader, writer)

    def send(self, msg_type: str, **data: Any) -> None:
        text = json.dumps({"MsgType": msg_type, "MsgData": data}).encode()
        self.writer.write(client_frame(1, text))

    async def receive(self) -> dict[str, Any]:
        """The next text message; pings are answered on the way."""
        while True:
            first, second = await self.reader.readexactly(2)
            size = second & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(size)
            opcode = first & 0x0F
            if opcode == 9:
                self.writer.write(client_frame(10, payload))
            elif opcode == 8:
                raise RuntimeError("server closed the connection")
            elif opcode == 1:
                message: dict[str, Any] = json.loads(payload)
                if message["MsgType"] == "MsgError":
                    raise RuntimeError(message["MsgData"])
                return message

    async def request(self, ticket: str, size: int) -> dict[str, Any]:
        self.send("MsgUploadReq", Id=ticket, LengthBytes=size, Name="load.bin")
        conf = (await self.receive())["MsgData"]
        self.send("MsgAck", Ack=True)
        return conf

    def close(self) -> None:
        self.writer.close()


async def idle(port: int, ticket: str, holding: asyncio.Event) -> None:
    sock = await Socket.open(port)
    await sock.request(ticket, 1 * MiB)
    waiter = asyncio.ensure_future(holding.wait())
    reader = asyncio.ensure_future(sock.receive())  # only pings should come, answered inside
    done, _ = await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
    if reader in done:
        raise RuntimeError(f"idle connection got {reader.result()}")
    reader.cancel()
    sock.close()


async def upload(port: int, ticket: str, size: int, chunk: int) -> None:
    sock = await Socket.open(port)
    conf = await sock.request(ticket, size)
    frame = client_frame(2, chunk_frame_payload(chunk))
    sent, unacked = conf["FilePos"], 0
    while sent < size:
        if unacked == conf["SendAhead"]:
            await sock.receive()
            unacked -= 1
        sock.writer.write(frame)
        await sock.writer.drain()
        sent += chunk
        unacked += 1
    while (await sock.receive())["MsgType"] != "MsgAllDone":
        pass
    sock.close()


def tickets(port: int, backend_url: str, count: int) -> list[str]:
    form = {"signalFinishURL": backend_url, "removeFileWhenFinished": "false"}
    return [http_post(port, "/incoming/backend/new_upload", form) for _ in range(count)]


async def main_async(args: argparse.Namespace) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * (args.idle + args.uploads) + 200
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    backend, backend_url = start_backend()
    chunk = 512 * 1024
    daemon = Daemon(["--chunk-size-kb", "512"])
    try:
        rss_idle = daemon.peak_rss_mb()
        idle_tickets = tickets(daemon.port, backend_url, args.idle)
        upload_tickets = tickets(daemon.port, backend_url, args.uploads)
        holding = asyncio.Event()
        start = time.perf_counter()
        idlers = [asyncio.ensure_future(idle(daemon.port, t, holding)) for t in idle_tickets]
        await asyncio.sleep(0)  # let the idle connections start before the uploads
        size = args.size * MiB
        results = await asyncio.gather(
            *(upload(daemon.port, t, size, chunk) for t in upload_tickets), return_exceptions=True
        )
        elapsed = time.perf_counter() - start
        rss_loaded = daemon.peak_rss_mb()
        holding.set()
        idle_results = await asyncio.gather(*idlers, return_exceptions=True)
        errors = [r for r in [*results, *idle_results] if isinstance(r, BaseException)]
        wrong = 0
        for ticket in upload_tickets:
            try:
                if sha256_file(Path(daemon.dir.name) / ticket) != expected_sha256(size, chunk):
                    wrong += 1
            except OSError:
                wrong += 1
        print(f"idle connections      {args.idle}")
        print(f"concurrent uploads    {args.uploads} x {args.size} MiB")
        print(
            f"errors                {len(errors)}" + (f" (first: {errors[0]!r})" if errors else "")
        )
        print(f"files differing       {wrong}")
        print(f"wall time             {elapsed:.1f} s")
        print(f"aggregate throughput  {args.uploads * size / elapsed / 1e6:.0f} MB/s")
        print(f"server peak RSS       {rss_idle:.1f} MB idle, {rss_loaded:.1f} MB under load")
        per_connection = (rss_loaded - rss_idle) * 1024 / (args.idle + args.uploads)
        print(f"per connection        {per_connection:.0f} KiB")
        return 1 if errors or wrong else 0
    finally:
        daemon.stop()
        backend.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--uploads", type=int, default=100)
    parser.add_argument("--size", type=int, default=8, help="MiB per upload")
    sys.exit(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
