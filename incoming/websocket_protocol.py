"""The WebSocket upload protocol (SPEC: WebSocket upload protocol), one session per connection.

A session reads the client's messages in their order (its `Stage`) and hands
bytes and requests to the upload's life; what becomes of the upload reaches it
as a `Transport` (stored, ended, going away). Only the session talks to its client.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from prometheus_client import Gauge
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import rfc6455
from .errors import ErrorCode, UploadError, clipped
from .files import Digest
from .manager import UploadManager
from .upload import Departure, Ending, Upload
from .window import Window

log = Logger()

CLIENT_MESSAGES = frozenset({"MsgUploadReq", "MsgAck", "MsgPause", "MsgCancel", "MsgError"})
MAX_REASON_CHARS = 500  # of a client's cancel reason, kept and sent to the backend
MAX_NAME_CHARS = 4096


class Stage(enum.Enum):
    """Where the client is in the protocol's message order."""

    AWAIT_REQUEST = 1  # nothing but MsgUploadReq is welcome
    CONNECTING = 2  # waiting for in-flight writes before MsgUploadConf
    AWAIT_ACK = 3  # MsgUploadConf sent
    RECEIVING = 4  # chunks welcome
    ENDED = 5


def message(msg_type: str, **data: Any) -> str:
    return json.dumps({"MsgType": msg_type, "MsgData": data}, separators=(",", ":"))


