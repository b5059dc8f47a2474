"""The handover POST: answers, retries, timeouts and failures (SPEC: Handover)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
import pytest_twisted
from treq.testing import HasHeaders, RequestSequence, StringStubbingResource, StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, DNSLookupError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from incoming.errors import ErrorCode
from incoming.handover import (
    MAX_RETRY_DELAY,
    BackendAway,
    HandoverClient,
    HandoverFailed,
    Retrier,
    retry_delay,
)
from incoming.metrics import Metrics
from incoming.upload import HANDOVER_FAILED_TEXT, Upload

from .harness import Backend, Server, upload_request, upload_small

HOLD = object()  # never answer
STALL = object()  # answer 200 and send part of the body, never the rest


class BackendStub(Resource):
    """A backend behind StubTreq: records each POST's form and gives the next answer."""

    isLeaf = True

    def __init__(self, *answers: Any) -> None:
        super().__init__()
        self.answers = list(answers)
        self.posts: list[dict[str, str]] = []
        self.headers: dict[str, str] = {}  # on every answer

    def render_POST(self, request: Any) -> bytes | int:
        self.posts.append({k: v for k, v in parse_qsl(request.content.read().decode(), True)})
        answer = self.answers.pop(0)
        if answer is HOLD:
            return NOT_DONE_YET
        if answer is STALL:
            request.setHeader("content-length", "4")
            request.write(b"do")
            return NOT_DONE_YET
        status, body = answer
        request.setResponseCode(status)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return bytes(body)


class Unreachable:
    """The first POSTs fail at the connection (with `errors`); then `http` answers."""

    def __init__(self, http: Any, *errors: Exception) -> None:
        self.http = http
        self.errors = list(errors)
        self.failed: list[Exception] = []

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]:
        if self.errors:
            self.failed.append(self.errors.pop(0))
            return fail(self.failed[-1])
        result: Deferred[Any] = self.http.post(url, **kwargs)
        return result


def an_upload() -> Upload:
    upload = Upload("0b5a6fcd-7f5b-4f5e-9bb0-4de4b1fd5c39", "http://b.example/h", "sec", True)
    upload.browser_name = "photo.jpg"
    return upload


def client(http: Any, clock: Clock, timeout: float = 55) -> HandoverClient:
    return HandoverClient(http, clock, timeout, Metrics())


def hand_over(handover: HandoverClient, stub: StubTreq | None = None) -> Deferred[str]:
    """One POST: the answer's kind (`done` or `wait`)."""
    d = ensureDeferred(handover.hand_over(an_upload(), "/store/file", None))
    d.addCallback(lambda answer: answer.kind)
    if stub is not None:
        stub.flush()
    return d


def retried(
    handover: HandoverClient, clock: Clock, retry_for: float = 86400, jitter: float = 0.0
) -> Deferred[str]:
    """POSTs until an answer (or the end of `retry_for`): the answer's kind."""
    retrier = Retrier(clock, retry_for, Metrics(), jitter=lambda: jitter)
    upload = an_upload()

    async def post() -> Any:
        return await handover.hand_over(upload, "/store/file", None)

    d = ensureDeferred(retrier.run(upload.id, "handover", post, clock.seconds(), lambda: True))
    d.addCallback(lambda answer: answer.kind)
    return d


def failure_of(d: Deferred[Any]) -> Failure:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "no failure yet"
    return failures[0]


def test_the_handover_posts_the_six_fields_and_the_size() -> None:
    upload = an_upload()
    upload.signal_finish_url = "http://b.example/h?app=42"
    fields = {
        "id": upload.id,
        "filename": "/store/file",
        "filenameFromBrowser": "photo.jpg",
        "backendSecret": "sec",
        "cancelled": "no",
        "cancelReason": "",
        "size": "0",
        "sha256": "ab" * 32,
    }
    params = {b"app": [b"42"], **{k.encode(): [v.encode()] for k, v in fields.items()}}
    headers = HasHeaders({b"user-agent": [b"Incoming!!"]})
    expected = (b"post", "http://b.example/h", params, headers, urlencode(fields).encode())
    failures: list[str] = []
    sequence = RequestSequence([(expected, (200, {}, b"done\n"))], failures.append)
    stub = StubTreq(StringStubbingResource(sequence))
    with sequence.consume(pytest.fail):
        d = ensureDeferred(client(stub, Clock()).hand_over(upload, "/store/file", "ab" * 32))
        d.addCallback(lambda answer: answer.kind)
        stub.flush()
        assert d.result == "done"
    assert failures == []


