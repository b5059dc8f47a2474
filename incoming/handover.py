"""The POST to the backend's `signalFinishURL`: handovers and cancel notices, and trying
them again while the backend is away (a deploy, a restart: SPEC "When the backend is away").
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, TypeVar

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred
from twisted.internet.error import ConnectError, ConnectionLost, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from .metrics import Metrics
from .upload import Upload

log = Logger()
T = TypeVar("T")

MAX_RESULT_BYTES = 4096  # of a backend's verdict for the page
MAX_LINE_BYTES = 4096  # of the answer's first line: `done` or `wait`, and what follows it
# Enough to tell any answer that breaks these bounds: a line, a newline, a verdict, one more.
MAX_ANSWER_BYTES = MAX_LINE_BYTES + 1 + MAX_RESULT_BYTES + 1
FIRST_RETRY_DELAY = 0.25
MAX_RETRY_DELAY = 300.0  # SPEC's cap, also for a backend's Retry-After
STILL_AWAY_EVERY = 3600.0  # seconds between log lines about a backend that stays away
# Connection failures, timeouts, 429 and 5xx answers are retried. A connection lost after
# the request was sent (ResponseNeverReceived) may hide a backend that took the file and
# whose answer was lost: that is why a handover is delivered *at least* once, and a
# backend must answer `done` again for an `id` it already has (docs/reference/handover.rst).
_RETRYABLE = (
    ConnectError,
    DNSLookupError,
    ConnectionLost,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)


class HandoverFailed(Exception):
    """The backend did not take the file; the message says why."""


class BackendAway(Exception):
    """No answer, or one saying to try later (429, 5xx): worth trying again. `retry_after`:
    the seconds the backend asked for (`Retry-After`), if it did."""

    def __init__(self, why: str, retry_after: float | None = None) -> None:
        super().__init__(why)
        self.retry_after = retry_after


class Stopped(Exception):
    """The POST is no longer wanted (the upload moved on, the server stops)."""


class _EnoughRead(Exception):
    """The answer is longer than we care to read."""


@dataclass(frozen=True)
class Answer:
    """What the backend answered a handover: `done` or `wait`, and for `done` its verdict
    for the page (the text after the first line; empty if none)."""

    kind: str
    result: str = ""


def form_fields(
    upload: Upload,
    filename: str,
    cancel_reason: str | None,
    sha256: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The six fields of SPEC, plus the byte size, when computed the SHA-256, and `extra`
    (an object's bucket, key and store)."""
    fields = {
        "id": upload.id,
        "filename": filename,
        "filenameFromBrowser": upload.browser_name,
        "backendSecret": upload.backend_secret,
        "cancelled": "no" if cancel_reason is None else "yes",
        "cancelReason": cancel_reason or "",
        "size": str(upload.stored),
    }
    if sha256 is not None:
        fields["sha256"] = sha256
    fields.update(extra or {})
    return fields


def parse_answer(body: bytes) -> Answer:
    """`done` or `wait` (anything may follow on their line); after `done`, a line of at
    most MAX_LINE_BYTES and a newline, a verdict of at most MAX_RESULT_BYTES of UTF-8
    text. `body` may be cut to MAX_ANSWER_BYTES. Raises HandoverFailed."""
    first, newline, rest = body.partition(b"\n")
    if body.startswith(b"wait"):
        return Answer("wait")
    if not body.startswith(b"done"):
        raise HandoverFailed(f"backend answered {body[:40]!r}, not done or wait")
    if len(first) > MAX_LINE_BYTES:
        raise HandoverFailed(f"backend's first line is longer than {MAX_LINE_BYTES} bytes")
    if not newline:
        return Answer("done")
    if len(rest) > MAX_RESULT_BYTES:
        raise HandoverFailed(f"backend's verdict is longer than {MAX_RESULT_BYTES} bytes")
    try:
        return Answer("done", rest.decode("utf-8"))
    except UnicodeDecodeError:
        raise HandoverFailed("backend's verdict is not UTF-8 text") from None


class Handover(Protocol):
    """Tells backends about their uploads: one POST per call."""

    async def hand_over(
        self,
        upload: Upload,
        filename: str,
        sha256: str | None,
        extra: Mapping[str, str] | None = None,
    ) -> Answer:
        """The backend's answer, `done` or `wait`; HandoverFailed if it refused the file,
        BackendAway if it did not answer (or said to try later). `extra`: more fields
        (an object's bucket, key and store)."""

    async def notify_cancelled(self, upload: Upload, reason: str) -> None:
        """Announce a cancellation (any answer will do but 429 and 5xx); BackendAway if
        the backend did not hear it."""


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" and "Stopping factory" lines per handover