class UploadProtocolSession:
    """Serves one WebSocket: an `rfc6455.MessageHandler` and the upload's `Transport`."""

    # upload.Transport: a chunk needs no check but its size, and stands once written
    via = "websocket"
    joins = False
    digests: tuple[Digest, ...] = ()
    holding = may_void = False

    def __init__(
        self,
        manager: UploadManager,
        clock: IReactorTime,
        *,
        window: Window,
        request_timeout: float,
        connections: Gauge,
    ) -> None:
        self.manager = manager
        self.clock = clock
        self.chunk_size_kb = window.chunk_size // 1024
        self.window = window
        self.send_ahead = window.send_ahead  # as announced in MsgUploadConf
        self.request_timeout = request_timeout
        self.connections = connections
        self.connection: rfc6455.WebSocketConnection | None = None
        self.upload: Upload | None = None
        self.stage = Stage.AWAIT_REQUEST
        self.paused = False
        self.cancelling = False  # this client asked to cancel
        self._request_deadline: IDelayedCall | None = None

    # rfc6455.MessageHandler

    def connected(self, connection: rfc6455.WebSocketConnection) -> None:
        self.connection = connection
        self.connections.inc()
        self._request_deadline = self.clock.callLater(self.request_timeout, self._no_request)

    def connection_lost(self) -> None:
        self.connections.dec()
        self._stop_request_deadline()
        self.stage = Stage.ENDED
        self._let_go()

    def _let_go(self) -> None:
        """The upload is free for another connection (once; our close may wait for the
        client's close frame, and the client may come back meanwhile)."""
        upload, self.upload = self.upload, None
        if upload is not None:
            upload.life.disconnect(self, self._departure())

    def message_refused(self, why: str, close_code: int) -> None:
        too_big = close_code == rfc6455.TOO_BIG
        code = ErrorCode.FRAME_TOO_LARGE if too_big else ErrorCode.MALFORMED_MESSAGE
        self.manager.metrics.error_sent(code, self.via)
        self._send("MsgError", ErrorCode=int(code), Msg=why)
        self.stage = Stage.ENDED

    def text_received(self, text: str) -> None:
        if self.stage is Stage.ENDED:
            return
        try:
            self._dispatch(*_parse(text))
        except UploadError as e:
            self.refused(e)

    def refused(self, error: UploadError) -> None:
        """A client returning to a finished upload still learns the backend's verdict."""
        finished = error.code is ErrorCode.TICKET_FINISHED
        self.error(error.code, error.message, **({"Result": error.result} if finished else {}))

    def binary_received(self, data: bytes) -> None:
        if self.stage is Stage.ENDED:
            return  # the upload ended: chunks already on the wire are dropped quietly
        if self.stage is not Stage.RECEIVING:
            self.error(ErrorCode.UNEXPECTED_MESSAGE, "a chunk is not expected before MsgAck")
            return
        assert self.upload is not None
        if self.upload.unacknowledged >= self.send_ahead:
            self.error(
                ErrorCode.SEND_AHEAD_EXCEEDED,
                f"more than SendAhead={self.send_ahead} chunks unacknowledged",
            )
            return
        self.upload.life.receive(data)
        # A window grown past the memory bound waits in the kernel and the network meanwhile
        # (one of the bound's size needs no pause: its client waits for an ack).
        grown = self.send_ahead > self.window.send_ahead
        if grown and self.upload.pending_bytes >= self.window.max_pending:
            assert self.connection is not None
            self.connection.pause_reading()

    def _disk_caught_up(self) -> None:
        pending = self.upload.pending_bytes if self.upload is not None else 0
        if pending < self.window.max_pending and self.connection is not None:
            self.connection.resume_reading()

    # upload.Transport

    def written(self, size: int) -> None:
        self._disk_caught_up()  # its bytes left memory (the client's window moves with acks)

    def stored(self, size: int) -> None:
        self._send("MsgChunkAck", ChunkSize=size)  # durable

    def failed(self, error: UploadError) -> None:
        self.error(error.code, error.message)  # the client resumes later (incoming.js does)

    def ended(self, ending: Ending) -> None:
        if ending.finished:
            self._send("MsgAllDone", Success=True, Result=ending.result)
            self._close(rfc6455.NORMAL)
        elif ending.code is ErrorCode.TICKET_CANCELLED and self.cancelling:
            self._send("MsgCancelAck", Ack=True)
            self._close(rfc6455.NORMAL)
        elif ending.code is ErrorCode.TICKET_CANCELLED:
            self._send("MsgCancel", Reason=ending.message)
            self._close(rfc6455.NORMAL)
        else:
            assert ending.code is not None
            self.error(ending.code, ending.message)

    def waiting(self) -> None:
        pass  # the client hears MsgAllDone once the backend calls finish_upload

    def pending(self) -> None:
        """Stored, and the application will take it: a finished upload to the 2014 library.
        The handover goes on without this connection; one that comes back meanwhile hears
        the same (after MsgUploadConf)."""
        self._send("MsgAllDone", Success=True, Pending=True)
        self._close(rfc6455.NORMAL)
        upload, self.upload = self.upload, None
        if upload is not None:
            upload.life.disconnect(self, Departure.DONE)

    def going_away(self) -> None:
        self._close(rfc6455.GOING_AWAY)

    # Messages

    def _dispatch(self, msg_type: str, data: dict[str, Any]) -> None:
        if msg_type not in CLIENT_MESSAGES:
            raise UploadError(
                ErrorCode.UNKNOWN_MESSAGE_TYPE, f"unknown MsgType {clipped(msg_type)!r}"
            )
        if msg_type == "MsgUploadReq":
            if self.stage is not Stage.AWAIT_REQUEST:
                raise _unexpected(msg_type)
            self._upload_request(data)
        elif self.stage in (Stage.AWAIT_REQUEST, Stage.CONNECTING):
            raise _unexpected(msg_type, "before MsgUploadConf")
        elif msg_type == "MsgAck":
            if self.stage is Stage.AWAIT_ACK:
                self.stage = Stage.RECEIVING
        elif msg_type == "MsgPause":
            self.paused = True
        elif msg_type == "MsgCancel":
            reason = data.get("Reason", "")
            self._cancel(reason[:MAX_REASON_CHARS] if isinstance(reason, str) else "")
        else:  # MsgError
            log.info("upload {id}: client reports error {d}", id=self._id(), d=clipped(repr(data)))

    def _upload_request(self, data: dict[str, Any]) -> None:
        ticket, length, name = data.get("Id"), data.get("LengthBytes"), data.get("Name", "")
        if not isinstance(ticket, str) or not ticket:
            raise UploadError(ErrorCode.BAD_TICKET_ID, "Id missing or not a string")
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise UploadError(
                ErrorCode.BAD_LENGTH, "LengthBytes missing, not an integer, or negative"
            )
        if not isinstance(name, str):
            raise UploadError(ErrorCode.MALFORMED_MESSAGE, "Name is not a string")
        self._stop_request_deadline()
        self.stage = Stage.CONNECTING
        connecting = self._connect(ticket, length, name[:MAX_NAME_CHARS])
        ensureDeferred(connecting).addErrback(self._internal_error)

    async def _connect(self, ticket: str, length: int, name: str) -> None:
        try:
            upload = await self.manager.connect(ticket, self, length, name)
        except UploadError as e:
            if e.code is ErrorCode.ALREADY_CONNECTED and await self._pending_elsewhere(
                ticket, length
            ):
                return
            self.refused(e)
            return
        if self.stage is not Stage.CONNECTING:  # the connection went meanwhile
            upload.life.disconnect(self, self._departure())
            return
        self.upload = upload
        try:
            position = await self.manager.resume_position(upload)
        except UploadError as e:
            self.refused(e)
            return
        if self.stage is not Stage.CONNECTING:
            return
        self.stage = Stage.AWAIT_ACK
        assert self.connection is not None
        self.send_ahead = self.window.for_rtt(self.connection.rtt)
        if self.connection.rtt is not None:
            self.manager.metrics.websocket_round_trip.observe(self.connection.rtt)
        self._send(
            "MsgUploadConf",
            ChunkSizeKB=self.chunk_size_kb,
            FilePos=position,
            SendAhead=self.send_ahead,
        )
        upload.life.ready()

    async def _pending_elsewhere(self, ticket: str, length: int) -> bool:
        """Cluster: another instance holds the upload, whose handover is pending: a client
        that comes back hears what it would hear there (not ALREADY_CONNECTED for hours)."""
        try:
            upload = await self.manager.find(ticket)
        except UploadError:
            return False
        if upload is None or not upload.handover_pending or upload.length != length:
            return False
        if self.stage is Stage.CONNECTING:
            self.stage = Stage.AWAIT_ACK
            self._send(
                "MsgUploadConf",
                ChunkSizeKB=self.chunk_size_kb,
                FilePos=length,
                SendAhead=self.send_ahead,
            )
            self.pending()
        return True

    def _cancel(self, reason: str) -> None:
        """Acknowledged once the upload's life has ended it (at once)."""
        assert self.upload is not None
        self.cancelling = True
        try:
            self.upload.life.cancel_by_client(reason)
        except UploadError as e:
            self.cancelling = False
            self.error(e.code, e.message)

    def _departure(self) -> Departure:
        """A WebSocket ends early, or after the upload's end (where it does not matter)."""
        return Departure.PAUSED if self.paused else Departure.INTERRUPTED

    def _no_request(self) -> None:
        self._request_deadline = None
        if self.stage is Stage.AWAIT_REQUEST:
            self.error(
                ErrorCode.NO_UPLOAD_REQUEST, f"no MsgUploadReq within {self.request_timeout:g} s"
            )

    def _stop_request_deadline(self) -> None:
        if self._request_deadline is not None and self._request_deadline.active():
            self._request_deadline.cancel()
        self._request_deadline = None

    # Output

    def error(self, code: ErrorCode, text: str, **extra: str) -> None:
        """Tell the client what went wrong and hang up."""
        log.info(
            "upload {id}: error {code} to client: {text}",
            id=self._id(),
            code=int(code),
            text=clipped(text),
        )
        self.manager.metrics.error_sent(code, self.via)
        self._send("MsgError", ErrorCode=int(code), Msg=text, **extra)
        self._close(rfc6455.POLICY)

    def _internal_error(self, failure: Failure) -> None:
        log.failure("upload {id}: internal error", failure, id=self._id())
        self.error(ErrorCode.INTERNAL_ERROR, "internal server error")

    def _send(self, msg_type: str, **data: Any) -> None:
        if self.connection is not None:
            self.connection.send_text(message(msg_type, **data))

    def _close(self, code: int) -> None:
        self.stage = Stage.ENDED
        if self.upload is not None:  # (not from within the upload's own transition)
            self.clock.callLater(0, self._let_go)
        if self.connection is not None:
            self.connection.close(code)

    def _id(self) -> str:
        return self.upload.id if self.upload is not None else "-"


def _parse(text: str) -> tuple[str, dict[str, Any]]:
    try:
        document = json.loads(text)
    except ValueError:
        raise UploadError(ErrorCode.MALFORMED_MESSAGE, "message is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("MsgType"), str):
        raise UploadError(ErrorCode.MALFORMED_MESSAGE, "message has no MsgType string")
    data = document.get("MsgData", {})
    if not isinstance(data, dict):
        raise UploadError(ErrorCode.MALFORMED_MESSAGE, "MsgData is not an object")
    return document["MsgType"], data


def _unexpected(what: str, when: str = "now") -> UploadError:
    return UploadError(ErrorCode.UNEXPECTED_MESSAGE, f"{what} is not expected {when}")
