"""The WebSocket window (SPEC: Long fat links): it covers the round trip, up to
--max-window, and the bytes in flight stay out of the server's memory."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.threadpool import ThreadPool

from bench.linkem import LinkProcess
from incoming import rfc6455
from incoming.config import Config
from incoming.files import Chunk, Digest
from incoming.storage import DiskStorage
from incoming.window import Window

from .harness import Backend, Client, connect, serving
from .test_websocket import client_frame

MiB = 1024 * 1024


# The window for a round trip


@pytest.mark.parametrize(
    ("rtt", "expected"),
    [
        (None, 4),  # not measured: the configured window
        (0.0, 4),
        (0.0001, 4),  # loopback: never below the configured window
        (0.040, 10),  # 40 ms x 125 MB/s = 5 MB: 9.5 chunks of 512 KiB, rounded up
        (0.150, 36),  # 18.75 MB
        (0.537, 128),  # 67.1 MB: the ceiling, 64 MiB
        (30.0, 128),
    ],
)
def test_the_window_covers_the_round_trip_between_the_floor_and_the_ceiling(
    rtt: float | None, expected: int
) -> None:
    window = Window(chunk_size=512 * 1024, send_ahead=4, max_bytes=64 * MiB, rate=125e6)
    assert window.for_rtt(rtt) == expected
    assert window.max_pending == 2 * MiB  # memory: the configured window, whatever the rtt


def test_a_ceiling_of_zero_or_below_the_floor_keeps_the_configured_window() -> None:
    assert Window(512 * 1024, 4, 0, 125e6).for_rtt(0.150) == 4
    assert Window(512 * 1024, 4, 1 * MiB, 125e6).for_rtt(0.150) == 4
    assert Window(512 * 1024, 4, 3 * MiB, 125e6).for_rtt(0.150) == 6


# The round trip, and reading paused by the handler, in the framing


class Silent:
    def connected(self, connection: rfc6455.WebSocketConnection) -> None: ...

    def text_received(self, text: str) -> None: ...

    def binary_received(self, data: bytes) -> None: ...

    def connection_lost(self) -> None: ...


def opened() -> tuple[rfc6455.WebSocketConnection, StringTransport, Clock]:
    clock, transport = Clock(), StringTransport()
    connection = rfc6455.WebSocketConnection(Silent(), clock, 60, 1000)
    connection.makeConnection(transport)
    connection.opened()
    return connection, transport, clock


def test_with_syncing_the_window_covers_a_sync_too() -> None:
    syncing = Window(512 * 1024, 4, 64 * MiB, 125e6, least_bytes=8 * MiB)
    assert [syncing.for_rtt(rtt) for rtt in (None, 0.0001, 0.040, 0.150)] == [16, 16, 16, 36]
    assert Window(4096, 3, 64 * MiB, 125e6, least_bytes=8 * MiB).for_rtt(None) == 2048
    assert Window(512 * 1024, 4, 0, 125e6, least_bytes=8 * MiB).for_rtt(0.150) == 4  # pinned


def test_the_round_trip_runs_from_the_101_to_the_first_answer() -> None:
    connection, transport, clock = opened()
    assert transport.value() == rfc6455.frame(rfc6455.PING, rfc6455.RTT_PROBE)
    assert connection.rtt is None
    clock.advance(0.150)
    connection.dataReceived(client_frame(rfc6455.PONG, rfc6455.RTT_PROBE))
    clock.advance(0.5)
    connection.dataReceived(client_frame(rfc6455.TEXT, b"{}"))
    assert connection.rtt == pytest.approx(0.150)


def test_a_message_before_the_pong_ends_the_round_trip_too() -> None:
    connection, _, clock = opened()
    clock.advance(0.020)
    connection.dataReceived(client_frame(rfc6455.TEXT, b"{}"))
    assert connection.rtt == pytest.approx(0.020)


def test_reading_resumes_only_once_neither_the_handler_nor_the_writes_hold_it() -> None:
    connection, transport, _ = opened()
    connection.pause_reading()  # the disk is behind
    assert transport.producerState == "paused"
    connection.pauseProducing()  # and the peer takes none of our replies
    connection.resumeProducing()  # it takes them again: the disk still holds reading
    assert transport.producerState == "paused"
    connection.pauseProducing()
    connection.resume_reading()  # the disk caught up: the peer still holds it
    assert transport.producerState == "paused"
    connection.resumeProducing()
    assert transport.producerState == "producing"


# The real server behind an emulated long fat link (bench/linkem.py)


class GatedDisk(DiskStorage):
    """The disk, whose writes wait while the gate is shut. It notes, at every write, the
    bytes of that upload queued for the disk (in the server's memory), and `flooded`
    fires once `flood_at` bytes wait behind the gate."""

    def __init__(self, root: Path, pool: ThreadPool, flood_at: int) -> None:
        super().__init__(root, reactor, pool)
        self.queued: Callable[[str], int] = lambda upload_id: 0
        self.seen: list[int] = []
        self.held: list[Callable[[], None]] = []
        self.held_bytes = 0
        self.flood_at = flood_at
        self.flooded: Deferred[None] = Deferred()
        self.shut = True

    def write(
        self,
        upload_id: str,
        offset: int,
        data: Chunk,
        digests: tuple[Digest, ...] = (),
        hashed: bool = True,
    ) -> Deferred[None]:
        self.seen.append(self.queued(upload_id))
        if not self.shut:
            return super().write(upload_id, offset, data, digests, hashed)
        landed: Deferred[None] = Deferred()
        write = super().write
        self.held.append(
            lambda: write(upload_id, offset, data, digests, hashed).chainDeferred(landed)
        )
        self.held_bytes += len(data)
        if self.held_bytes >= self.flood_at and not self.flooded.called:
            self.flooded.callback(None)
        return landed

    def open(self) -> None:
        """Let every held write land, in order, and the next ones pass."""
        self.shut = False
        while self.held:
            self.held.pop(0)()


async def announced(port: int, ticket: str, size: int) -> tuple[Client, int]:
    """Connects through the link's `port`; returns the client and the SendAhead it got."""
    client = await connect(f"ws://127.0.0.1:{port}/incoming/frontend/upload_ws")
    client.send("MsgUploadReq", Id=ticket, LengthBytes=size, Name="wan.bin")
    conf = await client.expect("MsgUploadConf")
    return client, int(conf["SendAhead"])


@pytest_twisted.ensureDeferred
async def test_the_window_grows_with_the_round_trip_and_memory_stays_bounded(
    tmp_path: Path, backend: Backend, pool: ThreadPool
) -> None:
    chunk, floor, ceiling = 64 * 1024, 2, 4 * MiB
    config = Config(
        listen="tcp:0:interface=127.0.0.1",
        storage_dir=tmp_path / "storage",
        chunk_size_kb=chunk // 1024,
        send_ahead=floor,
        max_window=ceiling,  # 100 ms x the default 1000 Mbit/s, 12.5 MB, would pass it
        handover_timeout=5,
        sync="none",  # no floor covering a sync: the round trip alone sizes the window
    )
    window_chunks = ceiling // chunk
    disk = GatedDisk(config.storage_dir, pool, flood_at=(window_chunks - 1) * chunk)
    disk.prepare()
    data = os.urandom(8 * MiB)
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    async with serving(config, disk) as server:

        def queued(upload_id: str) -> int:
            upload = server.manager.get(upload_id)
            return upload.pending_bytes if upload is not None else 0

        disk.queued = queued
        near = LinkProcess([("127.0.0.1", server.port)], rtt_ms=0, rate_mbit=0)
        try:
            ticket = await server.new_upload(backend.url)
            client, near_window = await announced(near.ports[0], ticket, len(data))
            client.close()
        finally:
            near.stop()
        far = LinkProcess([("127.0.0.1", server.port)], rtt_ms=100, rate_mbit=400)
        try:
            ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
            client, window = await announced(far.ports[0], ticket, len(data))
            assert near_window < window == window_chunks  # at 100 ms it reaches the ceiling
            upload = server.manager.get(ticket)
            assert upload is not None
            connection = upload.transport.connection  # type: ignore[union-attr]
            paused: Deferred[None] = Deferred()
            pause = connection.pause_reading

            def pause_reading() -> None:
                pause()
                if not paused.called:
                    paused.callback(None)

            connection.pause_reading = pause_reading
            client.send("MsgAck", Ack=True)
            for piece in chunks[:window]:  # the whole window at once
                client.send_chunk(piece)
            # The disk takes nothing: the server stops reading the socket, the window's
            # bytes wait in the kernel and the emulated network. (Were it to read on, the
            # whole window would reach its memory; the gate opens then, and the bound fails.)
            await DeferredList([paused, disk.flooded], fireOnOneCallback=True)
            disk.open()
            for piece in chunks[window:]:  # one more for every ack: the window stays full
                await client.expect("MsgChunkAck")
                client.send_chunk(piece)
            for _ in range(window):
                await client.expect("MsgChunkAck")
            await client.expect("MsgAllDone")
        finally:
            stats = far.stop()
    post = await backend.posts.get()
    assert post["id"] == ticket
    stored = Path(post["filename"]).read_bytes()
    assert len(stored) == len(data)
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest() == post["sha256"]
    assert stats["up"]["bytes"] >= len(data)  # it went across the link
    # what waited for the disk: the configured window, or one socket read past it
    assert max(disk.seen) <= floor * chunk + rfc6455.READ_SIZE < window * chunk
    metrics = server.manager.metrics.registry
    assert metrics.get_sample_value("incoming_websocket_round_trip_seconds_count") == 2
    assert (
        metrics.get_sample_value("incoming_websocket_round_trip_seconds_bucket", {"le": "0.05"})
        == 1
    )
