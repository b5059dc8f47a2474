"""tus 1.0 over HTTP (SPEC: HTTP upload transport): the WebSocket's tickets and upload core.

`TusApi` answers every tus request as a Klein route. The body of a PATCH (or of
a creation-with-upload POST) is never held whole: its route declares
(`site.streamed_body`) that it goes, as it arrives, to a `PatchStream`, the
upload's `Transport` for that request. It writes the body in chunk-sized pieces
and pauses the socket while more than chunk size x send-ahead bytes wait for
the disk, so memory per upload stays bounded whatever the body's size.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from klein.interfaces import IKleinRequest
from prometheus_client import Gauge
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import RequestRedirect

from .concat import MAX_PARTS, PARTIAL, ConcatError, Held, check_parts, requested
from .errors import ErrorCode, UploadError, clipped
from .files import Digest, Pieces, Spliced
from .manager import UploadManager
from .site import IncomingRequest, StreamingKlein, streamed_body
from .upload import Departure, Ending, Upload

log = Logger()
SPLICE_SIZE = 64 * 1024 * 1024  # bytes copied by one write (a thread busy this long at most)

TUS_VERSION = "1.0.0"
EXTENSIONS = (
    "creation,creation-with-upload,creation-defer-length,termination,expiration,checksum,"
    "concatenation"
)
CHECKSUMS: dict[str, Callable[[], Digest]] = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}
OFFSET_STREAM = "application/offset+octet-stream"
READ_SIZE = 256 * 1024  # socket reads while a body streams
MAX_PIECES = 64  # reads kept apart before a write; more are joined
MAX_REASON_CHARS = 500  # of a client's cancel reason (header Incoming-Cancel-Reason)
DIGITS = re.compile(rb"[0-9]{1,19}")  # tus numbers are 1*DIGIT (and fit in 64 bits)
PENDING_HEADER = "Incoming-Handover"  # `pending`: stored; the backend has yet to answer
EXPOSED = (
    "Upload-Offset, Upload-Length, Upload-Defer-Length, Upload-Expires, Upload-Metadata, "
    "Location, Tus-Version, Tus-Resumable, Tus-Max-Size, Tus-Extension, "
    "Tus-Checksum-Algorithm, Incoming-Result, Incoming-Handover"
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
    405: "Method Not Allowed",
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
    ErrorCode.STORAGE_FAILED: 500,
    ErrorCode.STORAGE_FULL: 507,
    ErrorCode.STORE_UNAVAILABLE: 503,
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


def _cancelled(upload: Upload) -> TusError:
    reason = f"this upload was cancelled: {upload.cancel_reason}"
    return _refusal(UploadError(ErrorCode.TICKET_CANCELLED, reason))


class TusApi:
    """`PREFIX/tus/` (or `PREFIX/tus`): the tus endpoint, and `PREFIX/tus/<ticket>` the
    upload of a ticket."""

    app = StreamingKlein()

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

    # Bodies streamed into their upload (site.streamed_body)

    def open_creation(self, request: IncomingRequest) -> PatchStream | None:
        """A creation that carries bytes, or that completes a zero-byte upload at once."""
        if _content_type(request) != OFFSET_STREAM and not _zero_length(request):
            return None  # an ordinary creation: no body to take
        if (request.getHeader("upload-concat") or "").strip().startswith("final"):
            return None  # a final upload has no body: the route refuses one
        return self._open(request, "")

    def open_patch(self, request: IncomingRequest, ticket: str) -> PatchStream | None:
        if _content_type(request) != OFFSET_STREAM:
            return None  # the route refuses it (415)
        return self._open(request, ticket)

    def _open(self, request: IncomingRequest, ticket: str) -> PatchStream:
        stream = PatchStream(self, request, ticket)
        ensureDeferred(stream.start()).addErrback(stream.internal_error)
        return stream

    # Routes

    def concatenation(self, request: IRequest) -> str | list[str] | None:
        """The request's Upload-Concat; 501 where the storage cannot concatenate."""
        if request.getHeader("upload-concat") is not None and not self.manager.storage.splices:
            raise TusError(501, "concatenation is not available with object storage")
        return _concat(request)

    @app.route("/tus/", methods=["OPTIONS"], strict_slashes=False)
    @app.route("/tus/<ticket>", methods=["OPTIONS"], endpoint="options_upload")
    def options(self, request: IRequest, ticket: str = "") -> bytes:
        headers = {
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": EXTENSIONS
            if self.manager.storage.splices
            else EXTENSIONS.removesuffix(",concatenation"),
            "Tus-Checksum-Algorithm": ",".join(CHECKSUMS),
        }
        if self.max_upload is not None:
            headers["Tus-Max-Size"] = str(self.max_upload)
        answer = Answer(204, headers=headers)
        return self._send(request, answer, resumable=False, preflight=True)

    @app.route("/tus/", methods=["POST"], strict_slashes=False)
    @streamed_body(open_creation)
    async def create(self, request: IRequest) -> bytes:
        stream = _stream_of(request)
        if stream is not None:
            return self._send(request, await stream.answer)
        try:
            self.check(request)
            concat = self.concatenation(request)
            if isinstance(concat, list):
                return self._send(request, await self.concatenate(request, concat))
            upload = await self.declared(request)
            await self.position(upload)
            answer = Answer(201, headers={"Location": _location(request, upload.id)})
            answer.headers["Upload-Offset"] = str(upload.offset)
            answer.headers["Upload-Expires"] = self.expires(upload)
            answer.headers.update(_deferred(upload))
        except TusError as e:
            answer = e.answer
        return self._send(request, answer)

    @app.route("/tus/<ticket>", methods=["HEAD"])
    async def head(self, request: IRequest, ticket: str) -> bytes:
        try:
            self.check(request)
            # All stored while the handover runs: the answer waits for the backend's, so
            # that a tus client seeing every byte stored knows the backend has the file
            # (or, after HandoverTimeoutS, that its handover is pending).
            upload = await self.created(ticket, answered=True)
            await self.position(upload)  # writes still in flight land first
            answer = Answer(200, headers={"Cache-Control": "no-store"})
            answer.headers["Upload-Offset"] = str(upload.offset)
            if upload.length is not None:
                answer.headers["Upload-Length"] = str(upload.length)
            answer.headers.update(_deferred(upload))
            if upload.tus_metadata:
                answer.headers["Upload-Metadata"] = upload.tus_metadata
            if upload.partial_of:
                answer.headers["Upload-Concat"] = PARTIAL
            if not upload.phase.final:
                answer.headers["Upload-Expires"] = self.expires(upload)
            else:  # finished: a returning client learns the backend's verdict too
                answer.headers["Incoming-Result"] = quote(upload.result, safe="")
            if upload.handover_pending:
                answer.headers[PENDING_HEADER] = "pending"
        except TusError as e:
            answer = e.answer
        self._send(request, answer)
        return b""

    @app.route("/tus/<ticket>", methods=["PATCH"])
    @streamed_body(open_patch)
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

    @app.handle_errors(HTTPException)
    def unrouted(self, request: IRequest, failure: Failure) -> bytes:
        """No route for the path or the method: still a tus answer a page can read."""
        error = failure.value
        assert isinstance(error, HTTPException) and error.code is not None
        answer = Answer(error.code, f"{error.code} {error.name}")
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            answer.headers["Allow"] = ", ".join(error.valid_methods)
        elif isinstance(error, RequestRedirect):
            answer.headers["Location"] = error.new_url
        return self._send(request, answer)

    # Helpers

    def check(self, request: IRequest) -> None:
        """Refusals every tus request gets the same way."""
        origin = request.getHeader("origin")
        if origin and not self.origin_allowed(origin):
            raise TusError(403, "this Origin may not upload here")
        if request.getHeader("tus-resumable") != TUS_VERSION:
            raise TusError(
                412, f"Tus-Resumable must be {TUS_VERSION}", **{"Tus-Version": TUS_VERSION}
            )

    def origin_allowed(self, origin: str) -> bool:
        return not self.allowed_origins or origin.lower().rstrip("/") in self.allowed_origins

    async def created(self, ticket: str, answered: bool = False) -> Upload:
        """The upload of a ticket that a creation has given a length, or deferred it
        (`answered`: once the backend answered its handover, if one runs)."""
        try:
            if answered:
                upload = await self.manager.answered(ticket, self.handover_timeout)
            else:
                upload = await self.manager.find(ticket)
        except UploadError as e:
            raise _refusal(e) from None
        if upload is not None and upload.cancelled:
            raise _cancelled(upload)
        if upload is None or not upload.created:
            missing = "no such upload; create it with the ticket first"
            raise _refusal(UploadError(ErrorCode.UNKNOWN_TICKET, missing))
        return upload

    async def declared(self, request: IRequest) -> Upload:
        """Creation: the ticket's upload, with the length and name the client gives (and
        its `Upload-Metadata`, for HEAD to give back)."""
        length = _creation_length(request)
        given, metadata = _metadata(request)
        ticket = _text(metadata, "ticket")
        if not ticket:
            raise TusError(400, "Upload-Metadata must carry the ticket")
        name = _text(metadata, "filename")[:4096]
        if self.concatenation(request) == PARTIAL:
            if length is None:  # (the ticket's partials are bounded together by their lengths)
                raise TusError(400, "a partial upload needs its Upload-Length")
            ticket = await self.new_partial(ticket, length)
        try:
            await self.manager.command(ticket, "declare", length, name, given)
            upload = await self.manager.find(ticket)
        except UploadError as e:
            raise _refusal(e) from None
        assert upload is not None
        return upload

    async def new_partial(self, ticket: str, length: int) -> str:
        """A new partial upload of `length` bytes of a ticket whose
        upload is still to receive its bytes: at most MAX_PARTS under way, within the
        upload size limit together (counted among the uploads this instance holds)."""
        owner = await self.live_ticket(ticket)
        if owner.partial_of:
            raise TusError(400, "the ticket of a partial upload must be a ticket")
        siblings = [u for u in self.manager if u.partial_of == owner.id and u.receiving]
        if len(siblings) >= MAX_PARTS:
            raise TusError(400, f"a ticket has at most {MAX_PARTS} partial uploads under way")
        together = length + sum(sibling.length or 0 for sibling in siblings)
        if self.max_upload is not None and together > self.max_upload:
            raise TusError(
                413, f"the ticket's partial uploads would pass {self.max_upload} bytes together"
            )
        try:
            partial = await self.manager.create("", "", True, partial_of=owner.id)
        except UploadError as e:
            raise _refusal(e) from None
        return partial.id

    async def live_ticket(self, ticket: str) -> Upload:
        """The upload of a ticket that takes bytes still, else the 4xx a client reads."""
        try:
            upload = await self.manager.find(ticket)
        except UploadError as e:
            raise _refusal(e) from None
        if upload is None:
            raise _refusal(UploadError(ErrorCode.UNKNOWN_TICKET, "unknown upload ticket"))
        if upload.cancelled:
            raise _cancelled(upload)
        if not upload.receiving or (upload.length is not None and upload.offset == upload.length):
            raise _refusal(UploadError(ErrorCode.TICKET_FINISHED, "this upload has every byte"))
        return upload

    async def _joined(self, request: IRequest, ticket: str, length: int | None) -> Answer | None:
        """A final request sent again once the ticket has every byte (its answer was lost,
        or a restart cut it short after the copy): the ticket's answer, as the first final
        request had it (once the backend answered), if the ticket has all `length` bytes
        (None: whatever its length); else None."""
        if not ticket:
            return None
        try:
            upload = await self.created(ticket, answered=True)
        except TusError:  # unknown, not given a length, cancelled
            return None
        if upload.offset != upload.length or length not in (None, upload.length):
            return None
        await self.manager.settled(upload)  # its file made durable (the handover does)
        headers = {"Location": _location(request, ticket), "Upload-Offset": str(upload.offset)}
        if upload.phase.final:
            headers["Incoming-Result"] = quote(upload.result, safe="")
        if upload.handover_pending:
            headers[PENDING_HEADER] = "pending"
        return Answer(201, headers=headers)

    async def concatenate(self, request: IRequest, ids: list[str]) -> Answer:
        """A final upload: the listed partial uploads' bytes, in that order, become the
        ticket's file (`Concatenation`)."""
        if request.getHeader("upload-length") is not None:
            raise TusError(400, "a final upload takes its length from its partial uploads")
        given, metadata = _metadata(request)
        try:
            parts = [await self.manager.find(upload_id) for upload_id in ids]
            ticket = check_parts(parts, ids, _text(metadata, "ticket"))
        except ConcatError as e:  # partials joined and gone: the ticket's answer stands
            owner = next((part.partial_of for part in parts if part is not None), "")
            ticket = _text(metadata, "ticket") or owner
            joined = await self._joined(request, ticket, None) if e.status == 410 else None
            if joined is None:
                raise TusError(e.status, str(e)) from None
            return joined
        except UploadError as e:
            raise _refusal(e) from None
        found = [part for part in parts if part is not None]
        length = sum(part.length or 0 for part in found)
        joined = await self._joined(request, ticket, length)
        if joined is not None:  # a restart came after the copy: the partials are left over
            self.manager.spawn(_consume(self.manager, found))
            return joined
        name = _text(metadata, "filename")[:4096]
        concatenation = Concatenation(self, ticket, found)
        try:
            return await concatenation.run(name, given, _location(request, ticket))
        except UploadError as e:
            raise _refusal(e) from None

    async def position(self, upload: Upload) -> int:
        """Where the upload stands (durably), once writes in flight have landed."""
        try:
            return await self.manager.resume_position(upload)
        except UploadError as e:
            raise _refusal(e) from None

    def expires(self, upload: Upload) -> str:
        when: bytes = datetimeToString(int(upload.idle_deadline))
        return when.decode()

    def cors(self, request: IRequest, preflight: bool = False) -> dict[str, str]:
        """For a page on another origin that may upload here; never names another one."""
        origin = request.getHeader("origin")
        if not origin:
            return {}
        if not self.allowed_origins:
            headers = {"Access-Control-Allow-Origin": "*"}
        elif self.origin_allowed(origin):
            headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        else:
            return {"Vary": "Origin"}
        headers["Access-Control-Expose-Headers"] = EXPOSED
        if preflight:
            headers["Access-Control-Allow-Methods"] = METHODS
            headers["Access-Control-Allow-Headers"] = ALLOWED
            headers["Access-Control-Max-Age"] = "86400"
        return headers

    def _send(
        self, request: IRequest, answer: Answer, resumable: bool = True, preflight: bool = False
    ) -> bytes:
        request.setResponseCode(answer.status)
        self.manager.metrics.error_sent(answer.code, "tus")
        headers = {**self.cors(request, preflight), **answer.headers}
        if resumable:
            headers["Tus-Resumable"] = TUS_VERSION
        for name, value in headers.items():
            request.setHeader(name, value)
        body = answer.text.encode("utf-8")
        if body:
            request.setHeader("Content-Type", "text/plain; charset=utf-8")
        request.setHeader("Content-Length", str(len(body)))
        return body if request.method != b"HEAD" else b""


