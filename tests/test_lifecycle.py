"""An upload's life on in-memory storage and handover, with task.Clock standing in
for time: timeouts, the handover's answers, cancels and failures, in exact order."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from incoming import rfc6455
from incoming.config import Config
from incoming.errors import ErrorCode, UploadError
from incoming.files import write_all
from incoming.manager import UploadManager
from incoming.metrics import Metrics
from incoming.storage import DiskStorage, Saved
from incoming.upload import HANDOVER_FAILED_TEXT, Departure, Phase, Room, Upload, bring_to_life
from incoming.websocket_protocol import UploadProtocolSession
from incoming.window import Window

from .conftest import CHUNK_KB, SEND_AHEAD
from .fakes import MemoryStorage, RecordingHandover, RecordingTransport
from .harness import (
    Backend,
    Server,
    complete_upload,
    connect,
    send_all,
    serving,
    upload_request,
)

T = TypeVar("T")


def make_manager(
    handover: RecordingHandover | None = None, storage: MemoryStorage | None = None
) -> tuple[UploadManager, Clock, MemoryStorage, RecordingHandover]:
    clock, storage, handover = Clock(), storage or MemoryStorage(), handover or RecordingHandover()
    manager = UploadManager(storage, handover, clock, Metrics(), max_idle=100, confirm_timeout=30)
    return manager, clock, storage, handover


def now(work: Coroutine[Any, Any, T]) -> T:
    """The result of work that the synchronous fakes let finish at once (or its error)."""
    d = ensureDeferred(work)
    failures: list[Failure] = []
    d.addErrback(failures.append)
    if failures:
        failures[0].raiseException()
    assert d.called, "the work did not finish at once"
    result: T = d.result
    return result


def new_ticket(manager: UploadManager, remove: bool) -> Upload:
    """A ticket, created at once on the synchronous fakes."""
    upload: Upload = ensureDeferred(manager.create("http://b/h", "", remove)).result
    return upload


def begin(
    answer: str = "done", length: int = 3, remove: bool = True, hold: bool = False
) -> tuple[UploadManager, Clock, MemoryStorage, RecordingHandover, Upload, RecordingTransport]:
    """A manager on a Clock with one upload, its client connected."""
    manager, clock, storage, handover = make_manager(RecordingHandover(answer, hold))
    upload = new_ticket(manager, remove)
    transport = RecordingTransport()
    now(manager.connect(upload.id, transport, length, "n"))
    return manager, clock, storage, handover, upload, transport


def test_bytes_are_written_in_order_and_acknowledged_to_their_sender() -> None:
    manager, clock, storage, handover, upload, transport = begin(length=5, hold=True)
    upload.life.receive(b"ab")
    upload.life.receive(b"cde")
    assert transport.events == [("stored", 2), ("stored", 3)]
    assert storage.finals[upload.id] == b"abcde"
    handover.answer("done")
    assert transport.events[-1] == ("ended", None, "")
    assert handover.handovers == [(upload.id, f"/memory/{upload.id}")]
    assert upload.phase is Phase.FINISHED
    assert upload.id not in storage.finals  # removeFileWhenFinished
    assert [phase for _, phase in storage.saves] == ["receiving", "handover", "finished"]


def test_nobody_hears_of_a_finish_that_could_not_be_saved() -> None:
    """A restart must find what the client was told: the file stays, the client waits."""
    manager, clock, storage, handover, upload, transport = begin()
    storage.unsaveable_phases.add("finished")
    upload.life.receive(b"abc")
    assert handover.handovers == [(upload.id, f"/memory/{upload.id}")]
    assert transport.events == [("stored", 3)]  # no ("ended", ...)
    assert storage.states[upload.id]["phase"] == "handover"
    assert storage.finals[upload.id] == b"abc"  # removeFileWhenFinished waits too


@pytest.mark.parametrize(
    ("phase", "heard"), [("awaiting_finish", "waiting"), ("cancelled", "ended")]
)
def test_a_state_that_could_not_be_saved_is_not_announced(phase: str, heard: str) -> None:
    manager, clock, storage, handover, upload, transport = begin("wait", remove=False)
    storage.unsaveable_phases.add(phase)
    upload.life.receive(b"ab")
    if phase == "cancelled":
        with pytest.raises(UploadError) as refused:
            now(manager.command(upload.id, "cancel_by_client", "stop"))
        assert refused.value.code is ErrorCode.STORAGE_FAILED  # the client asked: it hears
    else:
        upload.life.receive(b"c")
    assert upload.phase.value == phase
    assert heard not in [event[0] for event in transport.events]
    assert storage.states[upload.id]["phase"] != phase


def test_the_backend_hears_when_its_finish_upload_could_not_be_saved() -> None:
    manager, clock, storage, handover, upload, transport = begin("wait", remove=False)
    upload.life.receive(b"abc")
    assert upload.phase is Phase.AWAITING_FINISH
    storage.unsaveable_phases.add("finished")
    with pytest.raises(UploadError) as refused:
        now(manager.command(upload.id, "finish_upload", ""))
    assert refused.value.code is ErrorCode.STORAGE_FAILED
    assert storage.states[upload.id]["phase"] == "awaiting_finish"
    assert transport.events == [("stored", 3), ("waiting",)]


def test_bytes_stand_once_durable_unless_their_sender_may_still_void_them() -> None:
    """What an object store's spool may send on: durable bytes no connection can void."""
    manager, clock, storage, handover, upload, transport = begin(length=10)
    upload.life.receive(b"ab")
    assert storage.firms == [(upload.id, 2)]
    transport.may_void = True  # a tus body whose checksum is still to come, say
    upload.life.receive(b"cde")
    assert (upload.durable, upload.firm, storage.firms[-1]) == (5, 2, (upload.id, 2))
    transport.may_void = False
    upload.life.ready()  # it let go: its bytes stand
    assert (upload.firm, storage.firms[-1]) == (5, (upload.id, 5))
    transport.may_void = True
    upload.life.receive(b"fg")
    upload.life.rewind(5)  # its check failed: void
    assert (upload.stored, upload.firm) == (5, 5)