def test_connection_errors_and_5xx_are_retried_with_backoff() -> None:
    clock = Clock()
    backend = BackendStub((503, b"busy"), (200, b"done\n"))
    stub = StubTreq(backend)
    http = Unreachable(stub, ConnectionRefusedError())
    d = retried(client(http, clock), clock)
    assert len(http.failed) == 1 and not d.called
    clock.advance(0.25)
    stub.flush()
    assert len(backend.posts) == 1 and not d.called  # 503
    clock.advance(0.4)
    stub.flush()
    assert len(backend.posts) == 1  # the delay doubled to 0.5 s
    clock.advance(0.1)
    stub.flush()
    assert d.result == "done"


def test_429_and_5xx_answers_and_connection_errors_are_the_backend_away() -> None:
    for status in (429, 500, 502, 503, 504, 599):
        stub = StubTreq(BackendStub((status, b"x")))
        failure = failure_of(hand_over(client(stub, Clock()), stub))
        assert failure.check(BackendAway) and f"HTTP {status}" in str(failure.value)
    unreachable = Unreachable(None, ConnectionRefusedError())
    failure = failure_of(hand_over(client(unreachable, Clock())))
    assert failure.check(BackendAway) and "cannot reach backend" in str(failure.value)


def test_delays_double_with_jitter_up_to_five_minutes() -> None:
    assert [retry_delay(n, None, 0.0) for n in range(1, 13)] == [
        0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300,
    ]  # fmt: skip
    assert retry_delay(1, None, 1.0) == 0.125  # up to half is left out, at random
    assert retry_delay(10_000, None, 0.5) == 225
    assert retry_delay(1, 120, 0.0) == 120  # the backend's Retry-After, within the cap
    assert retry_delay(1, 3600, 0.0) == MAX_RETRY_DELAY == 300
    assert retry_delay(12, 5, 0.0) == 300  # never less than the backoff


@pytest.mark.parametrize(
    "status, retry_after, expected",
    [
        (503, "120", 120.0),
        (429, "7", 7.0),
        (429, "Sun, 06 Nov 1994 08:51:40 GMT", 100.0),  # a date: the clock is at 08:50:00
        (503, "soon", None),
        (503, "", None),
        (500, "120", None),  # only 429 and 503 carry one
    ],
)
def test_retry_after_is_read_from_429_and_503(
    status: int, retry_after: str, expected: float | None
) -> None:
    clock = Clock()
    clock.advance(784111800.0)  # 1994-11-06 08:50:00 UTC
    stub = StubTreq(RetryAfterStub(status, retry_after))
    failure = failure_of(hand_over(client(stub, clock), stub))
    assert failure.check(BackendAway)
    assert failure.value.retry_after == expected


class RetryAfterStub(Resource):
    isLeaf = True

    def __init__(self, status: int, retry_after: str) -> None:
        super().__init__()
        self.status, self.retry_after = status, retry_after

    def render_POST(self, request: Any) -> bytes:
        request.setResponseCode(self.status)
        request.setHeader("retry-after", self.retry_after)
        return b"later"


def test_retry_after_is_honoured() -> None:
    clock = Clock()
    backend = BackendStub((503, b"busy"), (200, b"done"))
    backend.headers = {"retry-after": "120"}
    stub = StubTreq(backend)
    d = retried(client(stub, clock), clock)
    stub.flush()
    clock.advance(119)
    stub.flush()
    assert len(backend.posts) == 1 and not d.called
    clock.advance(1)
    stub.flush()
    assert d.result == "done"