class Stage(enum.Enum):
    """Where a request body stands in its upload. Each of `PatchStream`'s events says,
    by stage, what it means there."""

    CONNECTING = 1  # the upload is found, checked, its earlier writes awaited; the body waits
    RECEIVING = 2  # the body is written as it arrives
    DISCARDING = 3  # the upload has every byte already (a repeated request): the body is dropped
    REFUSING = 4  # refused: no more is taken; its writes land, are voided, then it answers
    LANDING = 5  # the body has all arrived; its writes land, then its checksum is checked
    HANDING_OVER = 6  # its bytes stand and complete the upload: the backend's answer is its
    ANSWERED = 7  # it answered (or its client went away) and let go of the upload


class Body(enum.Enum):
    """How much of the request's body the client has sent."""

    ARRIVING = 1
    ARRIVED = 2
    LOST = 3  # the connection broke (before the body's end, or while the answer was awaited)


class PatchStream:
    """One request body written into an upload as it arrives; the upload's Transport.

    Its `stage` reads every event: the body's (`body_received`, `body_ended`,
    `connection_lost`) and the upload's (`stored`, `ended`, `waiting`, `going_away`);
    each event's method says what it does in each stage."""

    via = "tus"  # upload.Transport
    joins = False

    def __init__(self, api: TusApi, request: IncomingRequest, ticket: str) -> None:
        self.api = api
        self.request = request
        self.ticket = ticket
        self.creating = not ticket  # a creation POST carrying the first bytes
        self.stage = Stage.CONNECTING
        self.body = Body.ARRIVING
        self.answer: Deferred[Answer] = Deferred()
        self.upload: Upload | None = None  # once connected to it
        self.digests: tuple[Digest, ...] = ()
        self._expected_digest = b""
        self._start = 0  # the upload's offset where this body begins
        self._sent = 0  # bytes of the body handed to the upload
        self._acked = 0  # of those, bytes on disk
        self._pieces: list[bytes] = []  # arrived, not yet handed to the upload
        self._piled = 0  # their size
        self._early: list[bytes] = []  # body that came while CONNECTING (the socket is paused)
        self._refusal: Answer | None = None  # REFUSING: the answer, once its writes landed
        self._end: int | None = None  # where the body must end: the upload's length, or limit
        self._released = False  # its bytes stand (see `holding`)
        self._paused = False

    # CONNECTING, once the headers are in

    async def start(self) -> None:
        self._pause()  # until the upload's earlier writes have landed
        try:
            self.api.check(self.request)
            offset = None if self.creating else _whole_number(self.request, "Upload-Offset")
            upload = await self._connect()
            position = await self.api.position(upload)
            if self.stage is not Stage.CONNECTING:
                return  # answered meanwhile (the upload ended, the server is stopping)
            self._start, discard = self._starting_offset(upload, position, offset)
            await self._length_given(upload)
            if self.stage is not Stage.CONNECTING:
                return
            if not discard:
                self._end = self._room(upload)
        except TusError as e:
            self._finish(e.answer)
            return
        self.stage = Stage.DISCARDING if discard else Stage.RECEIVING
        early, self._early = self._early, []
        for data in early:
            self.body_received(data)
        if self.body is Body.LOST:
            self._on_lost()
        elif self.body is Body.ARRIVED:
            self._on_end()
        elif upload.pending_bytes < self.api.max_pending:
            self._resume()

    async def _connect(self) -> Upload:
        if self.creating:
            upload = await self.api.declared(self.request)
            self.ticket = upload.id
        else:
            upload = await self.api.created(self.ticket)
            if upload.partial_of:
                await self.api.live_ticket(upload.partial_of)
        if upload.final:  # (tus: 403 for a PATCH to a final upload)
            raise TusError(403, "a final upload takes its bytes from its partial uploads only")
        algorithm_and_digest = self.request.getHeader("upload-checksum")
        if algorithm_and_digest is not None:
            self._expect_checksum(algorithm_and_digest)
        try:  # (its length, or that it has none yet, is the creation's)
            upload = await self.api.manager.connect(upload.id, self, None, upload.browser_name)
        except UploadError as e:
            raise _refusal(e) from None
        self.upload = upload
        self.api.patches.inc()
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

    def _starting_offset(
        self, upload: Upload, position: int, offset: int | None
    ) -> tuple[int, bool]:
        """Where the body goes, and whether it is to be dropped (the upload has it all)."""
        if upload.cancelled:  # meanwhile (its ending reaches this stream once saved)
            raise _cancelled(upload)
        discard = not upload.receiving  # every byte is stored: it is (being) handed over
        if discard:
            position = upload.offset
        if offset is None:  # a creation
            return position, discard or position > 0  # a reloaded page created again
        if offset != position:
            raise TusError(409, f"Upload-Offset {offset} is not the upload's offset {position}",
                           **{"Upload-Offset": str(position)})  # fmt: skip
        return offset, discard

    async def _length_given(self, upload: Upload) -> None:
        """creation-defer-length: a PATCH's `Upload-Length` gives the upload's length (once;
        the same again is fine), durably before anything is answered."""
        length = None if self.creating else _given_number(self.request, "Upload-Length")
        if length is None or length == upload.length:
            return
        try:
            await self.api.manager.command(upload.id, "declare", length, upload.browser_name)
        except UploadError as e:
            raise _refusal(e) from None

    def _room(self, upload: Upload) -> int | None:
        """Where the body must end: at the upload's length, or (not known yet) within the
        upload size limit. A body whose length says it would pass it (or, of an upload
        whose length is not known, not fit in the free space) is refused at once."""
        size = self.request.body_length
        if upload.length is not None:
            if size is not None and self._start + size > upload.length:
                raise TusError(413, f"the body would pass Upload-Length {upload.length}")
            return upload.length
        room = self.api.manager.room()
        if size is not None:
            try:
                room.check(self._start + size, size, sized=False)
            except UploadError as e:
                raise _refusal(e) from None
        return room.limit(sized=False)

    # The body (site.BodyStream)

    def body_received(self, data: bytes) -> None:
        if self.stage is Stage.CONNECTING:
            self._early.append(data)
        elif self.stage is Stage.RECEIVING:
            self._write(data)
        # else dropped: DISCARDING, REFUSING, ANSWERED (nothing comes after the body's end)

    def body_ended(self) -> None:
        self.body = Body.ARRIVED
        self._on_end()

    def _on_end(self) -> None:
        if self.stage is Stage.RECEIVING:
            self._flush()
            self.stage = Stage.LANDING
            self._check_landed()
        elif self.stage is Stage.DISCARDING:
            self._vouch()
        # CONNECTING: `start` carries on from here; REFUSING: it answers once its writes land

    def connection_lost(self) -> None:
        self.body = Body.LOST
        self._on_lost()

    def _on_lost(self) -> None:
        """Bytes that arrived are kept, unless they await a checksum; a final PATCH that
        waited for the handover lets go of the upload, which carries on without it."""
        gone = Answer(499, "the client went away")  # nobody reads it
        if self.stage in (Stage.RECEIVING, Stage.DISCARDING, Stage.LANDING):
            if self.digests:
                self._refuse(TusError(400, "the connection broke before the checksum's end"))
                return
            self._flush()
            self._release()
            self._finish(gone)
        elif self.stage is Stage.HANDING_OVER:
            self._finish(gone)
        # CONNECTING: `start` carries on from here; REFUSING: its answer goes to nobody

    def _write(self, data: bytes) -> None:
        upload = self.upload
        assert upload is not None
        if self._end is not None and self._start + self._sent + self._piled + len(data) > self._end:
            # a body without Content-Length that passes Upload-Length (or, the length not
            # known, the upload size limit): none of it stands
            limit = "Upload-Length" if upload.length is not None else "the upload size limit"
            self._refuse(TusError(413, f"the body passes {limit} {self._end}"))
            return
        self._pieces.append(data)
        self._piled += len(data)
        if self._piled >= self.api.block_size:
            self._flush()
        elif len(self._pieces) >= MAX_PIECES:  # many small reads: join them, keep the memory
            self._pieces = [b"".join(self._pieces)]
        if upload.pending_bytes >= self.api.max_pending:
            self._pause()

    def _flush(self) -> None:
        if self._pieces and self.upload is not None:
            data = Pieces(self._pieces)
            self._pieces, self._piled = [], 0
            self._sent += len(data)
            self.upload.life.receive(data)

    # upload.Transport

    @property
    def holding(self) -> bool:
        """Until its body has all arrived (and passed its checksum), it may be voided."""
        return not self._released

    @property
    def may_void(self) -> bool:
        """Only a checksum that fails, or a chunked body that passes Upload-Length, voids
        its bytes: those of a body of declared length and no checksum stand once durable
        (a spool sends them on during a long PATCH)."""
        return not self._released and (bool(self.digests) or self.request.body_length is None)

    def written(self, size: int) -> None:
        upload = self.upload
        if self._paused and upload is not None and upload.pending_bytes < self.api.max_pending:
            self._resume()

    def stored(self, size: int) -> None:
        self._acked += size
        if self.stage in (Stage.LANDING, Stage.REFUSING):
            self._check_landed()

    def failed(self, error: UploadError) -> None:
        """The storage is full: what was not durable is gone; bytes no checksum vouched
        for are voided too. 507, and the client resumes from HEAD later."""
        upload = self.upload
        if self.stage is Stage.ANSWERED or upload is None:
            return
        refusal = self._refusal if self.stage is Stage.REFUSING else None
        if (refusal is not None or self.digests) and self._sent and upload.receiving:
            upload.life.rewind(self._start)
        self._finish(refusal or _refusal(error).answer)

    def waiting(self) -> None:
        self.ended(Ending(None))  # the backend has the file: that answers the final PATCH

    def pending(self) -> None:
        """The final PATCH (or a repeat of it) hears the file is stored, and the handover
        pending; HEAD tells the rest."""
        upload = self.upload
        assert upload is not None
        answer = self._stored_answer(upload)
        answer.headers[PENDING_HEADER] = "pending"
        self._finish(answer)

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

    def _check_landed(self) -> None:
        """LANDING or REFUSING: once every write of the body is on disk, answer."""
        upload = self.upload
        if self._acked < self._sent or upload is None:
            return
        if self.stage is Stage.REFUSING:
            assert self._refusal is not None
            if self._sent:
                upload.life.rewind(self._start)
            self._finish(self._refusal)
        else:
            self._vouch()

    def _vouch(self) -> None:
        """LANDING (all on disk) or DISCARDING (all arrived): if it passes its checksum,
        its bytes stand; answer, unless the handover they start is to answer."""
        upload = self.upload
        assert upload is not None
        if self.digests and self.digests[0].digest() != self._expected_digest:
            self._refuse(TusError(460, "the body does not match Upload-Checksum"))
            return
        self.digests = ()
        wrote, self.stage = self.stage is Stage.LANDING, Stage.HANDING_OVER
        self._release()  # may start the handover (which may end the upload at once)
        # Bytes that complete the upload, or a repeat of the final PATCH while the backend
        # is being told, hear the backend's answer (`waiting`, `ended`); others answer now.
        handover = upload.whole if wrote else upload.handing_over
        if self.stage is Stage.HANDING_OVER and not handover:
            self._finish(self._stored_answer(upload))

    def _release(self) -> None:
        """Its bytes stand: if they complete the upload, the handover starts."""
        if not self._released:
            self._released = True
            if self.upload is not None:
                self.upload.life.ready()

    def _refuse(self, refusal: TusError) -> None:
        """Take no more of the body; answer `refusal` once its writes have landed, voiding
        its bytes (at once, and then hang up, if the body is still arriving)."""
        if self.stage is Stage.ANSWERED:
            return
        self.stage, self._refusal = Stage.REFUSING, refusal.answer
        self._pieces, self._piled = [], 0
        self._check_landed()

    def _stored_answer(self, upload: Upload) -> Answer:
        headers = {"Upload-Offset": str(upload.offset), **_deferred(upload)}
        if not upload.phase.final:
            headers["Upload-Expires"] = self.api.expires(upload)
        if self.creating:
            headers["Location"] = _location(self.request, upload.id)
            return Answer(201, headers=headers)
        return Answer(204, headers=headers)

    def _finish(self, answer: Answer) -> None:
        if self.stage is Stage.ANSWERED:
            return
        self.stage = Stage.ANSWERED
        self._let_go()
        if self.body is not Body.ARRIVING:
            self.answer.callback(answer)  # the route sends it (if its client is still there)
        else:  # the body is still arriving: answer now and hang up
            self.api.manager.metrics.error_sent(answer.code, "tus")
            headers = {**self.api.cors(self.request), **answer.headers}
            headers["Tus-Resumable"] = TUS_VERSION
            reason = REASONS.get(answer.status, "Error")
            self.request.answer_now(answer.status, reason, headers, answer.text)

    def _let_go(self) -> None:
        if self.upload is not None:
            self.api.patches.dec()
            lost = self.body is Body.LOST
            self.upload.life.disconnect(self, Departure.INTERRUPTED if lost else Departure.DONE)
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


