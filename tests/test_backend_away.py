"""A backend that is away (SPEC: "When the backend is away"): its handover and cancel
notices are retried for HandoverRetryS, the file kept, across restarts and instances;
the client is told after HandoverTimeoutS that the file is stored and pending.

In memory with task.Clock for the rules; over loopback with a task.Clock where minutes
pass; with real twistd processes (and Redis) across restarts and instances."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, ensureDeferred
from twisted.internet.task import Clock

from incoming.config import Config
from incoming.errors import ErrorCode, UploadError
from incoming.handover import Retrier
from incoming.manager import UploadManager
from incoming.metrics import Metrics
from incoming.upload import HANDOVER_FAILED_TEXT, Departure, Phase, Upload

from .fakes import MemoryStorage, RecordingHandover, RecordingTransport
from .harness import (
    CHUNK_KB,
    SEND_AHEAD,
    Backend,
    Redis,
    Server,
    acked_upload,
    connect,
    free_port,
    send_all,
    serving,
    start_backend,
    start_daemon,
    stop_daemon,
    upload_request,
)

CHUNK = CHUNK_KB * 1024
TUS = {"Tus-Resumable": "1.0.0"}
DAY = 86400.0
T = TypeVar("T")


async def soon(work: Awaitable[T], seconds: float = 30) -> T:
    """`work`'s result, or a failed test (TimeoutError) rather than a hung one."""
    return await ensureDeferred(_awaited(work)).addTimeout(seconds, reactor)


async def _awaited(work: Awaitable[T]) -> T:
    return await work


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# The rules, in memory: RecordingHandover answers `away` (BackendAway) until told otherwise.


def away_manager(
    retry_for: float = DAY, storage: MemoryStorage | None = None, answer: str = "away"
) -> tuple[UploadManager, Clock, MemoryStorage, RecordingHandover]:
    clock, storage, handover = Clock(), storage or MemoryStorage(), RecordingHandover(answer)
    manager = UploadManager(
        storage, handover, clock, Metrics(), max_idle=100, confirm_timeout=30,
        handover_timeout=55, handover_retry=retry_for,
    )  # fmt: skip
    manager.retrier.jitter = lambda: 0.0  # delays exactly 0.25 s doubling to 300 s
    return manager, clock, storage, handover


def completed(
    manager: UploadManager, data: bytes = b"abc", remove: bool = False
) -> tuple[Upload, RecordingTransport]:
    """A ticket whose client sent every byte: its handover has begun."""
    upload: Upload = ensureDeferred(manager.create("http://b/h", "", remove)).result
    transport = RecordingTransport()
    ensureDeferred(manager.connect(upload.id, transport, len(data), "n"))
    upload.life.receive(data)
    return upload, transport


def elapse(clock: Clock, seconds: float) -> None:
    """Let time pass as it does: in steps of 0.25 s (each delay is a multiple of it), so that
    what each step schedules is due at its own time (one `advance` would fire it late)."""
    clock.pump([0.25] * round(seconds / 0.25))


def metric(manager: UploadManager, name: str, **labels: str) -> float:
    value = manager.metrics.registry.get_sample_value(name, labels)
    assert value is not None, name
    return value