def test_retries_stop_once_the_retry_time_is_spent() -> None:
    clock = Clock()
    http = Unreachable(None, *[ConnectionRefusedError()] * 1000)
    d = retried(client(http, clock), clock, retry_for=600)
    for _ in range(599):
        clock.advance(1)
    assert not d.called
    clock.advance(1)  # the last attempt is made at the end of the 600 s
    failure = failure_of(d)
    assert failure.check(BackendAway)
    assert "cannot reach backend" in str(failure.value)
    assert "given up after 13 attempts in 10 min" in str(failure.value)
    assert len(http.failed) == 13  # 0.25 s doubling to 300 s, then the end


def test_an_attempt_without_answer_ends_at_the_handover_timeout_and_is_retried() -> None:
    clock = Clock()
    backend = BackendStub(HOLD, (200, b"done"))
    stub = StubTreq(backend)
    d = retried(client(stub, clock), clock)
    stub.flush()
    clock.advance(54.9)
    assert not d.called and len(backend.posts) == 1
    clock.advance(0.1)  # no answer within 55 s: a timeout, tried again after 0.25 s
    clock.advance(0.25)
    stub.flush()
    assert d.result == "done" and len(backend.posts) == 2


def test_a_backend_that_never_answers_is_away_at_the_timeout() -> None:
    clock = Clock()
    stub = StubTreq(BackendStub(HOLD))
    d = hand_over(client(stub, clock), stub)
    clock.advance(54)
    assert not d.called
    clock.advance(1)
    failure = failure_of(d)
    assert failure.check(BackendAway)
    assert "no answer within 55 s" in str(failure.value)


def test_the_answer_and_its_body_share_one_deadline() -> None:
    clock = Clock()
    backend = BackendStub(STALL)
    stub = StubTreq(backend)
    d = ensureDeferred(client(stub, clock).hand_over(an_upload(), "/store/file", None))
    clock.advance(50)
    stub.flush()  # the status line comes late; the body stalls after two bytes
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.1)  # 55 s after the POST started, not 55 s after the headers
    assert failure_of(d).check(BackendAway)


@pytest.mark.parametrize(
    "answer, message",
    [
        ((200, b""), "not done or wait"),
        ((200, b"don"), "not done or wait"),
        ((200, b"OK"), "not done or wait"),
        ((404, b"done"), "HTTP 404"),
        ((400, b"done"), "HTTP 400"),
        ((302, b"done"), "HTTP 302"),
        ((200, b"nope"), "not done or wait"),
    ],
)
def test_other_answers_fail_without_retry(answer: tuple[int, bytes], message: str) -> None:
    backend = BackendStub(answer)
    stub = StubTreq(backend)
    clock = Clock()
    d = retried(client(stub, clock), clock)
    stub.flush()
    clock.advance(3600)
    failure = failure_of(d)
    assert failure.check(HandoverFailed) and message in str(failure.value)
    assert len(backend.posts) == 1


@pytest.mark.parametrize("answer", [b"done", b"wait", b"done and then some", b"wait\r\n"])
def test_answers_starting_with_done_or_wait(answer: bytes) -> None:
    stub = StubTreq(BackendStub((200, answer)))
    assert hand_over(client(stub, Clock()), stub).result == answer[:4].decode()


@pytest.mark.parametrize("first_line", [b"done", b"done ok", b"done\r", b"done " + b"x" * 4000])
def test_a_verdict_of_4_kib_arrives_whole_and_one_byte_more_fails(first_line: bytes) -> None:
    """Whatever follows `done` on its line (SPEC: at most 4 KiB; more is a failed handover)."""
    verdict = "é" * 2048  # 4096 bytes of UTF-8
    stub = StubTreq(BackendStub((200, first_line + b"\n" + verdict.encode())))
    d = ensureDeferred(client(stub, Clock()).hand_over(an_upload(), "/store/file", None))
    stub.flush()
    assert d.result.result == verdict
    stub = StubTreq(BackendStub((200, first_line + b"\n" + verdict.encode() + b"!")))
    d = ensureDeferred(client(stub, Clock()).hand_over(an_upload(), "/store/file", None))
    stub.flush()
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures[0].check(HandoverFailed) and "longer than 4096 bytes" in str(failures[0].value)