class Concatenation:
    """A final request: the transport of the ticket's upload while the partial uploads'
    bytes are copied into it; answered like a final PATCH (once the backend answered)."""

    via = "tus"
    joins = True
    digests: tuple[Digest, ...] = ()
    holding = may_void = False  # its bytes stand once durable: the handover starts then

    def __init__(self, api: TusApi, ticket: str, parts: list[Upload]) -> None:
        self.api = api
        self.ticket = ticket
        self.parts = parts
        self.answer: Deferred[Answer] = Deferred()
        self.upload: Upload | None = None
        self._held: list[tuple[Upload, Held]] = []
        self._queued = 0  # bytes handed to the upload
        self._acked = 0  # of those, durable

    async def run(self, name: str, metadata: str, location: str) -> Answer:
        manager = self.api.manager
        length = sum(part.length or 0 for part in self.parts)
        try:
            # The partials first: one deleted or expired meanwhile leaves the ticket as it
            # was, its length not fixed (a final request of other partials can follow).
            await self._hold()
            await manager.command(self.ticket, "declare", length, name, metadata, True)
            upload = self.upload = await manager.connect(self.ticket, self, length, name)
            start = await manager.resume_position(upload)
            if upload.receiving:
                self._queue(start)
                upload.life.ready()  # complete already (a repeated request): the handover starts
                answer = await self.answer
            else:
                answer = Answer(201, headers={"Upload-Offset": str(start)})
        finally:
            if self.upload is not None:
                self.upload.life.disconnect(self, Departure.DONE)
            # Removing the partial files takes a while (256 MiB on ext4 with `discard`:
            # 0.2-0.3 s): the client need not wait for it.
            manager.spawn(self._let_go())
        answer.headers.setdefault("Location", location)
        return answer

    async def _hold(self) -> None:
        """Connect to every partial upload (this instance holds them, under their leases
        in a cluster), and check again that each is complete and durable."""
        manager = self.api.manager
        for part in self.parts:
            held = Held()
            assert part.length is not None
            upload = await manager.connect(part.id, held, part.length, "")
            self._held.append((upload, held))
            if await manager.resume_position(upload) != upload.length or not upload.receiving:
                raise UploadError(
                    ErrorCode.LENGTH_MISMATCH, f"partial upload {part.id} is not complete"
                )

    def _queue(self, start: int) -> None:
        """Hand the bytes from `start` on to the upload, partial by partial."""
        upload = self.upload
        assert upload is not None
        at = 0
        for part, _ in self._held:
            assert part.length is not None
            begin = max(start - at, 0)
            while begin < part.length:
                size = min(SPLICE_SIZE, part.length - begin)
                self._queued += size
                upload.life.receive(Spliced(part.id, begin, size))
                begin += size
            at += part.length

    async def _let_go(self) -> None:
        """The partial uploads go once all their bytes are durable in the ticket's file;
        else they stay for the final request to be sent again."""
        copied = (
            self._queued == self._acked
            and self.upload is not None
            and (self.upload.durable == self.upload.length)
        )
        held, self._held = self._held, []
        if copied:
            await _consume(self.api.manager, [part for part, _ in held])
        for part, transport in held:
            part.life.disconnect(transport, Departure.DONE)

    # upload.Transport

    def written(self, size: int) -> None: ...

    def stored(self, size: int) -> None:
        self._acked += size

    def failed(self, error: UploadError) -> None:
        self._answer(error.code, error.message)

    def waiting(self) -> None:
        self.ended(Ending(None))

    def pending(self) -> None:
        self._stored({PENDING_HEADER: "pending"})

    def ended(self, ending: Ending) -> None:
        if ending.finished:
            self._stored({"Incoming-Result": quote(ending.result, safe="")})
        else:
            assert ending.code is not None
            self._answer(ending.code, ending.message)

    def going_away(self) -> None:
        if not self.answer.called:
            self.answer.callback(Answer(503, "the server is restarting; send the request again"))

    def _stored(self, headers: dict[str, str]) -> None:
        upload = self.upload
        if self.answer.called or upload is None:
            return
        headers["Upload-Offset"] = str(upload.offset)
        self.answer.callback(Answer(201, headers=headers))

    def _answer(self, code: ErrorCode, message: str) -> None:
        if not self.answer.called:
            self.answer.callback(Answer(STATUS_FOR.get(code, 500), message, code=code))