def test_away_for_70_s_then_done_keeps_the_file_and_tells_the_client_pending(
    server_log: list[str],
) -> None:
    manager, clock, storage, handover = away_manager()
    upload, transport = completed(manager)
    assert len(handover.handovers) == 1 and upload.phase is Phase.HANDOVER
    elapse(clock, 54.75)
    assert ("pending",) not in transport.events
    assert metric(manager, "incoming_handovers_pending") == 0
    elapse(clock, 0.25)  # HandoverTimeoutS without an answer
    assert transport.events[-1] == ("pending",)
    assert upload.late and upload.phase is Phase.HANDOVER
    assert storage.states[upload.id]["late"] is True
    assert metric(manager, "incoming_handovers_pending") == 1
    elapse(clock, 15)  # 70 s: the backend is back
    handover.default = "done"
    elapse(clock, 60)  # the attempt after 63.75 s: at 127.75 s
    assert upload.phase is Phase.FINISHED
    assert len(handover.handovers) == 10  # 0, 0.25, 0.75, 1.75, ... 127.75 s
    assert storage.finals == {upload.id: b"abc"}  # kept all along, and now the backend's
    assert transport.events.count(("pending",)) == 1
    assert metric(manager, "incoming_handover_retries_total", post="handover") == 9
    assert metric(manager, "incoming_handovers_pending") == 0
    assert manager.running == set()
    said = [line for line in server_log if line.startswith(f"upload {upload.id}: handover")]
    assert said == [
        f"upload {upload.id}: handover: backend answered HTTP 503; retrying for up to 24 h",
        f"upload {upload.id}: handover went through at attempt 10, 2 min after the first",
    ]
    pending = (
        f"upload {upload.id}: no answer from the backend within 55 s; the client is told "
        "the file is stored and will be handed over"
    )
    assert pending in server_log


def test_the_end_of_the_retry_time_fails_the_handover_as_before() -> None:
    manager, clock, storage, handover = away_manager(retry_for=600)
    upload, transport = completed(manager)
    elapse(clock, 599)
    assert upload.phase is Phase.HANDOVER and storage.finals
    elapse(clock, 1)  # the last attempt, at the end of HandoverRetryS
    assert upload.phase is Phase.CANCELLED
    assert len(handover.handovers) == 13
    assert transport.events[-1] == ("ended", ErrorCode.HANDOVER_FAILED, HANDOVER_FAILED_TEXT)
    assert storage.finals == {}  # deleted, as a failed handover's file always was
    assert handover.notices == [(upload.id, HANDOVER_FAILED_TEXT)]  # one cancelled=yes
    assert metric(manager, "incoming_handover_failures_total") == 1
    assert upload.notice is None and storage.states[upload.id]["notice"] is None


def test_a_refusal_fails_at_once() -> None:
    manager, clock, storage, handover = away_manager(answer="fail")
    upload, transport = completed(manager)
    assert upload.phase is Phase.CANCELLED
    assert len(handover.handovers) == 1 and ("pending",) not in transport.events
    assert handover.notices == [(upload.id, HANDOVER_FAILED_TEXT)]


def test_finish_upload_while_the_handover_is_retried_finishes_at_once() -> None:
    manager, clock, storage, handover = away_manager()
    upload, transport = completed(manager)
    elapse(clock, 0.25)  # a second attempt failed too
    upload.life.finish_upload("verdict")  # the backend had it, and says so
    assert upload.phase is Phase.FINISHED and upload.result == "verdict"
    assert manager.running == set()  # no attempt waits to be made
    elapse(clock, DAY)
    assert len(handover.handovers) == 2


def test_finish_upload_racing_the_first_attempt_then_a_failure_finishes() -> None:
    manager, clock, storage, handover = away_manager(answer="away")
    handover.hold = True
    upload, transport = completed(manager)
    upload.life.finish_upload("v")  # the race of SPEC's finish_upload: an answer is coming
    assert upload.phase is Phase.FINISH_REQUESTED
    handover.answer("away")  # ... but it is a 503 after all: the backend confirmed anyway
    assert upload.phase is Phase.FINISHED and upload.result == "v"
    assert len(handover.handovers) == 1


def test_finish_upload_racing_an_attempt_that_never_answers_finishes_at_the_timeout() -> None:
    manager, clock, storage, handover = away_manager(answer="done")
    handover.hold = True
    upload, transport = completed(manager)
    upload.life.finish_upload("v")
    elapse(clock, 54)
    assert upload.phase is Phase.FINISH_REQUESTED
    elapse(clock, 1)
    assert upload.phase is Phase.FINISHED and upload.result == "v"
    handover.answer("done")  # late: ignored
    assert upload.result == "v"


