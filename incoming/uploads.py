"""Upload state and the rules every upload obeys: pure, no I/O, no clock.

The edges (WebSocket sessions, backend routes, disk, handover) ask this module
whether a step is allowed and record the step here; they do the I/O.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

MAX_LOGGED_CHARS = 200


def clipped(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """Client-supplied text as it may appear in a log line: short."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


class ErrorCode(enum.IntEnum):
    """`MsgError` codes sent to the browser; the README lists them."""

    MALFORMED_MESSAGE = 1  # not JSON, MsgData not an object, a field of the wrong type
    UNKNOWN_MESSAGE_TYPE = 2
    UNEXPECTED_MESSAGE = 3  # out of order: e.g. a chunk before MsgAck, text before MsgUploadReq
    BAD_TICKET_ID = 4  # Id missing or not a string
    BAD_LENGTH = 5  # LengthBytes missing, not an integer, or negative
    FRAME_TOO_LARGE = 6  # a frame larger than the chunk size (closed with 1009)
    SEND_AHEAD_EXCEEDED = 7  # more unacknowledged chunks than SendAhead
    NO_UPLOAD_REQUEST = 8  # no MsgUploadReq within WebsocketConnectionTimeoutS
    UNKNOWN_TICKET = 10
    TICKET_FINISHED = 11
    TICKET_CANCELLED = 12
    ALREADY_CONNECTED = 13  # another live connection serves this ticket
    LENGTH_MISMATCH = 14  # LengthBytes differs from the first connection's
    PAST_END = 15  # a chunk would grow the file past LengthBytes (upload cancelled)
    TOO_LATE = 16  # cancel while the handover runs or after it
    STORAGE_FAILED = 20  # disk full, permissions... (upload cancelled)
    INSUFFICIENT_STORAGE = 21  # LengthBytes exceeds the free space
    HANDOVER_FAILED = 30  # the backend did not take the file (upload cancelled)
    INTERNAL_ERROR = 99