def test_a_ticket_stays_alive_while_its_partial_uploads_take_bytes() -> None:
    manager, clock, storage, handover = make_manager()
    ticket = new_ticket(manager, False)
    partial = now(manager.create("http://b/h", "", False, partial_of=ticket.id))
    now(manager.connect(partial.id, RecordingTransport(), 10, "n"))
    for _ in range(5):
        clock.advance(60)  # of max_idle 100
        partial.life.receive(b"x")
    assert ticket.phase is Phase.RECEIVING
    clock.advance(100)  # once they stop, both expire
    assert (ticket.phase, partial.phase) == (Phase.CANCELLED, Phase.CANCELLED)


def test_a_final_request_while_a_connection_serves_the_ticket_marks_nothing() -> None:
    """A PATCH connected (its bytes not yet counted): a final request is refused before it
    makes the ticket a final upload (the PATCH's bytes, then the partials', would mix)."""
    manager, clock, storage, handover = make_manager()
    ticket = new_ticket(manager, False)
    now(manager.command(ticket.id, "declare", 10, "n"))
    now(manager.connect(ticket.id, RecordingTransport(), None, "n"))
    with pytest.raises(UploadError) as refused:
        now(manager.command(ticket.id, "declare", 10, "n", "", True))
    assert refused.value.code is ErrorCode.ALREADY_CONNECTED
    assert not ticket.final and ticket.received == 0


def test_idle_upload_expires_then_is_forgotten() -> None:
    manager, clock, storage, handover, upload, transport = begin(length=10)
    upload.life.receive(b"12345")
    clock.advance(99)
    upload.life.receive(b"6")  # activity restarts the idle clock
    clock.advance(99)
    assert upload.phase is Phase.RECEIVING
    clock.advance(1)
    assert upload.phase is Phase.CANCELLED
    assert transport.events[-1] == ("ended", ErrorCode.TICKET_CANCELLED, "upload idle for 100 s")
    assert handover.notices == [(upload.id, "upload idle for 100 s")]
    assert storage.parts == {}
    assert manager.get(upload.id) is upload  # still known (412) until the next timeout
    clock.advance(100)
    assert manager.get(upload.id) is None
    assert upload.id not in storage.states


def test_wait_without_finish_upload_fails_at_confirm_timeout() -> None:
    manager, clock, storage, handover, upload, transport = begin("wait", remove=False)
    upload.life.receive(b"abc")
    assert upload.phase is Phase.AWAITING_FINISH
    clock.advance(29)
    assert upload.phase is Phase.AWAITING_FINISH
    clock.advance(1)
    assert upload.phase is Phase.CANCELLED
    message = "backend did not call finish_upload within 30 s"
    assert transport.events[-1] == ("ended", ErrorCode.HANDOVER_FAILED, message)
    assert handover.notices == [(upload.id, message)]
    assert storage.finals == {}