def test_a_first_line_past_4_kib_fails_the_handover() -> None:
    stub = StubTreq(BackendStub((200, b"done" + b" " * 5000 + b"\nverdict")))
    d = ensureDeferred(client(stub, Clock()).hand_over(an_upload(), "/store/file", None))
    stub.flush()
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures[0].check(HandoverFailed)


@pytest.mark.parametrize("answer", [(200, b"ok"), (200, b""), (400, b"who?"), (404, b"")])
def test_a_cancel_notice_is_delivered_by_any_answer_but_429_and_5xx(
    answer: tuple[int, bytes],
) -> None:
    backend = BackendStub(answer)
    stub = StubTreq(backend)
    d = ensureDeferred(client(stub, Clock()).notify_cancelled(an_upload(), "why"))
    stub.flush()
    assert d.called and d.result is None
    [notice] = backend.posts
    assert (notice["cancelled"], notice["cancelReason"], notice["filename"]) == ("yes", "why", "")


def test_a_cancel_notice_meets_the_backend_away() -> None:
    for answer in [(500, b"oops"), (429, b"slow down"), (503, b"")]:
        stub = StubTreq(BackendStub(answer))
        d = ensureDeferred(client(stub, Clock()).notify_cancelled(an_upload(), "why"))
        stub.flush()
        assert failure_of(d).check(BackendAway)
    unreachable = Unreachable(None, ConnectionRefusedError())
    d = ensureDeferred(client(unreachable, Clock()).notify_cancelled(an_upload(), "why"))
    assert failure_of(d).check(BackendAway)


@pytest.mark.parametrize(
    "error",
    [
        RequestTransmissionFailed([Failure(ConnectionLost())]),  # a stale keep-alive connection
        ResponseNeverReceived([Failure(ConnectionLost())]),
        DNSLookupError("nope.invalid"),
    ],
)
def test_posts_that_got_no_answer_are_retried(error: Exception) -> None:
    clock = Clock()
    stub = StubTreq(BackendStub((200, b"done")))
    http = Unreachable(stub, error)
    d = retried(client(http, clock), clock)
    clock.advance(0.25)
    stub.flush()
    assert d.result == "done"
    assert len(http.failed) == 1


def test_a_body_broken_midway_is_not_retried() -> None:
    clock = Clock()
    http = Unreachable(None, ResponseFailed([Failure(ConnectionLost())]))
    d = retried(client(http, clock), clock)
    assert failure_of(d).check(HandoverFailed)
    assert len(http.failed) == 1


# Against real backends on loopback


class Canned(Protocol):
    """Answers any request with fixed raw bytes, then hangs up."""

    answer = b""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data or self.transport is None:
            self.factory.posts += 1  # type: ignore[attr-defined]
            self.transport.write(self.answer)  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.async_yield_fixture
async def raw_backend() -> AsyncIterator[Any]:
    factory = Factory.forProtocol(Canned)
    factory.posts = 0  # type: ignore[attr-defined]
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    factory.url = f"http://127.0.0.1:{port.getHost().port}/h"  # type: ignore[attr-defined]
    yield factory
    await port.stopListening()