async def _consume(manager: UploadManager, parts: list[Upload]) -> None:
    """The partial uploads go: their bytes are durable in their ticket's file."""
    for part in parts:
        try:
            await manager.command(part.id, "consumed")
        except UploadError as e:
            log.warn("partial upload {id} stays: {e}", id=part.id, e=e.message)


def _stream_of(request: IRequest) -> PatchStream | None:
    stream = getattr(request, "body_stream", None)
    return stream if isinstance(stream, PatchStream) else None


def _content_type(request: IRequest) -> str:
    return (request.getHeader("content-type") or "").split(";")[0].strip().lower()


def _concat(request: IRequest) -> str | list[str] | None:
    try:
        return requested(request.getHeader("upload-concat"))
    except ConcatError as e:
        raise TusError(e.status, str(e)) from None


def _location(request: IRequest, ticket: str) -> str:
    """`PREFIX/tus/<ticket>`, under the prefix the client used: built by the routes."""
    location: str = IKleinRequest(request).url_for("head", {"ticket": ticket})
    return location


def _whole_number(request: IRequest, name: str) -> int:
    """A header tus defines as 1*DIGIT: exactly that, given once; else 400."""
    number = _given_number(request, name)
    if number is None:
        raise TusError(400, f"{name} is required")
    return number