def test_finish_upload_in_time_cancels_the_confirm_timer() -> None:
    manager, clock, storage, handover, upload, transport = begin("wait", length=0, remove=False)
    upload.life.ready()  # a zero-byte file is complete at once
    upload.life.finish_upload("")
    clock.advance(30)
    assert upload.phase is Phase.FINISHED
    assert transport.events == [("waiting",), ("ended", None, "")]
    assert storage.finals == {upload.id: b""}  # a zero-byte file, kept
    assert handover.notices == []


@pytest.mark.parametrize("answer", ["wait", "done", "fail"])
def test_finish_upload_before_the_handovers_answer_is_applied_when_it_comes(answer: str) -> None:
    """A backend that starts its work, calls finish_upload from a worker and answers
    `wait`: the two race; finish_upload must not get 412."""
    manager, clock, storage, handover, upload, transport = begin(hold=True, remove=False)
    upload.life.receive(b"abc")
    assert upload.phase is Phase.HANDOVER
    upload.life.finish_upload("")  # accepted: the backend has the file
    assert upload.phase is Phase.FINISH_REQUESTED
    assert transport.events == [("stored", 3)]
    handover.answer(answer)
    assert upload.phase is Phase.FINISHED
    assert transport.events == [("stored", 3), ("ended", None, "")]
    clock.advance(30)  # no confirm timeout is left behind
    assert upload.phase is Phase.FINISHED
    assert storage.finals == {upload.id: b"abc"}


def test_a_failed_handover_tells_the_client_a_fixed_text() -> None:
    manager, clock, storage, handover, upload, transport = begin("fail", remove=False)
    upload.life.receive(b"abc")
    assert transport.events[-1] == ("ended", ErrorCode.HANDOVER_FAILED, HANDOVER_FAILED_TEXT)
    assert handover.notices == [(upload.id, HANDOVER_FAILED_TEXT)]
    assert storage.finals == {}  # even with removeFileWhenFinished=false


def test_past_end_and_storage_failure_reach_the_client_with_their_codes() -> None:
    manager, clock, storage, handover, upload, transport = begin(length=4)
    upload.life.receive(b"abc")
    upload.life.receive(b"de")
    upload.life.receive(b"f")  # on the wire behind it: dropped
    assert transport.events[-1][:2] == ("ended", ErrorCode.PAST_END)
    assert upload.phase is Phase.CANCELLED and storage.parts == {}
    manager, clock, storage, handover, upload, transport = begin(length=9000)
    storage.broken_at = 4096  # a disk that fails (not one that is full)
    upload.life.receive(b"x" * 5000)
    assert transport.events == [("ended", ErrorCode.STORAGE_FAILED, "storage failed")]
    assert handover.notices == [(upload.id, "storage failed")]


def test_a_full_storage_keeps_the_upload_and_its_durable_bytes_until_space_is_free() -> None:
    manager, clock, storage, handover, upload, transport = begin(length=9000)
    storage.full_at = 4096
    upload.life.receive(b"a" * 3000)
    upload.life.receive(b"b" * 3000)  # finds no space
    message = "the server's storage is full; resume later: nothing acknowledged is lost"
    assert transport.events == [("stored", 3000), ("failed", ErrorCode.STORAGE_FULL, message)]
    assert (upload.phase, upload.offset, handover.notices) == (Phase.RECEIVING, 3000, [])
    assert storage.parts[upload.id] == b"a" * 3000
    upload.life.disconnect(transport, Departure.INTERRUPTED)
    storage.full_at = None  # space was freed
    again = RecordingTransport()
    assert now(manager.connect(upload.id, again, 9000, "n")) is upload
    assert now(manager.resume_position(upload)) == 3000
    upload.life.ready()
    upload.life.receive(b"c" * 6000)
    assert again.events[:1] == [("stored", 6000)]
    assert handover.digests == [hashlib.sha256(b"a" * 3000 + b"c" * 6000).hexdigest()]
    assert upload.phase is Phase.FINISHED