async def upload_and_expect_handover_error(server: Server, url: str, log: list[str]) -> str:
    """The browser gets a fixed text; the server's log says what the backend did."""
    ticket, client = await upload_small(server, url, b"abc", removeFileWhenFinished="false")
    data = await client.expect_error(ErrorCode.HANDOVER_FAILED)
    assert data["Msg"] == HANDOVER_FAILED_TEXT
    await server.settled()
    assert server.files() == {}  # even with removeFileWhenFinished=false
    [line] = [line for line in log if f"upload {ticket} cancelled (handover_failed):" in line]
    return line


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\ndo", "unreadable"),  # short body
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnope\r\n0\r\n\r\n",
            "not done or wait",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\ndone\r\n", "unreadable"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "not done or wait"),
        (b"garbage\r\n\r\n", "unreadable: ResponseFailed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\x00\x01\r\n\r\ndone", "unreadable"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_broken_answers_fail_the_handover_cleanly(
    server: Server, raw_backend: Any, raw: bytes, message: str, server_log: list[str]
) -> None:
    Canned.answer = raw
    text = await upload_and_expect_handover_error(server, raw_backend.url, server_log)
    assert message in text
    assert raw_backend.posts >= 2  # the handover, then the cancellation notice


@pytest_twisted.ensureDeferred
async def test_chunked_done_is_accepted(server: Server, raw_backend: Any) -> None:
    Canned.answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ndone\r\n0\r\n\r\n"
    ticket, client = await upload_small(
        server, raw_backend.url, b"abc", removeFileWhenFinished="false"
    )
    await client.expect("MsgAllDone")
    assert server.files() == {ticket: b"abc"}


@pytest_twisted.ensureDeferred
async def test_garbage_answer_cancels_and_notifies_backend(
    server: Server, backend: Backend, server_log: list[str]
) -> None:
    backend.answer = b"I am a teapot"
    message = await upload_and_expect_handover_error(server, backend.url, server_log)
    assert "not done or wait" in message and "teapot" in message
    handover, notice = await backend.posts.get(), await backend.posts.get()
    assert handover["cancelled"] == "no" and handover["filename"].endswith(handover["id"])
    assert notice["cancelled"] == "yes" and notice["filename"] == ""
    assert notice["cancelReason"] == HANDOVER_FAILED_TEXT


@pytest_twisted.ensureDeferred
async def test_server_error_then_done_is_retried(server: Server, backend: Backend) -> None:
    backend.answers = [(500, b"oops"), (502, b"")]
    ticket, client = await upload_small(server, backend.url, b"z", removeFileWhenFinished="false")
    await client.expect("MsgAllDone")
    posts = [await backend.posts.get() for _ in range(3)]
    assert [p["cancelled"] for p in posts] == ["no", "no", "no"]
    assert server.files() == {ticket: b"z"}


@pytest_twisted.ensureDeferred
async def test_signal_finish_url_query_string_is_kept(server: Server, backend: Backend) -> None:
    ticket = await server.new_upload(backend.url + "?app=42&x=%20y")
    client, _ = await upload_request(server, ticket, 0)
    client.send("MsgAck", Ack=True)
    await client.expect("MsgAllDone")
    post = await backend.posts.get()
    assert post["_query"] == "app=42&x=%20y"
    assert post["id"] == ticket


class AnswerLostOnce(Protocol):
    """The first request is read and the connection dropped (as if the answer
    was lost after the backend acted); later ones are answered `done`."""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data or self.transport is None:
            return
        factory: Any = self.factory  # type: ignore[attr-defined]
        factory.bodies.append(data.partition(b"\r\n\r\n")[2])
        if len(factory.bodies) == 1:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        else:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
            self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_handover_whose_answer_was_lost_is_posted_again(server: Server) -> None:
    """At least once: the backend sees the same `id` twice and answers `done` again."""
    factory = Factory.forProtocol(AnswerLostOnce)
    factory.bodies = []  # type: ignore[attr-defined]
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    url = f"http://127.0.0.1:{port.getHost().port}/h"
    ticket, client = await upload_small(server, url, b"abc", removeFileWhenFinished="false")
    await client.expect("MsgAllDone")
    await port.stopListening()
    bodies = factory.bodies  # type: ignore[attr-defined]
    assert len(bodies) == 2 and bodies[0] == bodies[1]
    assert f"id={ticket}".encode() in bodies[0]
    assert server.files() == {ticket: b"abc"}
