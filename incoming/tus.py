"""tus 1.0 over HTTP (SPEC: HTTP upload transport): the WebSocket's tickets and upload core.

`TusApi` answers OPTIONS, creation (POST), HEAD and DELETE as Klein routes. The
body of a PATCH (or of a creation-with-upload POST) is never held whole: the
site hands it, as it arrives, to a `PatchStream`, the upload's `Transport` for
that request. It writes the body in chunk-sized pieces and pauses the socket
while more than chunk size x send-ahead bytes wait for the disk, so memory per
upload stays bounded whatever the body's size.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from klein import Klein
from prometheus_client import Gauge
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.http import datetimeToString
from twisted.web.iweb import IRequest

from .errors import ErrorCode, UploadError, clipped
from .files import Digest, Pieces
from .manager import UploadManager
from .site import IncomingRequest
from .upload import Departure, Ending, Upload

log = Logger()

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,creation-with-upload,termination,expiration,checksum"
CHECKSUMS: dict[str, Callable[[], Digest]] = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}
OFFSET_STREAM = "application/offset+octet-stream"
READ_SIZE = 256 * 1024  # socket reads while a body streams
MAX_PIECES = 64  # reads kept apart before a write; more are joined
MAX_REASON_CHARS = 500  # of a client's cancel reason (header Incoming-Cancel-Reason)
EXPOSED = (
    "Upload-Offset, Upload-Length, Upload-Expires, Upload-Metadata, Location, Tus-Version, "
    "Tus-Resumable, Tus-Max-Size, Tus-Extension, Tus-Checksum-Algorithm, Incoming-Result"
)
ALLOWED = (
    "Content-Type, Upload-Length, Upload-Offset, Upload-Metadata, Upload-Checksum, "
    "Upload-Defer-Length, Upload-Concat, Tus-Resumable, X-HTTP-Method-Override, "
    "X-Requested-With, X-Request-ID, Authorization, Incoming-Cancel-Reason"
)
METHODS = "POST, HEAD, PATCH, DELETE, OPTIONS"
REASONS = {
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    410: "Gone",
    412: "Precondition Failed",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    423: "Locked",
    460: "Checksum Mismatch",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    507: "Insufficient Storage",
}
# What an UploadError means to a tus client.
STATUS_FOR = {
    ErrorCode.UNKNOWN_TICKET: 404,
    ErrorCode.TICKET_FINISHED: 410,
    ErrorCode.TICKET_CANCELLED: 410,
    ErrorCode.ALREADY_CONNECTED: 423,
    ErrorCode.LENGTH_MISMATCH: 409,
    ErrorCode.TOO_LATE: 412,
    ErrorCode.STORAGE_FAILED: 507,
    ErrorCode.INSUFFICIENT_STORAGE: 507,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.HANDOVER_FAILED: 502,
    ErrorCode.REGISTRY_UNAVAILABLE: 503,
}


@dataclass
class Answer:
    status: int
    text: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    code: ErrorCode | None = None  # the refusal's number (metrics count them)


class TusError(Exception):
    def __init__(self, status: int, text: str, **headers: str) -> None:
        super().__init__(text)
        self.answer = Answer(status, text, headers)


def _refusal(e: UploadError) -> TusError:
    refusal = TusError(STATUS_FOR.get(e.code, 400), e.message)
    refusal.answer.code = e.code
    return refusal


class TusApi:
    """`PREFIX/tus/`: the tus endpoint, and `PREFIX/tus/<ticket>` the upload of a ticket."""

    app = Klein()

    def __init__(
        self,
        manager: UploadManager,
        clock: IReactorTime,
        *,
        block_size: int,
        max_pending: int,
        allowed_origins: frozenset[str],
        max_upload: int | None,
        patches: Gauge,
        handover_timeout: float = 55.0,
    ) -> None:
        self.manager = manager
        self.clock = clock
        self.block_size = block_size  # bytes written at once
        self.max_pending = max_pending  # bytes waiting for the disk before the socket pauses
        self.allowed_origins = allowed_origins
        self.max_upload = max_upload
        self.patches = patches
        self.handover_timeout = handover_timeout

    # Routes

    @app.route("/tus/", methods=["OPTIONS"])
    @app.route("/tus/<ticket>", methods=["OPTIONS"], endpoint="options_upload")
    def options(self, request: IRequest, ticket: str = "") -> bytes:
        headers = {
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": EXTENSIONS,
            "Tus-Checksum-Algorithm": ",".join(CHECKSUMS),
            "Access-Control-Allow-Methods": METHODS,
            "Access-Control-Allow-Headers": ALLOWED,
            "Access-Control-Max-Age": "86400",
        }
        if self.max_upload is not None:
            headers["Tus-Max-Size"] = str(self.max_upload)
        return self._send(request, Answer(204, headers=headers), resumable=False)

    @app.route("/tus/", methods=["POST"])
    async def create(self, request: IRequest) -> bytes:
        stream = _stream_of(request)
        if stream is not None:
            return self._send(request, await stream.answer)
        try:
            self.check(request)
            upload = await self.declared(request)
            await self.manager.resume_position(upload)
            answer = Answer(201, headers={"Location": _location(request, upload.id)})
            answer.headers["Upload-Offset"] = str(upload.offset)
            answer.headers["Upload-Expires"] = self.expires(upload)
        except TusError as e:
            answer = e.answer
        return self._send(request, answer)

    @app.route("/tus/<ticket>", methods=["HEAD"])
    async def head(self, request: IRequest, ticket: str) -> bytes:
        try:
            self.check(request)
            # All stored while the handover runs: the answer waits for the backend's, so
            # that a tus client seeing every byte stored knows the backend has the file.
            upload = await self.created(ticket, answered=True)
            await self.manager.resume_position(upload)  # writes still in flight land first
            answer = Answer(200, headers={"Cache-Control": "no-store"})
            answer.headers["Upload-Offset"] = str(upload.offset)
            answer.headers["Upload-Length"] = str(upload.length)
            if not upload.phase.final:
                answer.headers["Upload-Expires"] = self.expires(upload)
            else:  # finished: a returning client learns the backend's verdict too
                answer.headers["Incoming-Result"] = quote(upload.result, safe="")
        except TusError as e:
            answer = e.answer
        self._send(request, answer)
        return b""

    @app.route("/tus/<ticket>", methods=["PATCH"])
    async def patch(self, request: IRequest, ticket: str) -> bytes:
        stream = _stream_of(request)
        if stream is None:  # refused before its body was streamed
            answer = Answer(415, f"Content-Type must be {OFFSET_STREAM}")
            try:
                self.check(request)
            except TusError as e:
                answer = e.answer
            return self._send(request, answer)
        return self._send(request, await stream.answer)

    @app.route("/tus/<ticket>", methods=["DELETE"])
    async def terminate(self, request: IRequest, ticket: str) -> bytes:
        try:
            self.check(request)
            upload = await self.created(ticket)
            reason = unquote(request.getHeader("incoming-cancel-reason") or "")
            try:
                await self.manager.command(upload.id, "cancel_by_client", reason[:MAX_REASON_CHARS])
            except UploadError as e:
                raise _refusal(e) from None
            answer = Answer(204)
        except TusError as e:
            answer = e.answer
        return self._send(request, answer)

    # Streamed bodies (IncomingSite.body_streams)

    def stream(self, request: IncomingRequest, method: bytes, path: bytes) -> PatchStream | None:
        """A stream for the body of a PATCH, or of a creation POST that carries one."""
        parts = path.partition(b"?")[0].split(b"/")
        if len(parts) < 2 or parts[-2] != b"tus":
            return None
        content_type = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
        if method == b"PATCH" and parts[-1]:
            if content_type != OFFSET_STREAM:
                return None
        elif method == b"POST" and not parts[-1]:
            # a creation that carries bytes, or that completes a zero-byte upload at once
            if content_type != OFFSET_STREAM and request.getHeader("upload-length") != "0":
                return None
        else:
            return None
        stream = PatchStream(self, request, parts[-1].decode("ascii", "replace"))
        ensureDeferred(stream.start()).addErrback(stream.internal_error)
        return stream

    # Helpers

    def check(self, request: IRequest) -> None:
        """Refusals every tus request gets the same way."""
        origin = (request.getHeader("origin") or "").lower().rstrip("/")
        if origin and self.allowed_origins and origin not in self.allowed_origins:
            raise TusError(403, "this Origin may not upload here")
        if request.getHeader("tus-resumable") != TUS_VERSION:
            raise TusError(
                412, f"Tus-Resumable must be {TUS_VERSION}", **{"Tus-Version": TUS_VERSION}
            )

    async def created(self, ticket: str, answered: bool = False) -> Upload:
        """The upload of a ticket that a creation has given a length (`answered`: once
        the backend answered its handover, if one runs)."""
        try:
            if answered:
                upload = await self.manager.answered(ticket, self.handover_timeout)
            else:
                upload = await self.manager.find(ticket)
        except UploadError as e:
            raise _refusal(e) from None
        if upload is not None and upload.cancelled:
            reason = f"this upload was cancelled: {upload.cancel_reason}"
            raise _refusal(UploadError(ErrorCode.TICKET_CANCELLED, reason))
        if upload is None or upload.length is None:
            missing = "no such upload; create it with the ticket first"
            raise _refusal(UploadError(ErrorCode.UNKNOWN_TICKET, missing))
        return upload

    async def declared(self, request: IRequest) -> Upload:
        """Creation: the ticket's upload, with the length and name the client gives."""
        try:
            length = int(request.getHeader("upload-length") or "", 10)
        except ValueError:
            raise TusError(400, "Upload-Length must be a whole number of bytes") from None
        if length < 0:
            raise TusError(400, "Upload-Length must not be negative")
        metadata = _metadata(request.getHeader("upload-metadata") or "")
        ticket = metadata.get("ticket", "")
        if not ticket:
            raise TusError(400, "Upload-Metadata must carry the ticket")
        try:
            await self.manager.command(
                ticket, "declare", length, metadata.get("filename", "")[:4096]
            )
            upload = await self.manager.find(ticket)
        except UploadError as e:
            raise _refusal(e) from None
        assert upload is not None
        return upload

    def expires(self, upload: Upload) -> str:
        when: bytes = datetimeToString(int(upload.idle_deadline))
        return when.decode()

    def cors(self, request: IRequest) -> dict[str, str]:
        origin = request.getHeader("origin")
        if not origin:
            return {}
        allowed = "*" if not self.allowed_origins else origin
        return {"Access-Control-Allow-Origin": allowed, "Access-Control-Expose-Headers": EXPOSED}

    def _send(self, request: IRequest, answer: Answer, resumable: bool = True) -> bytes:
        request.setResponseCode(answer.status)
        self.manager.metrics.error_sent(answer.code, "tus")
        headers = {**self.cors(request), **answer.headers}
        if resumable:
            headers["Tus-Resumable"] = TUS_VERSION
        if request.getHeader("origin") and self.allowed_origins:
            headers["Vary"] = "Origin"
        for name, value in headers.items():
            request.setHeader(name, value)
        body = answer.text.encode("utf-8")
        if body:
            request.setHeader("Content-Type", "text/plain; charset=utf-8")
        request.setHeader("Content-Length", str(len(body)))
        return body if request.method != b"HEAD" else b""