def test_cancels_are_refused_once_the_handover_runs() -> None:
    manager, clock, storage, handover, upload, transport = begin("wait")
    upload.life.receive(b"abc")
    for cancel in (
        upload.life.cancel_by_backend,
        lambda: upload.life.cancel_by_client(""),
    ):
        with pytest.raises(UploadError) as refused:
            cancel()
        assert refused.value.code is ErrorCode.TOO_LATE
    upload.life.finish_upload("")
    with pytest.raises(UploadError) as refused:
        upload.life.finish_upload("")
    assert refused.value.code is ErrorCode.NOT_WAITING


def test_a_second_connection_is_refused_and_the_first_ones_bytes_stay_its_own() -> None:
    manager, clock, storage, handover, upload, transport = begin(length=10)
    other = RecordingTransport()
    with pytest.raises(UploadError) as refused:
        now(manager.connect(upload.id, other, 10, "n"))
    assert refused.value.code is ErrorCode.ALREADY_CONNECTED
    landing: Deferred[None] = Deferred()
    storage.write = lambda *args: landing  # type: ignore[method-assign]
    upload.life.receive(b"12345")  # in flight when the connection drops
    upload.life.disconnect(transport, Departure.INTERRUPTED)
    now(manager.connect(upload.id, other, 10, "n"))
    landing.callback(None)
    assert transport.events == [("stored", 5)] and other.events == []
    assert upload.stored == 5
    with pytest.raises(UploadError) as refused:
        now(manager.connect(upload.id, RecordingTransport(), 10, "n"))
    assert refused.value.code is ErrorCode.ALREADY_CONNECTED


def test_forgetting_a_finished_ticket_keeps_the_file_the_backend_kept() -> None:
    manager, clock, storage, handover, upload, transport = begin(remove=False)
    upload.life.receive(b"abc")
    assert upload.phase is Phase.FINISHED
    clock.advance(100)  # the finished ticket is forgotten
    assert manager.get(upload.id) is None and upload.id not in storage.states
    assert storage.finals == {upload.id: b"abc"}  # the backend's now


@pytest.mark.parametrize("phase", list(Phase))
def test_every_input_has_a_rule_in_every_state(phase: Phase) -> None:
    """The table is complete: no input is left undeclared in any state."""
    arguments: dict[str, tuple[Any, ...]] = {
        "connect": (RecordingTransport(), 3, "n", Room(10)),
        "declare": (3, "n", Room(10)),
        "rewind": (0,),
        "synced": (0,),
        "answered_done": ("verdict",),
        "finish_upload": ("verdict",),
        "disconnect": (RecordingTransport(), Departure.INTERRUPTED),
        "storage_failed": ("disk on fire",),
        "handover_failed": ("backend on fire",),
        "receive": (b"",),
        "past_end": ("too long",),
        "cancel_by_client": ("why",),
        "idle_timeout": (100.0,),
        "confirm_timeout": (30.0,),
        "restored": (True,),
        "storage_unavailable": (UploadError(ErrorCode.STORAGE_FULL, "full"),),
    }
    inputs = (
        "declare connect disconnect ready receive past_end rewind written synced all_stored "
        "storage_unavailable storage_failed "
        "answered_done answered_wait handover_failed finish_upload finalized "
        "cancel_by_backend cancel_by_client idle_timeout confirm_timeout restored bytes_missing "
        "handover_retrying handover_late notified"
    )
    for name in inputs.split():
        manager, clock, storage, handover = make_manager()
        upload = Upload(str(uuid.uuid4()), "http://b/h", "", True, length=3, phase=phase)
        if name == "written":
            upload.pending.append((0, None))
        life = bring_to_life(upload, manager)
        manager._uploads[upload.id] = upload  # as `restore` would
        with contextlib.suppress(UploadError):
            getattr(life, name)(*arguments.get(name, ()))


def test_restart_redoes_an_interrupted_handover_or_sees_it_was_taken() -> None:
    storage = MemoryStorage()
    manager, clock, _, handover = make_manager(storage=storage)
    upload = new_ticket(manager, False)
    storage.states[upload.id] = {**upload.to_record(), "phase": "handover", "length": 3}
    storage.finals[upload.id] = b"abc"
    taken = new_ticket(manager, False)
    storage.states[taken.id] = {**taken.to_record(), "phase": "handover", "length": 3}
    again, clock, _, handover = make_manager(storage=storage)
    storage.load = lambda: [  # type: ignore[method-assign]
        Saved(storage.states[upload.id], 3, True, None),
        Saved(storage.states[taken.id], 0, False, None),  # the backend moved the file away
    ]
    again.restore()
    assert handover.handovers == [(upload.id, f"/memory/{upload.id}")]
    assert again.get(upload.id).phase is Phase.FINISHED
    assert again.get(taken.id).phase is Phase.FINISHED


