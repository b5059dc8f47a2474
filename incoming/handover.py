"""The POST to the backend's `signalFinishURL`: handovers and cancel notices."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
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

MAX_RESULT_BYTES = 4096  # of a backend's verdict for the page
MAX_LINE_BYTES = 4096  # of the answer's first line: `done` or `wait`, and what follows it
# Enough to tell any answer that breaks these bounds: a line, a newline, a verdict, one more.
MAX_ANSWER_BYTES = MAX_LINE_BYTES + 1 + MAX_RESULT_BYTES + 1
FIRST_RETRY_DELAY = 0.25
MAX_RETRY_DELAY = 8.0
# Connection failures and 5xx answers are retried. A connection lost after the request
# was sent (ResponseNeverReceived) may hide a backend that took the file and whose
# answer was lost: that is why a handover is delivered *at least* once, and a backend
# must answer `done` again for an `id` it already has (docs/reference/handover.rst).
_RETRYABLE = (
    ConnectError,
    DNSLookupError,
    ConnectionLost,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)


class HandoverFailed(Exception):
    """The backend did not take the file; the message says why."""


class _Retry(Exception):
    """This attempt failed in a way worth trying again."""


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
    """Tells backends about their uploads."""

    async def hand_over(
        self,
        upload: Upload,
        filename: str,
        sha256: str | None,
        extra: Mapping[str, str] | None = None,
    ) -> Answer:
        """POST until the backend answers `done` or `wait`, or raise HandoverFailed."""

    async def notify_cancelled(self, upload: Upload, reason: str) -> None:
        """One best-effort POST announcing a cancellation."""


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" and "Stopping factory" lines per handover


def http_client(reactor: Any) -> HTTPClient:
    """A fresh connection per handover (backends often drop idle keep-alives), and no
    log lines of Twisted's for each."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    pool._factory = _QuietFactory
    return HTTPClient(Agent(reactor, pool=pool))


class HandoverClient:
    """Handover over HTTP (treq), retrying within `timeout` seconds."""

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
        """POST until the backend answers `done` or `wait`, or raise HandoverFailed."""
        try:
            return await self._hand_over(upload, form_fields(upload, filename, None, sha256, extra))
        except HandoverFailed:
            self.metrics.handover_failures.inc()
            raise

    async def _hand_over(self, upload: Upload, fields: dict[str, str]) -> Answer:
        deadline = self._clock.seconds() + self.timeout
        delay = FIRST_RETRY_DELAY
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(upload, fields, deadline)
            except _Retry as e:
                if self._clock.seconds() + delay >= deadline:
                    raise HandoverFailed(f"{e} (after {attempt} attempts)") from None
                log.info(
                    "upload {id}: handover attempt {n} failed: {why}; retrying",
                    id=upload.id,
                    n=attempt,
                    why=str(e),
                )
                await deferLater(self._clock, delay, lambda: None)
                delay = min(delay * 2, MAX_RETRY_DELAY)

    async def _attempt(self, upload: Upload, fields: dict[str, str], deadline: float) -> Answer:
        """One POST; its answer, body included, must arrive by `deadline`."""
        self.metrics.handover_attempts.inc()
        try:
            response = await self._post(upload, fields, deadline - self._clock.seconds())
            if response.code >= 500:
                raise _Retry(f"backend answered HTTP {response.code}")
            if response.code != 200:
                raise HandoverFailed(f"backend answered HTTP {response.code}")
            body = await self._read_answer(response, deadline - self._clock.seconds())
        except (TimeoutError, CancelledError):
            raise HandoverFailed(f"backend gave no answer within {self.timeout:g} s") from None
        except _RETRYABLE as e:
            if self._clock.seconds() >= deadline:  # a request cut short by the deadline
                raise HandoverFailed(f"backend gave no answer within {self.timeout:g} s") from None
            raise _Retry(f"cannot reach backend: {e.__class__.__name__}") from None
        except (HandoverFailed, _Retry):
            raise
        # Anything else the backend can make happen (bad chunking, a short body,
        # a broken connection mid-body) fails the handover, never the server.
        except Exception as e:
            raise HandoverFailed(f"backend answer unreadable: {e.__class__.__name__}") from None
        return parse_answer(body)

    async def notify_cancelled(self, upload: Upload, reason: str) -> None:
        """One best-effort POST telling the backend the upload was cancelled."""
        try:
            response = await self._post(upload, form_fields(upload, "", reason), self.timeout)
            await self._read_answer(response, self.timeout)
        except Exception as e:
            log.info(
                "upload {id}: backend not told of cancellation: {why}",
                id=upload.id,
                why=e.__class__.__name__,
            )

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

    def _post(self, upload: Upload, fields: dict[str, str], timeout: float) -> Deferred[IResponse]:
        d = self._http.post(
            upload.signal_finish_url,
            data=fields,
            headers=Headers({"User-Agent": ["Incoming!!"]}),
            allow_redirects=False,  # the backend answers itself; no hop to another URL
        )
        return _timed(d, timeout, self._clock)


def _timed(d: Deferred[Any], timeout: float, clock: IReactorTime) -> Deferred[Any]:
    return d.addTimeout(max(timeout, 0.001), clock)
