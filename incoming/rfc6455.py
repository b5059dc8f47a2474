"""RFC 6455, server side: the upgrade, and frames decoded as they stream in.

Why not `twisted.web.websocket`: it assembles whole messages with no size cap
before the application sees them, and wsproto's pure-Python unmasking costs
about 3.7 CPU-seconds per GiB here. This decoder checks a frame's size from
its header (close 1009 before buffering it), keeps the payload's pieces as
they arrive (memory grows with the bytes received, never with the size a
header announces), and unmasks them into the bytes handed on with the
`websockets` package's C function (SIMD; about 20 GB/s here, for 0.4 MB of
memory where numpy cost 11 MB).

Replies (pongs, messages) that the peer does not read pause reading from it:
the connection is its transport's producer, and one that keeps sending while
its replies pile up is dropped. The handler may pause reading too (its disk is
behind); the socket reads again once neither holds it.

The round trip is measured once, end to end (`rtt`): from the `101` response,
followed at once by a ping, to the peer's first bytes after it (the pong, or its
first message if that comes first). Browsers answer pings in their network stack,
not in the page's script, so the pong is not delayed by a busy page.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable
from typing import Protocol

from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from websockets.speedups import apply_mask
from zope.interface import implementer

log = Logger()

READ_SIZE = 256 * 1024
FRAGMENT_COST = 64  # a fragment counts as at least this many bytes: empty ones are not free
MAX_UNREAD_REPLIES = 1024 * 1024  # bytes written while the peer takes none; then it is dropped
RTT_PROBE = b"rtt"  # the payload of the ping that follows the 101 response
CLOSE_WAIT = 5.0  # seconds a peer has to answer our close frame with its own
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA_OPCODES = (CONTINUATION, TEXT, BINARY)
_CONTROL_OPCODES = (CLOSE, PING, PONG)

NORMAL, GOING_AWAY, PROTOCOL_ERROR, INVALID_DATA, POLICY, TOO_BIG = (
    1000,
    1001,
    1002,
    1007,
    1008,
    1009,
)


class MessageHandler(Protocol):
    """The application side of one WebSocket connection."""

    def connected(self, connection: WebSocketConnection) -> None: ...

    def text_received(self, text: str) -> None: ...

    def binary_received(self, data: bytes) -> None: ...

    def message_refused(self, why: str, close_code: int) -> None:
        """A message breaks the framing rules; the connection closes next."""

    def connection_lost(self) -> None: ...


class _Refused(Exception):
    def __init__(self, close_code: int, why: str) -> None:
        super().__init__(why)
        self.close_code = close_code


def frame(opcode: int, payload: bytes) -> bytes:
    """One unfragmented, unmasked frame (what a server sends)."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return header + payload


