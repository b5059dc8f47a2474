"""Timeouts and storage failures, with task.Clock standing in for time."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.threadpool import ThreadPool

from incoming import websocket
from incoming.config import Config
from incoming.files import write_all
from incoming.manager import UploadManager
from incoming.storage import Storage
from incoming.uploads import ErrorCode, Phase, Registry, Upload
from incoming.ws import UploadSession

from .conftest import CHUNK_KB, SEND_AHEAD
from .harness import Backend, Server, connect, send_all, start_server, upload_request


class RecordingBackend:
    """Stands in for incoming.handover.Backend: answers handovers as told."""

    def __init__(self, answer: str = "done") -> None:
        self.answer = answer
        self.handovers: list[str] = []
        self.cancel_notices: list[tuple[str, str]] = []

    async def hand_over(self, upload: Upload, filename: str) -> str:
        self.handovers.append(filename)
        return self.answer

    async def notify_cancelled(self, upload: Upload, reason: str) -> None:
        self.cancel_notices.append((upload.id, reason))


class Session:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def upload_cancelled(self, reason: str) -> None:
        self.events.append(("cancelled", reason))

    def upload_failed(self, code: ErrorCode, message: str) -> None:
        self.events.append(("failed", code, message))

    def upload_done(self) -> None:
        self.events.append(("done",))


def make_manager(
    tmp_path: Path,
    pool: ThreadPool,
    backend: RecordingBackend,
    storage_class: type[Storage] = Storage,
) -> tuple[UploadManager, Clock]:
    clock = Clock()
    config = Config(storage_dir=tmp_path, max_idle=100, handover_confirm_timeout=30)
    storage = storage_class(tmp_path, reactor, pool)
    return UploadManager(config, Registry(), storage, backend, clock), clock  # type: ignore[arg-type]


def data_files(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.suffix not in (".json", ".journal")]


async def begin(
    tmp_path: Path,
    pool: ThreadPool,
    answer: str,
    length: int,
    remove: bool,
    storage_class: type[Storage] = Storage,
) -> tuple[UploadManager, Clock, RecordingBackend, Upload, Session]:
    """A manager on a Clock with one upload, its browser connected."""
    backend = RecordingBackend(answer)
    manager, clock = make_manager(tmp_path, pool, backend, storage_class)
    upload = await ensureDeferred(manager.create("http://b/h", "", remove))
    session = Session()
    manager.connect(upload.id, session, length, "n")
    return manager, clock, backend, upload, session


async def settle(manager: UploadManager) -> None:
    while manager.running:
        for d in list(manager.running):
            await d


@pytest_twisted.ensureDeferred
async def test_idle_upload_expires_then_is_forgotten(tmp_path: Path, pool: ThreadPool) -> None:
    manager, clock, backend, upload, session = await begin(tmp_path, pool, "done", 10, True)
    await manager.receive_chunk(upload, b"12345")
    assert (tmp_path / f"{upload.id}.part").exists()
    clock.advance(99)
    assert upload.phase is Phase.RECEIVING
    await manager.receive_chunk(upload, b"6")  # activity restarts the idle clock
    clock.advance(99)
    assert upload.phase is Phase.RECEIVING
    clock.advance(1)
    await settle(manager)
    assert upload.phase is Phase.CANCELLED
    assert session.events == [("cancelled", "upload idle for 100 s")]
    assert backend.cancel_notices == [(upload.id, "upload idle for 100 s")]
    assert data_files(tmp_path) == []
    assert manager.registry.get(upload.id) is upload  # still known (412) until the next timeout
    clock.advance(100)
    assert manager.registry.get(upload.id) is None


@pytest_twisted.ensureDeferred
async def test_wait_without_finish_upload_fails_at_confirm_timeout(
    tmp_path: Path, pool: ThreadPool
) -> None:
    manager, clock, backend, upload, session = await begin(tmp_path, pool, "wait", 3, False)
    await manager.receive_chunk(upload, b"abc")
    await settle(manager)
    assert upload.phase is Phase.AWAITING_FINISH
    assert backend.handovers == [str(tmp_path / upload.id)]
    clock.advance(29)
    assert upload.phase is Phase.AWAITING_FINISH
    clock.advance(1)
    await settle(manager)
    assert upload.phase is Phase.CANCELLED
    assert session.events[0][:2] == ("failed", ErrorCode.HANDOVER_FAILED)
    assert "finish_upload within 30 s" in session.events[0][2]
    assert backend.cancel_notices and data_files(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_finish_upload_in_time_cancels_the_confirm_timer(
    tmp_path: Path, pool: ThreadPool
) -> None:
    manager, clock, backend, upload, session = await begin(tmp_path, pool, "wait", 0, False)
    manager.start_if_complete(upload)
    await settle(manager)
    await ensureDeferred(manager.finish_upload(upload))
    clock.advance(30)
    await settle(manager)
    assert upload.phase is Phase.FINISHED
    assert session.events == [("done",)]
    assert (tmp_path / upload.id).read_bytes() == b""  # a zero-byte file, kept
    assert backend.cancel_notices == []


class DiskFullAfter(Storage):
    """Storage whose disk fills up after the first 8 KiB of any upload."""

    def _write(self, upload_id: str, offset: int, data: Any) -> None:
        if offset + len(data) > 8192:
            raise OSError(errno.ENOSPC, "No space left on device")
        super()._write(upload_id, offset, data)


@pytest_twisted.async_yield_fixture
async def full_server(config: Config) -> AsyncIterator[Server]:
    s, port, pool = await start_server(config, DiskFullAfter)
    yield s
    await port.stopListening()
    await s.settled()
    await ensureDeferred(s.manager.shutdown())
    pool.stop()


@pytest_twisted.ensureDeferred
async def test_disk_full_cancels_only_that_upload(full_server: Server, backend: Backend) -> None:
    server, chunk = full_server, CHUNK_KB * 1024
    big = await server.new_upload(backend.url)
    small = await server.new_upload(backend.url, removeFileWhenFinished="false")
    big_client, _ = await upload_request(server, big, 10 * chunk)
    small_client, _ = await upload_request(server, small, chunk)
    big_client.send("MsgAck", Ack=True)
    small_client.send("MsgAck", Ack=True)
    for _ in range(3):
        big_client.send_chunk(os.urandom(chunk))
    messages = []
    while (msg := await big_client.next()) is not None:
        messages.append(msg)
    assert messages[-1]["MsgType"] == "MsgError"
    assert messages[-1]["MsgData"]["ErrorCode"] == ErrorCode.STORAGE_FAILED
    notice = await backend.posts.get()
    assert (notice["id"], notice["cancelled"]) == (big, "yes")
    data = os.urandom(chunk)
    await send_all(small_client, data, chunk, SEND_AHEAD)
    await small_client.expect("MsgAllDone")
    assert server.files() == {small: data}


@pytest_twisted.ensureDeferred
async def test_length_beyond_free_space_is_refused(server: Server, backend: Backend) -> None:
    ticket = await server.new_upload(backend.url)
    client = await connect(server.ws_url())
    client.send("MsgUploadReq", Id=ticket, LengthBytes=2**62, Name="huge")
    await client.expect_error(ErrorCode.INSUFFICIENT_STORAGE)
    upload = server.manager.registry.get(ticket)
    assert upload is not None and upload.length is None and upload.phase is Phase.RECEIVING
    client, conf = await upload_request(server, ticket, 1)
    assert conf["FilePos"] == 0
    client.close()


@pytest_twisted.ensureDeferred
async def test_forgetting_a_finished_ticket_keeps_the_file_the_backend_kept(
    tmp_path: Path, pool: ThreadPool
) -> None:
    manager, clock, backend, upload, session = await begin(tmp_path, pool, "done", 3, False)
    await manager.receive_chunk(upload, b"abc")
    await settle(manager)
    assert upload.phase is Phase.FINISHED
    clock.advance(100)  # the finished ticket is forgotten
    await settle(manager)
    assert manager.registry.get(upload.id) is None
    assert not (tmp_path / f"{upload.id}.json").exists()
    assert (tmp_path / upload.id).read_bytes() == b"abc"  # the backend's now


class SyncRecorder(Storage):
    """Records, for each saved state, its phase and whether it was made durable."""

    saves: list[tuple[object, bool]]

    def _save_state(self, upload_id: str, record: Any, sync: bool) -> None:
        self.saves = [*getattr(self, "saves", []), (record["phase"], sync)]
        super()._save_state(upload_id, record, sync)


@pytest_twisted.ensureDeferred
async def test_the_handover_start_and_end_are_saved_durably(
    tmp_path: Path, pool: ThreadPool
) -> None:
    manager, clock, backend, upload, session = await begin(
        tmp_path, pool, "done", 3, True, SyncRecorder
    )
    await manager.receive_chunk(upload, b"abc")
    await settle(manager)
    saves = manager.storage.saves  # type: ignore[attr-defined]
    assert ("handover", True) in saves and ("finished", True) in saves


def test_a_connection_without_upload_request_is_dropped_at_the_timeout(
    tmp_path: Path, pool: ThreadPool
) -> None:
    manager, clock = make_manager(tmp_path, pool, RecordingBackend())
    transports = []
    for _ in range(2):
        transport = StringTransport()
        connection = websocket.WebSocketConnection(
            UploadSession(manager), clock, manager.config.ws_timeout, 1024
        )
        connection.makeConnection(transport)
        transports.append(transport)
    answering = transports[1]
    clock.advance(manager.config.ws_timeout - 1)
    assert not transports[0].disconnecting
    clock.advance(1)
    assert b'"ErrorCode":%d' % ErrorCode.NO_UPLOAD_REQUEST in transports[0].value()
    assert transports[0].disconnecting
    assert answering.disconnecting  # the other one said nothing either


def test_short_writes_are_carried_on_until_every_byte_is_written(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        write_all(fd, b"0123456789" * 10, lambda fd, view: os.write(fd, view[:3]))
    finally:
        os.close(fd)
    assert path.read_bytes() == b"0123456789" * 10


def open_part_files(directory: Path) -> int:
    """How many of this process's fds are upload files under `directory`."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the fd that listed the directory
            link = os.readlink(f"/proc/self/fd/{fd}")
            count += link.startswith(str(directory)) and link.endswith(".part")
    return count


@pytest_twisted.ensureDeferred
async def test_upload_files_stay_open_only_while_written_and_within_a_bound(
    tmp_path: Path, pool: ThreadPool
) -> None:
    storage = Storage(tmp_path, reactor, pool, max_open_files=2)
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for upload_id in ids:
        await storage.write(upload_id, 0, b"x")
    await storage.drain_all()
    assert open_part_files(tmp_path) == 2  # the least recently written one was closed
    await storage.release(ids[2])  # its connection went away
    assert open_part_files(tmp_path) == 1
    await storage.write(ids[0], 1, b"y")  # reopened as needed
    assert (tmp_path / f"{ids[0]}.part").read_bytes() == b"xy"
    for upload_id in ids:
        await storage.release(upload_id)
    assert open_part_files(tmp_path) == 0
