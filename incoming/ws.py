"""The browser's upload protocol over one WebSocket (SPEC: WebSocket upload protocol)."""

from __future__ import annotations

import enum
import json
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import websocket
from .manager import UploadManager
from .uploads import ErrorCode, Upload, UploadError, clipped

log = Logger()


class Stage(enum.Enum):
    AWAIT_REQUEST = 1  # nothing but MsgUploadReq is welcome
    CONNECTING = 2  # waiting for in-flight writes before MsgUploadConf
    AWAIT_ACK = 3  # MsgUploadConf sent
    RECEIVING = 4  # chunks welcome
    ENDED = 5


CLIENT_MESSAGES = frozenset({"MsgUploadReq", "MsgAck", "MsgPause", "MsgCancel", "MsgError"})
MAX_REASON_CHARS = 500  # of a browser's cancel reason, kept and sent to the backend


def message(msg_type: str, **data: Any) -> str:
    return json.dumps({"MsgType": msg_type, "MsgData": data}, separators=(",", ":"))


class UploadSession:
    """Serves one browser connection: the `websocket.MessageHandler` of an upload."""

    def __init__(self, manager: UploadManager) -> None:
        self.manager = manager
        self.config = manager.config
        self.connection: websocket.WebSocketConnection | None = None
        self.upload: Upload | None = None
        self.stage = Stage.AWAIT_REQUEST
        self.in_flight = 0
        self.paused = False
        self._request_deadline: IDelayedCall | None = None

    # websocket.MessageHandler

    def connected(self, connection: websocket.WebSocketConnection) -> None:
        self.connection = connection
        self.manager.metrics.connections += 1
        self._request_deadline = self.manager.clock.callLater(
            self.config.ws_timeout, self._no_request
        )

    def _no_request(self) -> None:
        self._request_deadline = None
        if self.stage is Stage.AWAIT_REQUEST:
            self.error(
                ErrorCode.NO_UPLOAD_REQUEST,
                f"no MsgUploadReq within {self.config.ws_timeout:g} s",
            )

    def _stop_request_deadline(self) -> None:
        if self._request_deadline is not None and self._request_deadline.active():
            self._request_deadline.cancel()
        self._request_deadline = None

    def connection_lost(self) -> None:
        self.manager.metrics.connections -= 1
        self._stop_request_deadline()
        self.stage = Stage.ENDED
        if self.upload is not None:
            self.manager.disconnect(self.upload, self, self.paused)

    def message_refused(self, why: str, close_code: int) -> None:
        code = (
            ErrorCode.FRAME_TOO_LARGE
            if close_code == websocket.TOO_BIG
            else ErrorCode.MALFORMED_MESSAGE
        )
        self._send("MsgError", ErrorCode=int(code), Msg=why)
        self.stage = Stage.ENDED

    def text_received(self, text: str) -> None:
        if self.stage is Stage.ENDED:
            return
        try:
            self._dispatch(*_parse(text))
        except UploadError as e:
            self.error(e.code, e.message)

    def binary_received(self, data: bytes) -> None:
        if self.stage is Stage.ENDED:
            return
        try:
            self._chunk(data)
        except UploadError as e:
            if not e.cancels:  # a cancelling error reaches us through upload_failed
                self.error(e.code, e.message)

    # uploads.Session: news about the upload from elsewhere

    def upload_cancelled(self, reason: str) -> None:
        self._send("MsgCancel", Reason=reason)
        self._close(websocket.NORMAL)

    def upload_failed(self, code: ErrorCode, text: str) -> None:
        self.error(code, text)

    def upload_done(self) -> None:
        self._send("MsgAllDone", Success=True)
        self._close(websocket.NORMAL)

    def going_away(self) -> None:
        self._close(websocket.GOING_AWAY)

    # Messages

    def _dispatch(self, msg_type: str, data: dict[str, Any]) -> None:
        if msg_type not in CLIENT_MESSAGES:
            raise UploadError(ErrorCode.UNKNOWN_MESSAGE_TYPE, f"unknown MsgType {msg_type!r}")
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
            self._cancel(reason if isinstance(reason, str) else "")
        else:  # MsgError
            log.info("upload {id}: browser reports error {d}", id=self._id(), d=clipped(repr(data)))

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
        self.upload = self.manager.connect(ticket, self, length, name[:4096])
        self.stage = Stage.CONNECTING
        ensureDeferred(self._confirm(self.upload)).addErrback(self._internal_error)

    async def _confirm(self, upload: Upload) -> None:
        position = await self.manager.resume_position(upload)
        if self.stage is not Stage.CONNECTING:
            return
        self.stage = Stage.AWAIT_ACK
        self._send(
            "MsgUploadConf",
            ChunkSizeKB=self.config.chunk_size_kb,
            FilePos=position,
            SendAhead=self.config.send_ahead,
        )
        self.manager.start_if_complete(upload)

    def _chunk(self, data: bytes) -> None:
        if self.stage is not Stage.RECEIVING:
            raise _unexpected("a chunk", "before MsgAck")
        if self.in_flight >= self.config.send_ahead:
            raise UploadError(
                ErrorCode.SEND_AHEAD_EXCEEDED,
                f"more than SendAhead={self.config.send_ahead} chunks unacknowledged",
            )
        assert self.upload is not None
        size = len(data)
        d = self.manager.receive_chunk(self.upload, data)
        self.in_flight += 1

        def stored(_: None) -> None:
            self.in_flight -= 1
            self._send("MsgChunkAck", ChunkSize=size)

        d.addCallbacks(stored, lambda _: None)  # a storage failure arrives as upload_failed

    def _cancel(self, reason: str) -> None:
        """Acknowledged at once; the file's removal and the backend's notice follow."""
        assert self.upload is not None
        try:
            self.manager.cancel_by_frontend(self.upload, reason[:MAX_REASON_CHARS])
        except UploadError as e:
            self.error(e.code, e.message)
            return
        self._send("MsgCancelAck", Ack=True)
        self._close(websocket.NORMAL)

    # Output

    def error(self, code: ErrorCode, text: str) -> None:
        """Tell the browser what went wrong and hang up; the upload stays as it is."""
        log.info(
            "upload {id}: error {code} to browser: {text}",
            id=self._id(),
            code=int(code),
            text=clipped(text),
        )
        self._send("MsgError", ErrorCode=int(code), Msg=text)
        self._close(websocket.POLICY)

    def _internal_error(self, failure: Failure) -> None:
        log.failure("upload {id}: internal error", failure, id=self._id())
        self.error(ErrorCode.INTERNAL_ERROR, "internal server error")

    def _send(self, msg_type: str, **data: Any) -> None:
        if self.connection is not None:
            self.connection.send_text(message(msg_type, **data))

    def _close(self, code: int) -> None:
        self.stage = Stage.ENDED
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