def _given_number(request: IRequest, name: str) -> int | None:
    """Such a header, or None if it is absent."""
    values = request.requestHeaders.getRawHeaders(name.lower().encode())
    if not values:
        return None
    if len(values) > 1 or not DIGITS.fullmatch(values[0]):
        raise TusError(400, f"{name} must be one whole number of bytes, in digits")
    return int(values[0])


def _creation_length(request: IRequest) -> int | None:
    """A creation's `Upload-Length`, or None for `Upload-Defer-Length: 1` (the
    creation-defer-length extension: a PATCH gives the length later)."""
    deferred = request.requestHeaders.getRawHeaders(b"upload-defer-length")
    if deferred is None:
        if request.getHeader("upload-length") is None:
            raise TusError(400, "Upload-Length is required (or Upload-Defer-Length: 1)")
        return _whole_number(request, "Upload-Length")
    if request.getHeader("upload-length") is not None:
        raise TusError(400, "give Upload-Length or Upload-Defer-Length: 1, not both")
    if deferred != [b"1"]:
        raise TusError(400, "Upload-Defer-Length must be 1")
    return None


def _deferred(upload: Upload) -> dict[str, str]:
    """`Upload-Defer-Length: 1` while the upload's length is not known."""
    return {"Upload-Defer-Length": "1"} if upload.length is None else {}