class UploadError(Exception):
    """A rule was broken; `code` says which, `message` says it to a person."""

    def __init__(self, code: ErrorCode, message: str, cancels: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.cancels = cancels


class Phase(enum.Enum):
    RECEIVING = "receiving"  # bytes may arrive
    HANDOVER = "handover"  # all bytes stored; the backend is being told
    AWAITING_FINISH = "awaiting_finish"  # the backend answered `wait`
    FINISHED = "finished"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (Phase.FINISHED, Phase.CANCELLED)


class Session(Protocol):
    """What the upload needs of the browser connection that serves it."""

    def upload_cancelled(self, reason: str) -> None: ...

    def upload_failed(self, code: ErrorCode, message: str) -> None: ...

    def upload_done(self) -> None: ...

    def going_away(self) -> None:
        """The server is shutting down; the browser should resume later."""


@dataclass(eq=False)
class Upload:
    """One ticket and everything known about it."""

    id: str
    signal_finish_url: str
    backend_secret: str
    remove_file_when_finished: bool
    length: int | None = None  # set by the first MsgUploadReq
    browser_name: str = ""
    stored: int = 0  # bytes on disk, contiguous from the start
    received: int = 0  # bytes accepted from the browser (stored or being written)
    phase: Phase = Phase.RECEIVING
    cancel_reason: str = ""
    idle_deadline: float = 0.0  # clock time when an idle upload expires (or is forgotten)
    confirm_deadline: float | None = None  # clock time by which finish_upload must come
    session: Session | None = field(default=None, repr=False)

    _RECORDED = (
        "id",
        "signal_finish_url",
        "backend_secret",
        "remove_file_when_finished",
        "length",
        "browser_name",
        "cancel_reason",
        "idle_deadline",
        "confirm_deadline",
    )

    def to_record(self) -> dict[str, Any]:
        """What survives a restart; the stored byte count is read from the file itself."""
        record = {name: getattr(self, name) for name in self._RECORDED}
        record["phase"] = self.phase.value
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any], stored: int) -> Upload:
        values = {name: record[name] for name in cls._RECORDED}
        upload = cls(**values, phase=Phase(record["phase"]), stored=stored, received=stored)
        if upload.length is not None and stored > upload.length:
            raise ValueError(f"{stored} bytes stored for a {upload.length}-byte upload")
        return upload

    @property
    def complete(self) -> bool:
        return self.length is not None and self.stored == self.length

    def check_connect(self, length: int) -> None:
        """May a new connection announcing `length` bytes serve this upload?"""
        if self.phase is Phase.FINISHED:
            raise UploadError(ErrorCode.TICKET_FINISHED, "this upload is already finished")
        if self.phase is Phase.CANCELLED:
            raise UploadError(
                ErrorCode.TICKET_CANCELLED,
                f"this upload was cancelled: {self.cancel_reason}",
            )
        if self.session is not None:
            raise UploadError(
                ErrorCode.ALREADY_CONNECTED, "another connection is serving this upload"
            )
        if self.length is not None and self.length != length:
            raise UploadError(
                ErrorCode.LENGTH_MISMATCH,
                f"LengthBytes {length} differs from the {self.length} given before",
            )

    def connect(self, session: Session, length: int, browser_name: str) -> None:
        self.check_connect(length)
        if self.length is None:
            self.length = length
            self.browser_name = browser_name
        self.session = session

    def disconnect(self, session: Session) -> None:
        if self.session is session:
            self.session = None

    def accept_chunk(self, size: int) -> None:
        """Record `size` more bytes from the browser, not yet written."""
        if self.phase is not Phase.RECEIVING:
            raise UploadError(ErrorCode.UNEXPECTED_MESSAGE, "no more bytes are expected")
        assert self.length is not None
        if self.received + size > self.length:
            raise UploadError(
                ErrorCode.PAST_END,
                f"chunk of {size} bytes at {self.received} would grow the file "
                f"past LengthBytes {self.length}",
                cancels=True,
            )
        self.received += size

    def chunk_stored(self, size: int) -> None:
        self.stored += size
        assert self.stored <= self.received

    def start_handover(self) -> None:
        assert self.complete and self.phase is Phase.RECEIVING
        self.phase = Phase.HANDOVER

    def await_finish(self) -> None:
        assert self.phase is Phase.HANDOVER
        self.phase = Phase.AWAITING_FINISH

    def check_finish_upload(self) -> None:
        """May the backend's `finish_upload` end this upload now?"""
        if self.phase is not Phase.AWAITING_FINISH:
            raise UploadError(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"upload is {self.phase.value}, not waiting for finish_upload",
            )

    def finish(self) -> None:
        assert self.phase in (Phase.HANDOVER, Phase.AWAITING_FINISH)
        self.phase = Phase.FINISHED

    def check_cancel(self) -> None:
        """May somebody other than the server itself cancel this upload now?"""
        if self.phase is Phase.CANCELLED:
            raise UploadError(ErrorCode.TICKET_CANCELLED, "this upload is already cancelled")
        if self.phase is not Phase.RECEIVING:
            raise UploadError(
                ErrorCode.TOO_LATE, f"upload is {self.phase.value}; too late to cancel"
            )

    def cancel(self, reason: str) -> None:
        assert not self.phase.final
        self.phase = Phase.CANCELLED
        self.cancel_reason = reason


class Registry:
    """All tickets the server knows, by id."""

    def __init__(self) -> None:
        self._uploads: dict[str, Upload] = {}

    def create(
        self, signal_finish_url: str, backend_secret: str, remove_file_when_finished: bool
    ) -> Upload:
        upload = Upload(
            id=str(uuid.uuid4()),
            signal_finish_url=signal_finish_url,
            backend_secret=backend_secret,
            remove_file_when_finished=remove_file_when_finished,
        )
        self._uploads[upload.id] = upload
        return upload

    def add(self, upload: Upload) -> None:
        self._uploads[upload.id] = upload

    def get(self, upload_id: str) -> Upload | None:
        return self._uploads.get(upload_id)

    def forget(self, upload: Upload) -> None:
        self._uploads.pop(upload.id, None)

    def __iter__(self) -> Iterator[Upload]:
        return iter(list(self._uploads.values()))

    def __len__(self) -> int:
        return len(self._uploads)