@pytest.mark.parametrize("later", [0.0, 60.0])
def test_cancels_during_retries_are_too_late(later: float) -> None:
    manager, clock, storage, handover = away_manager()
    upload, transport = completed(manager)
    elapse(clock, later)
    for cancel in (upload.life.cancel_by_backend, lambda: upload.life.cancel_by_client("x")):
        with pytest.raises(UploadError) as refused:
            cancel()
        assert refused.value.code is ErrorCode.TOO_LATE
    assert upload.phase is Phase.HANDOVER


def test_a_client_back_during_a_pending_handover_hears_it_is_pending() -> None:
    manager, clock, storage, handover = away_manager()
    upload, transport = completed(manager)
    elapse(clock, 55)
    upload.life.disconnect(transport, Departure.DONE)
    again = RecordingTransport()
    ensureDeferred(manager.connect(upload.id, again, 3, "n"))
    upload.life.ready()  # after MsgUploadConf (FilePos = LengthBytes)
    assert again.events == [("pending",)]


def test_a_restart_continues_the_retry_time_of_the_first_attempt() -> None:
    storage = MemoryStorage()
    manager, clock, _, handover = away_manager(storage=storage)
    clock.advance(100_000)
    old, _ = completed(manager)
    fresh, _ = completed(manager)
    old_record = {**storage.states[old.id], "handover_began": 100_000 - DAY + 400, "late": True}
    storage.states[old.id] = old_record
    again, clock, _, handover = away_manager(storage=storage)
    clock.advance(100_000)
    again.restore()
    assert again.lookup(old.id).late and not again.lookup(fresh.id).late
    elapse(clock, 399)
    assert again.lookup(old.id).phase is Phase.HANDOVER
    elapse(clock, 1)  # its day is over: 400 s after the restart, not a day
    assert again.lookup(old.id).phase is Phase.CANCELLED
    assert again.lookup(fresh.id).phase is Phase.HANDOVER
    elapse(clock, 6000)
    assert again.lookup(fresh.id).phase is Phase.HANDOVER
    assert again.lookup(fresh.id).handover_began == 100_000  # as saved before the restart


def test_cancel_notices_are_retried_and_keep_the_ticket_until_heard() -> None:
    manager, clock, storage, handover = away_manager(answer="done")
    handover.notices_away = 10  # 0, 0.25 ... 127.75 s: heard at 255.75 s
    upload: Upload = ensureDeferred(manager.create("http://b/h", "", True)).result
    transport = RecordingTransport()
    ensureDeferred(manager.connect(upload.id, transport, 10, "n"))
    upload.life.cancel_by_client("changed my mind")
    assert storage.states[upload.id]["notice"] == "changed my mind"
    elapse(clock, 250)  # past the idle time (100 s): kept, the backend not told yet
    assert manager.get(upload.id) is upload and upload.id in storage.states
    assert handover.notices == []
    elapse(clock, 10)
    assert handover.notices == [(upload.id, "changed my mind")]
    assert handover.notice_attempts == 11
    assert storage.states[upload.id]["notice"] is None
    assert metric(manager, "incoming_handover_retries_total", post="cancel_notice") == 10
    elapse(clock, 100)  # then forgotten as before
    assert manager.get(upload.id) is None and upload.id not in storage.states


def test_a_cancel_notice_owed_at_a_restart_is_sent_then() -> None:
    manager, clock, storage, handover = away_manager(answer="done")
    handover.notices_away = 1000
    upload: Upload = ensureDeferred(manager.create("http://b/h", "", True)).result
    ensureDeferred(manager.connect(upload.id, RecordingTransport(), 10, "n"))
    upload.life.cancel_by_client("why")
    ensureDeferred(manager.shutdown())
    assert storage.states[upload.id]["notice"] == "why"
    again, clock, _, handover = away_manager(answer="done", storage=storage)
    again.restore()
    assert handover.notices == [(upload.id, "why")]
    assert storage.states[upload.id]["notice"] is None