class PatchStream:
    """One request body written into an upload as it arrives; the upload's Transport."""

    via = "tus"  # upload.Transport

    def __init__(self, api: TusApi, request: IncomingRequest, ticket: str) -> None:
        self.api = api
        self.request = request
        self.ticket = ticket
        self.creating = not ticket  # a creation POST carrying the first bytes
        self.answer: Deferred[Answer] = Deferred()
        self.upload: Upload | None = None
        self.digests: tuple[Digest, ...] = ()
        self._expected_digest = b""
        self._start = 0  # the upload's offset where this body begins
        self._sent = 0  # bytes of the body handed to the upload
        self._acked = 0  # of those, bytes on disk
        self._pieces: list[bytes] = []  # arrived, not yet handed to the upload
        self._piled = 0  # their size
        self._discard = False  # the body is not for the upload (it had the bytes already)
        self._waiting = True  # for the upload's in-flight writes, before the first byte
        self._early: list[bytes] = []  # body that came meanwhile (the socket is paused)
        self._paused = False
        self._released = False  # its bytes stand (see `holding`)
        self._refusal: TusError | None = None  # the body will be refused once written
        self._ended = False  # the body has all arrived
        self._lost = False  # the connection broke
        self._done = False  # this stream answered and let go of the upload
        self._attached = False

    # Set-up, once the headers are in

    async def start(self) -> None:
        self._pause()  # until the upload's earlier writes have landed
        try:
            self.api.check(self.request)
            upload = await self._connect()
        except TusError as e:
            self._finish(e.answer)
            return
        self.api.patches.inc()
        position = await self.api.manager.resume_position(upload)
        if self._done:
            return
        try:
            self._start = self._starting_offset(upload, position)
        except TusError as e:
            self._finish(e.answer)
            return
        self._waiting = False
        for data in self._early:
            self.body_received(data)
        self._early.clear()
        if self._lost:
            self.connection_lost()
        elif self._ended:
            self.body_ended()
        elif not self._done:
            self._resume()

    async def _connect(self) -> Upload:
        if self.creating:
            upload = await self.api.declared(self.request)
            self.ticket = upload.id
        else:
            upload = await self.api.created(self.ticket)
        algorithm_and_digest = self.request.getHeader("upload-checksum")
        if algorithm_and_digest is not None:
            self._expect_checksum(algorithm_and_digest)
        assert upload.length is not None
        try:
            upload = await self.api.manager.connect(
                upload.id, self, upload.length, upload.browser_name
            )
        except UploadError as e:
            raise _refusal(e) from None
        self.upload, self._attached = upload, True
        if self._lost or self._done:  # the request went meanwhile
            self._let_go()
        return upload

    def _expect_checksum(self, header: str) -> None:
        algorithm, _, encoded = header.strip().partition(" ")
        if algorithm not in CHECKSUMS:
            raise TusError(
                400, f"Upload-Checksum algorithm {clipped(algorithm)!r} is not supported"
            )
        try:
            self._expected_digest = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise TusError(
                400, "Upload-Checksum must be an algorithm and a base64 digest"
            ) from None
        self.digests = (CHECKSUMS[algorithm](),)

    def _starting_offset(self, upload: Upload, position: int) -> int:
        assert upload.length is not None
        if not upload.receiving:
            self._discard = True  # every byte is stored: the upload is (being) handed over
            position = upload.offset
        if self.creating:
            self._discard = self._discard or position > 0  # a reloaded page created again
            return position
        try:
            offset = int(self.request.getHeader("upload-offset") or "", 10)
        except ValueError:
            raise TusError(400, "Upload-Offset must be a whole number of bytes") from None
        if offset != position:
            raise TusError(409, f"Upload-Offset {offset} is not the upload's offset {position}",
                           **{"Upload-Offset": str(position)})  # fmt: skip
        length = self.request.getHeader("content-length")
        if length is not None and length.isdigit() and offset + int(length) > upload.length:
            raise TusError(413, f"the body would pass Upload-Length {upload.length}")
        return offset

    # The body (site.BodyStream)

    def body_received(self, data: bytes) -> None:
        if self._waiting:
            self._early.append(data)
            return
        if self._done or self._discard or self._refusal is not None:
            return
        upload = self.upload
        assert upload is not None and upload.length is not None
        if self._start + self._sent + self._piled + len(data) > upload.length:
            # a body without Content-Length that passes Upload-Length: none of it stands
            self._refuse(TusError(413, f"the body passes Upload-Length {upload.length}"))
            return
        self._pieces.append(data)
        self._piled += len(data)
        if self._piled >= self.api.block_size:
            self._flush()
        elif len(self._pieces) >= MAX_PIECES:  # many small reads: join them, keep the memory
            self._pieces = [b"".join(self._pieces)]
        if upload.pending_bytes >= self.api.max_pending:
            self._pause()

    def body_ended(self) -> None:
        self._ended = True
        if self._waiting or self._done:
            return
        self._flush()
        self._maybe_complete()

    def connection_lost(self) -> None:
        """Bytes that arrived are kept, unless they await a checksum; a final PATCH that
        waited for the handover lets go of the upload, which carries on without it."""
        if self._ended and not self._lost and not self._done and self._released:
            self._lost = True
            self._finish(Answer(499, "the client went away"))  # nobody reads it
            return
        self._lost = self._ended = True
        if self._done or self._waiting:  # `start` carries on from here when it can
            return
        if self.digests:
            self._refuse(TusError(400, "the connection broke before the checksum's end"))
            return
        self._flush()
        self._release()
        self._let_go()

    def _flush(self) -> None:
        if self._pieces and self.upload is not None and self._attached and not self._done:
            data = Pieces(self._pieces)
            self._pieces, self._piled = [], 0
            self._sent += len(data)
            self.upload.life.receive(data)

    # upload.Transport

    @property
    def holding(self) -> bool:
        """Until its body has all arrived (and passed its checksum), it may be voided."""
        return not self._released

    def stored(self, size: int) -> None:
        self._acked += size
        upload = self.upload
        if self._paused and upload is not None and upload.pending_bytes < self.api.max_pending:
            self._resume()
        self._maybe_complete()

    def waiting(self) -> None:
        self.ended(Ending(None))  # the backend has the file: that answers the final PATCH

    def ended(self, ending: Ending) -> None:
        upload = self.upload
        assert upload is not None
        if ending.finished:
            answer = self._stored_answer(upload)
            answer.headers["Incoming-Result"] = quote(ending.result, safe="")
            self._finish(answer)
        else:
            assert ending.code is not None
            self._finish(Answer(STATUS_FOR.get(ending.code, 500), ending.message, code=ending.code))

    def going_away(self) -> None:
        away = TusError(503, "the server is restarting; resume the upload")
        if self.digests and self._sent:  # bytes no checksum vouches for: void them first
            self._refuse(away)
        else:
            self._finish(away.answer)

    # The answer

    def _maybe_complete(self) -> None:
        """All of the body is on disk: check it, then answer (after the handover's
        answer, if it completed the upload)."""
        upload = self.upload
        stopped = self._ended or self._refusal is not None
        if self._done or not stopped or self._acked < self._sent or upload is None:
            return
        if self._refusal is not None:
            if self._sent:
                upload.life.rewind(self._start)
            self._finish(self._refusal.answer)
            return
        if self.digests and self.digests[0].digest() != self._expected_digest:
            self._refusal = TusError(460, "the body does not match Upload-Checksum")
            self._maybe_complete()
            return
        self.digests = ()
        self._release()
        if self._discard and upload.handing_over:
            return  # nothing to add: like the final PATCH, it hears the backend's answer
        if not upload.complete or self._discard:
            self._finish(self._stored_answer(upload))
        # else the handover has started: `waiting` or `ended` answers

    def _release(self) -> None:
        """Its bytes stand: if they complete the upload, the handover starts."""
        if not self._released:
            self._released = True
            if self.upload is not None:
                self.upload.life.ready()

    def _refuse(self, refusal: TusError) -> None:
        """Take no more of the body; answer `refusal` once its writes have landed, voiding
        its bytes (at once, and then hang up, if the body is still arriving)."""
        self._refusal = refusal
        self._pieces, self._piled = [], 0
        self._maybe_complete()

    def _stored_answer(self, upload: Upload) -> Answer:
        headers = {"Upload-Offset": str(upload.offset)}
        if not upload.phase.final:
            headers["Upload-Expires"] = self.api.expires(upload)
        if self.creating:
            headers["Location"] = _location(self.request, upload.id)
            return Answer(201, headers=headers)
        return Answer(204, headers=headers)

    def _finish(self, answer: Answer) -> None:
        if self._done:
            return
        self._done = True
        self._let_go()
        if self._ended:
            self.answer.callback(answer)
        else:  # the body is still arriving: answer now and hang up
            self.api.manager.metrics.error_sent(answer.code, "tus")
            headers = {**self.api.cors(self.request), **answer.headers}
            headers["Tus-Resumable"] = TUS_VERSION
            reason = REASONS.get(answer.status, "Error")
            self.request.answer_now(answer.status, reason, headers, answer.text)

    def _let_go(self) -> None:
        if self._attached and self.upload is not None:
            self._attached = False
            self.api.patches.dec()
            self.upload.life.disconnect(
                self, Departure.INTERRUPTED if self._lost else Departure.DONE
            )
        if self._paused:
            self._resume()

    def internal_error(self, failure: Any) -> None:
        log.failure("upload {id}: internal error in a tus request", failure, id=self.ticket)
        self._finish(Answer(500, "internal server error"))

    # Back-pressure on the socket

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._transport().pauseProducing()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self._transport().resumeProducing()

    def _transport(self) -> IPushProducer:
        transport = self.request.channel.transport
        assert transport is not None
        transport.bufferSize = READ_SIZE  # type: ignore[attr-defined]
        return IPushProducer(transport)


def _stream_of(request: IRequest) -> PatchStream | None:
    stream = getattr(request, "body_stream", None)
    return stream if isinstance(stream, PatchStream) else None


def _location(request: IRequest, ticket: str) -> str:
    """`PREFIX/tus/<ticket>`, under the prefix the client used."""
    path = request.path.decode("ascii", "replace")
    prefix = path[: path.index("/tus/")] if "/tus/" in path else "/incoming"
    return f"{prefix}/tus/{ticket}"


def _metadata(header: str) -> dict[str, str]:
    """`Upload-Metadata`: `key base64value` pairs, comma-separated."""
    values = {}
    for pair in header.split(","):
        key, _, encoded = pair.strip().partition(" ")
        if not key:
            continue
        try:
            values[key] = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise TusError(400, f"Upload-Metadata {clipped(key)!r} is not base64 UTF-8") from None
    return values