@implementer(IPushProducer)
class WebSocketConnection(TwistedProtocol):
    """Decodes client frames, answers pings, and drops peers that stay silent."""

    transport: ITCPTransport

    def __init__(
        self,
        handler: MessageHandler,
        clock: IReactorTime,
        timeout: float,
        max_binary: int,
        max_text: int = 64 * 1024,
    ) -> None:
        self.handler = handler
        self._clock = clock
        self._timeout = timeout
        self._max = {BINARY: max_binary, TEXT: max_text}
        self._pending = b""  # an incomplete frame header
        self._in_frame = False  # a header was read; its payload is arriving
        self._parts: list[memoryview] = []  # the payload's pieces so far
        self._size = 0  # the payload's announced size
        self._filled = 0
        self._paused_writes: int | None = None  # bytes written since the peer stopped reading
        self._opcode = 0
        self._fin = True
        self._key = b""
        self._message_opcode = 0  # TEXT or BINARY while a fragmented message runs
        self._fragments: list[bytes] = []
        self._fragments_size = 0
        self.closing = False  # our close frame is sent: nothing more goes to the handler
        self._peer_closed = False  # the peer's close frame came
        self._hang_up: IDelayedCall | None = None
        self._pinged = False
        self._silence: IDelayedCall | None = None
        self._held = False  # the handler paused reading
        self._reading = True
        self._opened_at: float | None = None
        self.rtt: float | None = None  # seconds, once the peer answered the 101

    def connectionMade(self) -> None:
        self.transport.bufferSize = READ_SIZE  # type: ignore[attr-defined]
        IConsumer(self.transport).registerProducer(self, True)
        self._silence = self._clock.callLater(self._timeout / 2, self._on_silence)
        self.handler.connected(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closing = True
        for timer in (self._silence, self._hang_up):
            if timer is not None and timer.active():
                timer.cancel()
        self._parts = []
        self._fragments = []
        self.handler.connection_lost()

    # IPushProducer: the transport tells us when our replies are not being taken.

    def pauseProducing(self) -> None:
        self._paused_writes = 0
        self._read_or_not()

    def resumeProducing(self) -> None:
        self._paused_writes = None
        self._read_or_not()

    def stopProducing(self) -> None:
        self.closing = True

    def _write(self, data: bytes) -> None:
        if self._paused_writes is not None:
            self._paused_writes += len(data)
            if self._paused_writes > MAX_UNREAD_REPLIES:
                log.info("WebSocket peer reads none of its replies; dropping it")
                self.closing = True
                self.transport.abortConnection()
                return
        self.transport.write(data)

    # The handler's back-pressure

    def pause_reading(self) -> None:
        """Read nothing more until `resume_reading` (what was read is still delivered);
        once closing, reading goes on (the peer's close frame is awaited)."""
        if self.closing:
            return
        self._held = True
        self._read_or_not()

    def resume_reading(self) -> None:
        self._held = False
        self._read_or_not()

    def _read_or_not(self) -> None:
        reading = not self._held and self._paused_writes is None
        if reading != self._reading:
            self._reading = reading
            if reading:
                IPushProducer(self.transport).resumeProducing()
            else:
                IPushProducer(self.transport).pauseProducing()

    # Sending

    def opened(self) -> None:
        """The 101 response is written: ping, and time the peer's first answer."""
        self._opened_at = self._clock.seconds()
        self._write(frame(PING, RTT_PROBE))

    def send_text(self, text: str) -> None:
        if not self.closing:
            self._write(frame(TEXT, text.encode("utf-8")))

    def close(self, code: int = NORMAL, reason: str = "") -> None:
        """Send a close frame; hang up once the peer's comes back (RFC 6455 §7.1.1), or
        after CLOSE_WAIT. Meanwhile what the peer still sends is read and dropped: a
        socket closed with bytes unread sends a TCP reset, which may destroy our last
        messages (a MsgError) before the peer has read them."""
        if self.closing:
            return
        self._send_close(code, reason)
        if self._peer_closed:
            self.transport.loseConnection()
            return
        self._hang_up = self._clock.callLater(CLOSE_WAIT, self.transport.loseConnection)
        self._held = False
        self._read_or_not()

    def _fail(self, code: int, reason: str) -> None:
        """The peer broke the framing: what follows cannot be read; close and hang up."""
        if not self.closing:
            self._send_close(code, reason)
        self.transport.loseConnection()

    def _send_close(self, code: int, reason: str) -> None:
        self.closing = True
        payload = struct.pack("!H", code) + reason.encode("utf-8")[:120]
        self._write(frame(CLOSE, payload))

    # Keep-alive

    def _on_silence(self) -> None:
        if self.closing:  # not even its close frame came: hang up (a reset could lose ours)
            self.transport.loseConnection()
            return
        if self._held:  # we read nothing meanwhile (back-pressure): its silence is not known
            self._pinged = False
            self._silence = self._clock.callLater(self._timeout / 2, self._on_silence)
            return
        if self._pinged:
            log.info("WebSocket peer silent for {t:g} s; dropping it", t=self._timeout)
            self.closing = True
            self.transport.abortConnection()
            return
        self._pinged = True
        self._write(frame(PING, b"incoming"))
        self._silence = self._clock.callLater(self._timeout / 2, self._on_silence)

    # Receiving

    def dataReceived(self, data: bytes) -> None:
        if self.rtt is None and self._opened_at is not None:
            self.rtt = self._clock.seconds() - self._opened_at
        self._pinged = False
        if self._silence is not None and self._silence.active():
            self._silence.reset(self._timeout / 2)
        if self._pending:
            data = self._pending + data
            self._pending = b""
        try:
            self._consume(memoryview(data))
        except _Refused as e:
            if not self.closing:
                self.handler.message_refused(str(e), e.close_code)
            self._fail(e.close_code, str(e))

    def _consume(self, view: memoryview) -> None:
        pos, end = 0, len(view)
        while pos < end and not self._peer_closed:
            if not self._in_frame:
                used = self._parse_header(view[pos:])
                if used == 0:
                    self._pending = bytes(view[pos:])
                    return
                pos += used
                if self._in_frame and self._size == 0:
                    self._frame_complete()
                continue
            take = min(end - pos, self._size - self._filled)
            if not (self.closing and self._opcode in _DATA_OPCODES):
                self._parts.append(view[pos : pos + take])
            self._filled += take
            pos += take
            if self._filled == self._size:
                self._frame_complete()

    def _parse_header(self, view: memoryview) -> int:
        """Start a frame from its header; returns the header's size, 0 if incomplete."""
        if len(view) < 2:
            return 0
        first, second = view[0], view[1]
        fin, opcode, size, used = bool(first & 0x80), first & 0x0F, second & 0x7F, 2
        if first & 0x70:
            raise _Refused(PROTOCOL_ERROR, "reserved bits set; no extension was negotiated")
        if not second & 0x80:
            raise _Refused(PROTOCOL_ERROR, "client frames must be masked")
        if opcode in _CONTROL_OPCODES:
            if not fin or size > 125:
                raise _Refused(PROTOCOL_ERROR, "control frames must be whole and short")
        elif opcode not in _DATA_OPCODES:
            raise _Refused(PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if size == 126:
            if len(view) < 4:
                return 0
            (size,) = struct.unpack_from("!H", view, 2)
            used = 4
        elif size == 127:
            if len(view) < 10:
                return 0
            (size,) = struct.unpack_from("!Q", view, 2)
            used = 10
        if opcode in _DATA_OPCODES and not self.closing:  # (closing: skipped unread)
            self._check_data_frame(opcode, size, fin)
        if len(view) < used + 4:
            return 0
        self._opcode, self._fin = opcode, fin
        self._key = bytes(view[used : used + 4])
        self._in_frame, self._size, self._filled = True, size, 0
        return used + 4

    def _check_data_frame(self, opcode: int, size: int, fin: bool) -> None:
        if opcode == CONTINUATION:
            if not self._message_opcode:
                raise _Refused(PROTOCOL_ERROR, "continuation frame without a message")
            kind = self._message_opcode
        elif self._message_opcode:
            raise _Refused(PROTOCOL_ERROR, "new message inside a fragmented one")
        else:
            kind = opcode
        limit = self._max[kind]
        fragment = opcode == CONTINUATION or not fin
        if self._fragments_size + (max(size, FRAGMENT_COST) if fragment else size) > limit:
            raise _Refused(
                TOO_BIG,
                f"message of {self._fragments_size + size} bytes exceeds the limit of {limit}",
            )

    def _frame_complete(self) -> None:
        masked = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        payload, opcode, fin = apply_mask(masked, self._key), self._opcode, self._fin
        self._in_frame, self._parts = False, []
        if self.closing:  # waiting for the peer's close frame; the rest is dropped
            if opcode == CLOSE:
                self._peer_closed = True
                self.transport.loseConnection()
            return
        if opcode == PING:
            self._write(frame(PONG, payload))
        elif opcode == CLOSE:
            self._received_close(payload)
        elif opcode == PONG:
            pass
        elif not fin or self._message_opcode:
            self._fragment(opcode, payload, fin)
        else:
            self._deliver(opcode, payload)

    def _fragment(self, opcode: int, payload: bytes, fin: bool) -> None:
        if opcode != CONTINUATION:
            self._message_opcode = opcode
        if payload:
            self._fragments.append(payload)
        self._fragments_size += max(len(payload), FRAGMENT_COST)
        if fin:
            opcode, whole = self._message_opcode, b"".join(self._fragments)
            self._message_opcode, self._fragments, self._fragments_size = 0, [], 0
            self._deliver(opcode, whole)

    def _deliver(self, opcode: int, payload: bytes) -> None:
        if opcode == BINARY:
            self.handler.binary_received(payload)
            return
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused(INVALID_DATA, "text message is not valid UTF-8") from None
        self.handler.text_received(text)

    def _received_close(self, payload: bytes) -> None:
        """Echo a valid close; answer a malformed one (RFC 6455 §5.5.1, §7.1.6, §7.4)."""
        self._peer_closed = True
        if not payload:
            self.close(NORMAL)
            return
        code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 0
        if not _valid_close_code(code):  # a one-byte payload has no code at all
            self.close(PROTOCOL_ERROR)
            return
        try:
            payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            self.close(INVALID_DATA)
            return
        self.close(code)


def _valid_close_code(code: int) -> bool:
    """Codes a peer may send: the defined ones (not 1004-1006, 1015) and 3000-4999."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode()


class WebSocketResource(Resource):
    """Upgrades a GET to a WebSocket served by a new `MessageHandler`."""

    isLeaf = True

    def __init__(
        self,
        make_handler: Callable[[Request], MessageHandler],
        clock: IReactorTime,
        timeout: float,
        max_binary: int,
        allowed_origins: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self._make_handler = make_handler
        self._clock = clock
        self._timeout = timeout
        self._max_binary = max_binary
        self._allowed_origins = allowed_origins

    def render_GET(self, request: Request) -> bytes | int:
        header = request.getHeader
        key = header("sec-websocket-key") or ""
        problem = None
        if (header("upgrade") or "").lower() != "websocket" or "upgrade" not in {
            token.strip().lower() for token in (header("connection") or "").split(",")
        }:
            problem = "this URL takes only WebSocket connections"
        elif header("sec-websocket-version") != "13":
            request.setResponseCode(426)
            request.setHeader("sec-websocket-version", "13")
            request.setHeader("content-type", "text/plain; charset=utf-8")
            return b"WebSocket version 13 required"
        elif not _valid_key(key):
            problem = "bad Sec-WebSocket-Key"
        # Browsers always send Origin; other clients can claim any, so only browsers are bound.
        origin = (header("origin") or "").lower().rstrip("/")
        if (
            problem is None
            and origin
            and self._allowed_origins
            and origin not in self._allowed_origins
        ):
            request.setResponseCode(403)
            request.setHeader("content-type", "text/plain; charset=utf-8")
            return b"this Origin may not upload here"
        if problem is not None:
            request.setResponseCode(400)
            request.setHeader("content-type", "text/plain; charset=utf-8")
            return problem.encode()
        connection = WebSocketConnection(
            self._make_handler(request), self._clock, self._timeout, self._max_binary
        )
        transport = request.channel.transport
        assert transport is not None
        IConsumer(
            transport
        ).unregisterProducer()  # the HTTP channel was its producer; the connection is now
        request.channel._protocolUpgradeForWebsockets(connection)
        transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n\r\n"
        )
        connection.opened()
        return NOT_DONE_YET


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False