def http_client(reactor: Any) -> HTTPClient:
    """A fresh connection per handover (backends often drop idle keep-alives), and no
    log lines of Twisted's for each."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    pool._factory = _QuietFactory
    return HTTPClient(Agent(reactor, pool=pool))


class HandoverClient:
    """Handover over HTTP (treq): each POST and its answer within `timeout` seconds."""

    def __init__(
        self, http: HTTPClient, clock: IReactorTime, timeout: float, metrics: Metrics
    ) -> None:
        self._http = http
        self._clock = clock
        self.timeout = timeout
        self.metrics = metrics

    async def hand_over(
        self,
        upload: Upload,
        filename: str,
        sha256: str | None,
        extra: Mapping[str, str] | None = None,
    ) -> Answer:
        """One POST: `done` or `wait`, HandoverFailed, or BackendAway."""
        self.metrics.handover_attempts.inc()
        deadline = self._clock.seconds() + self.timeout
        try:
            fields = form_fields(upload, filename, None, sha256, extra)
            response = await self._post(upload, fields, deadline)
            if response.code != 200:
                raise HandoverFailed(f"backend answered HTTP {response.code}")
            body = await self._read_answer(response, deadline - self._clock.seconds())
        except (HandoverFailed, BackendAway):
            raise
        except (TimeoutError, *_RETRYABLE) as e:
            raise self._away(e, deadline) from None
        # Anything else the backend can make happen (bad chunking, a short body,
        # a broken connection mid-body) fails the handover, never the server.
        except Exception as e:
            raise HandoverFailed(f"backend answer unreadable: {e.__class__.__name__}") from None
        return parse_answer(body)

    async def notify_cancelled(self, upload: Upload, reason: str) -> None:
        """One POST telling the backend the upload was cancelled; its answer is ignored
        but for 429 and 5xx (BackendAway, as when none comes)."""
        deadline = self._clock.seconds() + self.timeout
        try:
            response = await self._post(upload, form_fields(upload, "", reason), deadline)
        except BackendAway:
            raise
        except (TimeoutError, *_RETRYABLE) as e:
            raise self._away(e, deadline) from None
        except Exception as e:  # an answer, if not a readable one: the backend is there
            log.info("upload {id}: cancel notice answered unreadably: {e!r}", id=upload.id, e=e)
            return
        with contextlib.suppress(Exception):  # read, so that the connection is let go
            await self._read_answer(response, deadline - self._clock.seconds())

    def _away(self, error: Exception, deadline: float) -> BackendAway:
        if isinstance(error, TimeoutError) or self._clock.seconds() >= deadline:
            return BackendAway(f"backend gave no answer within {self.timeout:g} s")
        return BackendAway(f"cannot reach backend: {error.__class__.__name__}")

    async def _read_answer(self, response: IResponse, timeout: float) -> bytes:
        """The body's first MAX_ANSWER_BYTES (more than a verdict may have); the rest is
        not read."""
        parts: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            parts.append(data)
            size += len(data)
            if size >= MAX_ANSWER_BYTES:
                raise _EnoughRead()

        with contextlib.suppress(_EnoughRead):
            await _timed(treq.collect(response, collect), timeout, self._clock)
        return b"".join(parts)[:MAX_ANSWER_BYTES]

    async def _post(self, upload: Upload, fields: dict[str, str], deadline: float) -> IResponse:
        """The answer's status and headers; BackendAway for a 429 or a 5xx."""
        d = self._http.post(
            upload.signal_finish_url,
            data=fields,
            headers=Headers({"User-Agent": ["Incoming!!"]}),
            allow_redirects=False,  # the backend answers itself; no hop to another URL
        )
        response: IResponse = await _timed(d, deadline - self._clock.seconds(), self._clock)
        if response.code == 429 or response.code >= 500:
            asked = retry_after(response, self._clock.seconds())
            raise BackendAway(f"backend answered HTTP {response.code}", asked)
        return response


def retry_after(response: IResponse, now: float) -> float | None:
    """The seconds a 429 or 503 answer's `Retry-After` asks for (a number of seconds or an
    HTTP date); None if it has none, or none that makes sense."""
    values = response.headers.getRawHeaders("retry-after")
    if response.code not in (429, 503) or not values:
        return None
    text = values[0].strip()
    if re.fullmatch(r"[0-9]{1,10}", text):
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return max(when.timestamp() - now, 0.0)


def retry_delay(failures: int, retry_after: float | None, jitter: float) -> float:
    """The wait after the `failures`-th failure in a row: FIRST_RETRY_DELAY doubling, up to
    MAX_RETRY_DELAY, less up to half of it (`jitter`, 0..1: so that the uploads a restarted
    backend missed do not all come back at once); at least the backend's Retry-After, never
    more than the cap."""
    delay = min(FIRST_RETRY_DELAY * 2.0 ** min(failures - 1, 32), MAX_RETRY_DELAY)
    delay *= 1 - jitter / 2
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, MAX_RETRY_DELAY)