def test_restart_removes_a_finished_file_a_crash_kept_from_being_removed() -> None:
    storage = MemoryStorage()
    manager, clock, _, handover = make_manager(storage=storage)
    removed, kept = new_ticket(manager, True), new_ticket(manager, False)
    for upload in (removed, kept):  # finished (saved durably), then the power went
        storage.states[upload.id] = {**upload.to_record(), "phase": "finished", "length": 3}
        storage.finals[upload.id] = b"abc"
    again, clock, _, handover = make_manager(storage=storage)
    again.restore()
    assert storage.finals == {kept.id: b"abc"}  # removeFileWhenFinished=false: the backend's
    assert handover.notices == [] and again.get(removed.id).phase is Phase.FINISHED


def lines(log: list[str], upload: Upload) -> list[str]:
    return [line for line in log if line.startswith(f"upload {upload.id} ")]


def test_an_expiry_is_one_line_and_a_wait_says_what_comes_next(server_log: list[str]) -> None:
    manager, clock, storage, handover, upload, transport = begin(length=10)
    upload.life.receive(b"12345")
    clock.advance(100)
    assert lines(server_log, upload)[1:] == [
        f"upload {upload.id} expired (idle): upload idle for 100 s"
    ]
    manager, clock, storage, handover, upload, transport = begin("wait", remove=False)
    clock.advance(2)
    upload.life.receive(b"abc")
    upload.life.finish_upload("ok")
    assert lines(server_log, upload) == [
        f"upload {upload.id} started over websocket: 'n', 3 bytes",
        f"upload {upload.id} complete: 3 bytes stored in 2.0 s",
        f"upload {upload.id} handed over; the backend will call finish_upload",
        f"upload {upload.id} finished by the backend's finish_upload",
    ]


def test_a_restart_logs_what_it_found_in_words_that_say_what_it_is(
    server_log: list[str],
) -> None:
    storage = MemoryStorage()
    manager, clock, _, handover = make_manager(storage=storage)
    unused, receiving, handing, finished = (new_ticket(manager, True) for _ in range(4))
    storage.states[receiving.id] = {**receiving.to_record(), "length": 10}
    storage.parts[receiving.id] = bytearray(b"1234")
    storage.states[handing.id] = {**handing.to_record(), "length": 3, "phase": "handover"}
    storage.finals[handing.id] = b"abc"
    # finished, its file removed (removeFileWhenFinished) or taken by the backend
    storage.states[finished.id] = {
        **finished.to_record(),
        "length": 200_000_000,
        "phase": "finished",
    }
    server_log.clear()
    again, clock, _, handover = make_manager(storage=storage)
    again.restore()
    assert server_log[:3] == [
        f"upload {receiving.id} restored: 4 of 10 bytes stored",
        f"upload {handing.id} restored: being handed over again",
        f"upload {handing.id} handed over and finished",
    ]
    assert (
        "restored 4 uploads: 1 being handed over again, 1 finished, 1 receiving, "
        "1 tickets not used yet"
    ) in server_log
    assert not [line for line in server_log if "None" in line or unused.id in line]
    assert not [line for line in server_log if finished.id in line]


# Over loopback, with the disk.


@pytest_twisted.async_yield_fixture
async def full_server(config: Config) -> AsyncIterator[Server]:
    """A server whose storage fills up after the first 8 KiB of any upload."""
    async with serving(config, MemoryStorage(full_at=8192)) as s:
        yield s