def test_a_notice_never_heard_is_given_up_at_the_end_of_the_retry_time(
    server_log: list[str],
) -> None:
    manager, clock, storage, handover = away_manager(retry_for=600, answer="done")
    handover.notices_away = 10_000
    upload: Upload = ensureDeferred(manager.create("http://b/h", "", True)).result
    ensureDeferred(manager.connect(upload.id, RecordingTransport(), 10, "n"))
    upload.life.cancel_by_client("why")
    elapse(clock, 600)
    assert upload.notice is None and handover.notices == []
    assert handover.notice_attempts == 13
    assert any("backend not told of the cancellation" in line for line in server_log)
    elapse(clock, 100)
    assert manager.get(upload.id) is None


def test_shutdown_ends_the_retries_and_keeps_the_handover_for_the_next_start() -> None:
    manager, clock, storage, handover = away_manager()
    upload, transport = completed(manager)
    elapse(clock, 60)
    assert manager.running
    ensureDeferred(manager.shutdown())
    assert manager.running == set()
    record = storage.states[upload.id]
    assert (record["phase"], record["handover_began"], record["late"]) == ("handover", 0, True)
    elapse(clock, DAY)
    assert len(handover.handovers) == 8  # by 60 s: none after the shutdown


# Over loopback, minutes passing on a task.Clock


class WatchedRetrier(Retrier):
    """A Retrier whose waits a test can see coming (and then let pass on the clock)."""

    def __init__(self, clock: Clock, retry_for: float, metrics: Metrics) -> None:
        super().__init__(clock, retry_for, metrics, jitter=lambda: 0.0)
        self.waits: DeferredQueue[float] = DeferredQueue()

    def sleep(self, seconds: float) -> Deferred[None]:
        d = super().sleep(seconds)
        self.waits.put(seconds)
        return d


async def fake_clock_server(config: Config, clock: Clock) -> tuple[Any, WatchedRetrier]:
    context = serving(config, clock=clock)
    server = await context.__aenter__()
    retrier = WatchedRetrier(clock, config.handover_retry, server.manager.metrics)
    server.manager.retrier = retrier
    return (context, server), retrier