def duration(seconds: float) -> str:
    """For people: `70 s`, `12 min`, `24 h`."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


@dataclass
class _Run:
    """The POSTs of one upload's handover, or of its notice: what is awaited now."""

    awaited: Deferred[Any] | None = None
    waiting: bool = False  # `awaited` is the delay before the next attempt
    stopped: bool = False
    aborted: bool = False  # and an attempt under way was cut short


class Retrier:
    """Makes a POST again while the backend is away (BackendAway): after growing delays
    (`retry_delay`), until `retry_for` seconds have passed since its first attempt, which
    may have been made before a restart or by another instance. One line in the log when
    the backend is first found away, one an hour while it stays away, one when it is back.
    """

    def __init__(
        self,
        clock: IReactorTime,
        retry_for: float,
        metrics: Metrics,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.clock = clock
        self.retry_for = retry_for
        self.metrics = metrics
        self.jitter = jitter
        self._runs: dict[tuple[str, str], _Run] = {}
        self._closed = False  # stop_all was called: no more POSTs

    async def run(
        self,
        upload_id: str,
        what: str,
        post: Callable[[], Awaitable[T]],
        since: float,
        go_on: Callable[[], bool],
    ) -> T:
        """`post()`'s result (`what`: "handover" or "cancel notice", for the log). After
        each BackendAway, `go_on()` says whether the POST is still wanted (else Stopped);
        the last BackendAway is raised once the time since `since` is spent."""
        key = (upload_id, what)
        earlier = self._runs.get(key)  # a stopped one may still wait for its last answer
        assert earlier is None or earlier.stopped, f"{what} of {upload_id} is under way"
        if self._closed:
            raise Stopped()
        run = self._runs[key] = _Run()
        try:
            return await self._retried(run, upload_id, what, post, since, go_on)
        finally:
            if self._runs.get(key) is run:
                del self._runs[key]

    async def _retried(
        self,
        run: _Run,
        upload_id: str,
        what: str,
        post: Callable[[], Awaitable[T]],
        since: float,
        go_on: Callable[[], bool],
    ) -> T:
        first = said = self.clock.seconds()  # this run's first attempt; the last log line
        attempts = 0
        while True:
            attempts += 1
            try:
                result: T = await self._await(run, ensureDeferred(_coroutine(post)))
            except BackendAway as e:
                away = e
            else:
                if attempts > 1:
                    log.info(
                        "upload {id}: {what} went through at attempt {n}, {took} after the first",
                        id=upload_id,
                        what=what,
                        n=attempts,
                        took=duration(self.clock.seconds() - first),
                    )
                return result
            now = self.clock.seconds()
            if run.stopped or not go_on():
                raise Stopped()
            left = since + self.retry_for - now
            if left <= 0:
                given = f"given up after {attempts} attempts in {duration(now - since)}"
                raise BackendAway(f"{away} ({given})")
            if attempts == 1:
                said = now
                log.warn(
                    "upload {id}: {what}: {why}; retrying for up to {left}",
                    id=upload_id,
                    what=what,
                    why=str(away),
                    left=duration(left),
                )
            elif now - said >= STILL_AWAY_EVERY:
                said = now
                log.warn(
                    "upload {id}: {what}: backend still away after {took} ({n} attempts): {why}",
                    id=upload_id,
                    what=what,
                    took=duration(now - first),
                    n=attempts,
                    why=str(away),
                )
            self.metrics.handover_retries.labels(what.replace(" ", "_")).inc()
            delay = retry_delay(attempts, away.retry_after, self.jitter())
            run.waiting = True
            try:
                await self._await(run, self.sleep(min(delay, left)))
            finally:
                run.waiting = False

    def sleep(self, seconds: float) -> Deferred[None]:
        """The wait before the next attempt."""
        return deferLater(self.clock, seconds, lambda: None)

    async def _await(self, run: _Run, d: Deferred[T]) -> T:
        run.awaited = d
        try:
            result = await d
        except Exception:
            if run.stopped:
                raise Stopped() from None
            raise
        finally:
            run.awaited = None
        if run.aborted:  # whatever the attempt made of being cut short
            raise Stopped()
        return result

    def stop(self, upload_id: str, what: str) -> None:
        """No more attempts; one under way may still finish (its answer is still read)."""
        run = self._runs.get((upload_id, what))
        if run is not None:
            run.stopped = True
            if run.waiting and run.awaited is not None:
                run.awaited.cancel()

    def stop_all(self) -> None:
        """The server stops: every attempt and wait ends now, and none begins (a restart
        posts again)."""
        self._closed = True
        for run in list(self._runs.values()):
            run.stopped = run.aborted = True
            if run.awaited is not None:
                run.awaited.cancel()


async def _coroutine(post: Callable[[], Awaitable[T]]) -> T:
    return await post()


def _timed(d: Deferred[Any], timeout: float, clock: IReactorTime) -> Deferred[Any]:
    return d.addTimeout(max(timeout, 0.001), clock)