@pytest_twisted.ensureDeferred
async def test_a_full_disk_stops_only_that_upload_until_space_is_free(
    full_server: Server, backend: Backend
) -> None:
    server, chunk = full_server, CHUNK_KB * 1024
    big = await server.new_upload(backend.url, removeFileWhenFinished="false")
    small = await server.new_upload(backend.url, removeFileWhenFinished="false")
    big_client, _ = await upload_request(server, big, 10 * chunk)
    small_client, _ = await upload_request(server, small, chunk)
    big_client.send("MsgAck", Ack=True)
    small_client.send("MsgAck", Ack=True)
    data = os.urandom(10 * chunk)
    for i in range(3):
        big_client.send_chunk(data[i * chunk : (i + 1) * chunk])
    messages = []
    while (msg := await big_client.next()) is not None:
        messages.append(msg)
    acknowledged = sum(m["MsgData"]["ChunkSize"] for m in messages if m["MsgType"] == "MsgChunkAck")
    assert acknowledged == 2 * chunk
    assert messages[-1]["MsgType"] == "MsgError"
    assert messages[-1]["MsgData"]["ErrorCode"] == ErrorCode.STORAGE_FULL
    small_data = os.urandom(chunk)
    await send_all(small_client, small_data, chunk, SEND_AHEAD)
    await small_client.expect("MsgAllDone")
    storage: MemoryStorage = server.manager.storage  # type: ignore[assignment]
    assert storage.finals == {small: small_data}
    storage.full_at = None  # space was freed
    resumed, conf = await upload_request(server, big, 10 * chunk)
    assert conf["FilePos"] == acknowledged
    await complete_upload(resumed, data[acknowledged:], chunk, SEND_AHEAD)
    posts = [await backend.posts.get() for _ in range(2)]
    assert [(p["id"], p["cancelled"]) for p in posts] == [(small, "no"), (big, "no")]
    assert storage.finals[big] == data


@pytest_twisted.ensureDeferred
async def test_length_beyond_free_space_is_refused(server: Server, backend: Backend) -> None:
    ticket = await server.new_upload(backend.url)
    client = await connect(server.ws_url())
    client.send("MsgUploadReq", Id=ticket, LengthBytes=2**62, Name="huge")
    await client.expect_error(ErrorCode.INSUFFICIENT_STORAGE)
    upload = server.manager.get(ticket)
    assert upload is not None and upload.length is None and upload.phase is Phase.RECEIVING
    client, conf = await upload_request(server, ticket, 1)
    assert conf["FilePos"] == 0
    client.close()


def websocket(
    manager: UploadManager, clock: Clock
) -> tuple[UploadProtocolSession, StringTransport]:
    """A WebSocket session (58 s to its MsgUploadReq) on a fake connection."""
    transport = StringTransport()
    session = UploadProtocolSession(
        manager,
        clock,
        window=Window(4096, 2, 0, 1e9),
        request_timeout=58,
        connections=manager.metrics.websocket_connections,
    )
    rfc6455.WebSocketConnection(session, clock, 58, 4096).makeConnection(transport)
    return session, transport


def test_a_connection_without_upload_request_is_dropped_at_the_timeout() -> None:
    manager, clock, storage, handover = make_manager()
    transports = []
    for _ in range(2):
        transports.append(websocket(manager, clock)[1])
    clock.advance(57)
    assert not transports[0].disconnecting
    clock.advance(1)
    assert b'"ErrorCode":%d' % ErrorCode.NO_UPLOAD_REQUEST in transports[0].value()
    closing = rfc6455.frame(rfc6455.CLOSE, rfc6455.POLICY.to_bytes(2, "big"))
    assert all(t.value().endswith(closing) and not t.disconnecting for t in transports)
    clock.advance(rfc6455.CLOSE_WAIT)  # the peer does not answer it
    assert all(t.disconnecting for t in transports)


def test_after_an_error_the_upload_is_free_before_the_closing_handshake_ends() -> None:
    """Our close waits for the client's close frame; a client that comes back at once
    (a resume) finds the upload free, not ALREADY_CONNECTED."""
    manager, clock, storage, handover = make_manager()
    upload = new_ticket(manager, False)
    session, transport = websocket(manager, clock)
    request = {"MsgType": "MsgUploadReq", "MsgData": {"Id": upload.id, "LengthBytes": 10}}
    session.text_received(json.dumps(request))
    assert b"MsgUploadConf" in transport.value() and upload.transport is session
    session.binary_received(b"x")  # before MsgAck: an error, and our close
    assert b'"ErrorCode":%d' % ErrorCode.UNEXPECTED_MESSAGE in transport.value()
    assert not transport.disconnecting  # the closing handshake runs
    clock.advance(0)
    assert upload.transport is None
    now(manager.connect(upload.id, RecordingTransport(), 10, "n"))


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
    storage = DiskStorage(tmp_path, reactor, pool, max_open_files=2)
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
