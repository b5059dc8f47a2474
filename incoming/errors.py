"""Numbered errors that reach clients (docs/reference/errors.rst lists them), and how
much of a client's own text may reach the log."""

from __future__ import annotations

import enum

MAX_LOGGED_CHARS = 200


class ErrorCode(enum.IntEnum):
    """`MsgError` codes sent to the browser."""

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
    NOT_WAITING = 17  # finish_upload for an upload that is not waiting for it
    STORAGE_FAILED = 20  # the disk failed, permissions... (upload cancelled)
    INSUFFICIENT_STORAGE = 21  # LengthBytes exceeds the free space
    TOO_LARGE = 22  # LengthBytes exceeds the configured MaxUploadBytes
    REGISTRY_UNAVAILABLE = 23  # cluster mode: Redis is unreachable; try again
    STORAGE_FULL = 24  # no space left: nothing acknowledged is lost; resume later
    STORE_UNAVAILABLE = 25  # the object store does not take bytes: nothing acknowledged lost
    HANDOVER_FAILED = 30  # the backend did not take the file (upload cancelled)
    INTERNAL_ERROR = 99


class UploadError(Exception):
    """A rule was broken; `code` says which, `message` says it to a person."""

    def __init__(self, code: ErrorCode, message: str, result: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.result = result  # TICKET_FINISHED: the backend's verdict, for a returning client


def clipped(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """Client-supplied text as it may appear in a log line: short."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"