async def let_time_pass(
    clock: Clock,
    retrier: WatchedRetrier,
    until: float,
    then: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Let the waits between attempts pass on the clock, until the next attempt would be at
    `until` or later; `then()` just before that one."""
    while True:
        delay = await soon(retrier.waits.get())
        if clock.seconds() + delay >= until:
            if then is not None:
                await then()
            clock.advance(delay)
            return
        clock.advance(delay)


def retries(server: Server, post: str) -> float:
    value = server.manager.metrics.registry.get_sample_value(
        "incoming_handover_retries_total", {"post": post}
    )
    assert value is not None
    return value


@pytest_twisted.ensureDeferred
async def test_a_backend_answering_500_for_70_s_then_done(config: Config, backend: Backend) -> None:
    clock = Clock()
    (context, server), retrier = await fake_clock_server(config, clock)
    try:
        backend.status, backend.answer = 500, b"oops"
        data = os.urandom(3 * CHUNK + 5)
        ticket, client, _ = await acked_upload(
            server, backend.url, len(data), removeFileWhenFinished="false"
        )
        await send_all(client, data, CHUNK, SEND_AHEAD)
        await let_time_pass(clock, retrier, 5)  # HandoverTimeoutS in the tests' config
        clock.advance(0)
        assert await soon(client.expect("MsgAllDone")) == {"Success": True, "Pending": True}
        assert await soon(client.next()) is None  # the server hangs up, as after MsgAllDone
        head = await treq.head(f"{server.base}/tus/{ticket}", headers=TUS)
        assert head.code == 200
        assert head.headers.getRawHeaders("incoming-handover") == ["pending"]
        assert head.headers.getRawHeaders("upload-offset") == [str(len(data))]
        assert head.headers.getRawHeaders("incoming-result") is None
        late, conf = await upload_request(server, ticket, len(data))  # a client comes back
        assert conf["FilePos"] == len(data)
        late.send("MsgAck", Ack=True)
        assert await soon(late.expect("MsgAllDone")) == {"Success": True, "Pending": True}

        async def back() -> None:
            backend.status, backend.answer = 200, b"done\nthe verdict"

        await let_time_pass(clock, retrier, 70, back)
        await server.settled()
        posts = [backend.posts.pending.pop(0) for _ in range(len(backend.posts.pending))]
        assert len(posts) == retries(server, "handover") + 1 == 10  # 0 s, 0.25 s... 127.75 s
        assert {(p["id"], p["cancelled"], p["sha256"]) for p in posts} == {
            (ticket, "no", sha256(data))
        }
        assert (server.storage_dir / ticket).read_bytes() == data
        head = await treq.head(f"{server.base}/tus/{ticket}", headers=TUS)
        assert head.headers.getRawHeaders("incoming-result") == ["the%20verdict"]
        assert head.headers.getRawHeaders("incoming-handover") is None
        again, _ = await upload_request_error(server, ticket, len(data))
        assert (again["ErrorCode"], again["Result"]) == (ErrorCode.TICKET_FINISHED, "the verdict")
    finally:
        await context.__aexit__(None, None, None)


async def upload_request_error(server: Server, ticket: str, length: int) -> tuple[Any, Any]:
    client = await connect(server.ws_url())
    client.send("MsgUploadReq", Id=ticket, LengthBytes=length, Name="f.bin")
    return await client.expect("MsgError"), client


@pytest_twisted.ensureDeferred
async def test_a_backend_not_listening_for_70_s_over_tus(config: Config) -> None:
    clock = Clock()
    (context, server), retrier = await fake_clock_server(config, clock)
    backend = Backend(answer=b"done\n{}")
    port = await start_backend(backend)
    await port.stopListening()  # its port is known, and nobody listens there
    try:
        data = os.urandom(2 * CHUNK + 1)
        ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
        encoded = base64.b64encode(ticket.encode()).decode()
        created = await treq.post(
            f"{server.base}/tus/",
            headers={
                **TUS,
                "Upload-Length": str(len(data)),
                "Upload-Metadata": f"ticket {encoded}",
            },
        )
        assert created.code == 201
        patch = treq.request(
            "PATCH", f"{server.base}/tus/{ticket}", data=data,
            headers={**TUS, "Content-Type": "application/offset+octet-stream",
                     "Upload-Offset": "0"},
        )  # fmt: skip
        await let_time_pass(clock, retrier, 5)
        clock.advance(0)
        answer = await soon(patch)  # the final PATCH: stored, and the handover pending
        assert answer.code == 204
        assert answer.headers.getRawHeaders("incoming-handover") == ["pending"]
        assert answer.headers.getRawHeaders("upload-offset") == [str(len(data))]

        async def back() -> None:
            nonlocal port
            port = await start_backend(backend)

        await let_time_pass(clock, retrier, 70, back)
        await server.settled()
        [post] = backend.posts.pending
        assert (post["id"], post["sha256"]) == (ticket, sha256(data))
        assert (server.storage_dir / ticket).read_bytes() == data
        head = await treq.head(f"{server.base}/tus/{ticket}", headers=TUS)
        assert head.headers.getRawHeaders("incoming-result") == ["%7B%7D"]
        assert head.headers.getRawHeaders("incoming-handover") is None
        assert head.headers.getRawHeaders("upload-expires") is None  # finished
    finally:
        await context.__aexit__(None, None, None)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_retry_time_spent_cancels_then_the_notice_waits_for_the_backend(
    config: Config, backend: Backend
) -> None:
    clock = Clock()
    config = dataclasses.replace(config, handover_retry=600.0)
    (context, server), retrier = await fake_clock_server(config, clock)
    try:
        backend.status = 503
        data = os.urandom(CHUNK)
        ticket, client, _ = await acked_upload(server, backend.url, len(data))
        await send_all(client, data, CHUNK, SEND_AHEAD)
        await let_time_pass(clock, retrier, 600)  # the last attempt fails the handover
        notice = await backend.posts.get()
        while notice["cancelled"] == "no":
            notice = await backend.posts.get()
        assert notice["cancelReason"] == HANDOVER_FAILED_TEXT
        assert not (server.storage_dir / ticket).exists()  # deleted, as before
        head = await treq.head(f"{server.base}/tus/{ticket}", headers=TUS)
        assert head.code == 410
        error, _ = await upload_request_error(server, ticket, len(data))
        assert error["ErrorCode"] == ErrorCode.TICKET_CANCELLED
        state = json.loads((server.storage_dir / f"{ticket}.json").read_text())
        assert state["notice"] == HANDOVER_FAILED_TEXT  # owed, and kept for a restart

        async def back() -> None:
            backend.status = 200

        await let_time_pass(clock, retrier, clock.seconds() + 70, back)
        await server.settled()
        notices = [notice, *(p for p in backend.posts.pending if p["cancelled"] == "yes")]
        assert len(notices) == retries(server, "cancel_notice") + 1 > 5  # all 503 but the last
        state = json.loads((server.storage_dir / f"{ticket}.json").read_text())
        assert state["notice"] is None
    finally:
        await context.__aexit__(None, None, None)


@pytest.mark.parametrize("answer", [(400, b"done"), (200, b"nope"), (403, b"")])
@pytest_twisted.ensureDeferred
async def test_a_refusal_fails_the_handover_at_once(
    server: Server, backend: Backend, answer: tuple[int, bytes]
) -> None:
    backend.status, backend.answer = answer
    backend.notice = (200, b"ok")
    ticket, client, _ = await acked_upload(server, backend.url, 3)
    client.send_chunk(b"abc")
    await client.expect("MsgChunkAck")
    await client.expect_error(ErrorCode.HANDOVER_FAILED)
    await server.settled()
    handover, notice = backend.posts.pending
    assert (handover["cancelled"], notice["cancelled"]) == ("no", "yes")
    assert server.files() == {}


# Real processes: twistd stopped or killed while its backend is away


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
@pytest_twisted.ensureDeferred
async def test_a_backend_down_across_a_server_restart(
    tmp_path: Path, stopper: list[Any], stop: int
) -> None:
    storage = tmp_path / "s"
    backend = Backend(answer=b"done\nok")
    backend.port = free_port()  # nobody listens there yet
    options = ("--handover-timeout", "1")
    daemon, process, server = await start_daemon(storage, tmp_path, stopper, *options)
    data = os.urandom(5 * CHUNK + 3)
    ticket, client, _ = await acked_upload(
        server, backend.url, len(data), removeFileWhenFinished="false"
    )
    await send_all(client, data, CHUNK, SEND_AHEAD)
    assert await soon(client.expect("MsgAllDone")) == {"Success": True, "Pending": True}
    await daemon.logged(rb"handover: cannot reach backend: \w+; retrying for up to 24 h")
    began = json.loads((storage / f"{ticket}.json").read_text())["handover_began"]
    head = await treq.head(f"{server.base}/tus/{ticket}", headers=TUS)
    assert head.headers.getRawHeaders("incoming-handover") == ["pending"]
    if stop == signal.SIGTERM:
        await stop_daemon(daemon, process)
    else:
        await daemon.kill(process)

    daemon, process, server = await start_daemon(storage, tmp_path, stopper, *options)
    await daemon.logged(rb"restored: being handed over again")
    await daemon.logged(rb"retrying for up to 24 h")  # still away after the restart
    head = await treq.head(f"{server.base}/tus/{ticket}", headers=TUS)
    assert head.headers.getRawHeaders("incoming-handover") == ["pending"]
    finished = daemon.logged(rb"handed over and finished")
    port = await start_backend(backend)  # the backend comes up
    try:
        post = await backend.posts.get()
        await finished
        assert (post["id"], post["cancelled"], post["sha256"]) == (ticket, "no", sha256(data))
        assert backend.posts.pending == []  # one handover
        assert (storage / ticket).read_bytes() == data
        assert json.loads((storage / f"{ticket}.json").read_text())["handover_began"] == began
        head = await treq.head(f"{server.base}/tus/{ticket}", headers=TUS)
        assert head.headers.getRawHeaders("incoming-result") == ["ok"]
        assert head.headers.getRawHeaders("incoming-handover") is None
        await stop_daemon(daemon, process)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_another_instance_continues_the_retry_time_of_a_dead_one(
    tmp_path: Path, redis: Redis, backend: Backend, stopper: list[Any]
) -> None:
    shared = tmp_path / "shared"
    options = ("--redis", redis.url, "--ws-timeout", "3", "--handover-retry", "2")
    daemon_a, process_a, a = await start_daemon(shared, tmp_path, stopper, *options)
    daemon_b, process_b, b = await start_daemon(shared, tmp_path, stopper, *options)
    data = os.urandom(2 * CHUNK)
    ticket, client, _ = await acked_upload(a, backend.url, len(data))
    backend.hold = True
    backend.notice = (200, b"ok")
    await send_all(client, data, CHUNK, SEND_AHEAD)
    await backend.posts.get()  # A's handover, which hangs
    await daemon_a.kill(process_a)
    backend.hold, backend.status = False, 503  # away, for good
    backend.release()  # (A is gone: nobody reads that answer)
    # B takes the handover up once A's lease ran out (3 s): more than the 2 s of retries
    # that A began, so B makes one attempt, and fails the handover: cancelled as before.
    taken = await backend.posts.get()
    assert (taken["id"], taken["cancelled"]) == (ticket, "no")
    notice = await backend.posts.get()
    assert (notice["id"], notice["cancelled"]) == (ticket, "yes")
    assert backend.posts.pending == []
    error, _ = await upload_request_error(b, ticket, len(data))
    assert error["ErrorCode"] == ErrorCode.TICKET_CANCELLED
    await stop_daemon(daemon_b, process_b)


@pytest_twisted.ensureDeferred
async def test_a_pending_handover_as_seen_from_another_instance(
    tmp_path: Path, redis: Redis, backend: Backend, stopper: list[Any]
) -> None:
    shared = tmp_path / "shared"
    options = ("--redis", redis.url, "--ws-timeout", "3", "--handover-timeout", "1")
    daemon_a, process_a, a = await start_daemon(shared, tmp_path, stopper, *options)
    daemon_b, process_b, b = await start_daemon(shared, tmp_path, stopper, *options)
    backend.status, backend.answer = 503, b"deploying"
    data = os.urandom(2 * CHUNK + 7)
    ticket, client, _ = await acked_upload(
        a, backend.url, len(data), removeFileWhenFinished="false"
    )
    await send_all(client, data, CHUNK, SEND_AHEAD)
    assert await soon(client.expect("MsgAllDone")) == {"Success": True, "Pending": True}
    # A retries; a client that comes back on B hears the same, not "already connected"
    again, conf = await upload_request(b, ticket, len(data))
    assert conf["FilePos"] == len(data)
    again.send("MsgAck", Ack=True)
    assert await soon(again.expect("MsgAllDone")) == {"Success": True, "Pending": True}
    head = await treq.head(f"{b.base}/tus/{ticket}", headers=TUS)
    assert head.headers.getRawHeaders("incoming-handover") == ["pending"]
    finished = daemon_a.logged(rb"handed over and finished")
    backend.status, backend.answer = 200, b"done\nok"
    await soon(finished)
    head = await treq.head(f"{a.base}/tus/{ticket}", headers=TUS)
    assert head.headers.getRawHeaders("incoming-result") == ["ok"]
    assert head.headers.getRawHeaders("incoming-handover") is None
    posts = list(backend.posts.pending)
    assert {(p["id"], p["cancelled"], p["sha256"]) for p in posts} == {(ticket, "no", sha256(data))}
    assert (shared / ticket).read_bytes() == data
    for daemon, process in ((daemon_a, process_a), (daemon_b, process_b)):
        await stop_daemon(daemon, process)