def _zero_length(request: IRequest) -> bool:
    try:
        return _whole_number(request, "Upload-Length") == 0
    except TusError:
        return False  # the creation refuses it


def _metadata(request: IRequest) -> tuple[str, dict[str, bytes]]:
    """`Upload-Metadata` as given (its lines joined), and its `key base64value` pairs:
    keys unique, values any bytes."""
    lines = request.requestHeaders.getRawHeaders(b"upload-metadata") or []
    try:
        given = ",".join(line.decode("ascii") for line in lines)
    except UnicodeDecodeError:
        raise TusError(400, "Upload-Metadata must be ASCII: keys and base64 values") from None
    values: dict[str, bytes] = {}
    for pair in given.split(","):
        key, _, encoded = pair.strip().partition(" ")
        if not key:
            continue
        if key in values:
            raise TusError(400, f"Upload-Metadata gives {clipped(key)!r} twice")
        try:
            values[key] = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise TusError(400, f"Upload-Metadata {clipped(key)!r} is not base64") from None
    return given, values


def _text(metadata: dict[str, bytes], key: str) -> str:
    try:
        return metadata.get(key, b"").decode("utf-8")
    except UnicodeDecodeError:
        raise TusError(400, f"Upload-Metadata {key!r} must be UTF-8 text") from None
