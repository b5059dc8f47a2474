"""RFC 6455 framing: limits, close codes, fragmentation and keep-alive."""

from __future__ import annotations

import json
import os
import socket
import struct

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from incoming import rfc6455
from incoming.errors import ErrorCode

from .harness import Backend, Server


def client_frame(
    opcode: int, payload: bytes, fin: bool = True, mask: bytes = b"\x01\x02\x03\x04"
) -> bytes:
    """A masked frame as a browser sends it."""
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        header = struct.pack("!BB", first, 0x80 | size)
    elif size < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def connected(self, connection: rfc6455.WebSocketConnection) -> None:
        self.events.append(("connected", None))

    def text_received(self, text: str) -> None:
        self.events.append(("text", text))

    def binary_received(self, data: bytearray) -> None:
        self.events.append(("binary", bytes(data)))

    def message_refused(self, why: str, close_code: int) -> None:
        self.events.append(("refused", close_code))

    def connection_lost(self) -> None:
        self.events.append(("lost", None))


def make(
    max_binary: int = 1000, timeout: float = 10
) -> tuple[rfc6455.WebSocketConnection, Recorder, StringTransport, Clock]:
    recorder, clock, transport = Recorder(), Clock(), StringTransport()
    connection = rfc6455.WebSocketConnection(recorder, clock, timeout, max_binary)
    connection.makeConnection(transport)
    return connection, recorder, transport, clock


def close_code(written: bytes) -> int:
    """The status code of the close frame at the end of what the server wrote."""
    index = written.rindex(b"\x88")
    return int(struct.unpack_from("!H", written, index + 2)[0])


@pytest.mark.parametrize("size", [0, 1, 3, 4, 17, 125, 126, 1000, 65536, 70001])
def test_binary_frames_of_every_length_encoding_arrive_unmasked(size: int) -> None:
    connection, recorder, _, _ = make(max_binary=max(size, 1))
    payload = os.urandom(size)
    connection.dataReceived(client_frame(rfc6455.BINARY, payload, mask=os.urandom(4)))
    assert recorder.events[-1] == ("binary", payload)


def test_frames_split_at_every_byte_boundary_are_reassembled() -> None:
    connection, recorder, _, _ = make()
    stream = client_frame(rfc6455.TEXT, "héllo".encode()) + client_frame(
        rfc6455.BINARY, b"\x00" * 300
    )
    for i in range(len(stream)):
        connection.dataReceived(stream[i : i + 1])
    assert recorder.events[1:] == [("text", "héllo"), ("binary", b"\x00" * 300)]


def test_fragmented_messages_with_interleaved_ping() -> None:
    connection, recorder, transport, _ = make()
    connection.dataReceived(
        client_frame(rfc6455.BINARY, b"ab", fin=False)
        + client_frame(rfc6455.PING, b"p")
        + client_frame(rfc6455.CONTINUATION, b"cd", fin=True)
    )
    assert recorder.events[-1] == ("binary", b"abcd")
    assert transport.value() == rfc6455.frame(rfc6455.PONG, b"p")


def test_oversized_frame_is_refused_from_its_header() -> None:
    connection, recorder, transport, _ = make(max_binary=1000)
    header = client_frame(rfc6455.BINARY, b"x" * 1001)[:8]  # header + mask, no payload
    connection.dataReceived(header)
    assert ("refused", rfc6455.TOO_BIG) in recorder.events
    assert close_code(transport.value()) == rfc6455.TOO_BIG
    assert transport.disconnecting


def test_fragments_count_towards_the_limit() -> None:
    connection, recorder, transport, _ = make(max_binary=1000)
    connection.dataReceived(client_frame(rfc6455.BINARY, b"x" * 600, fin=False))
    connection.dataReceived(client_frame(rfc6455.CONTINUATION, b"x" * 600)[:8])
    assert close_code(transport.value()) == rfc6455.TOO_BIG


def test_empty_fragments_are_not_free() -> None:
    """A message of endless empty fragments holds no memory and ends at the limit."""
    connection, recorder, transport, _ = make(max_binary=4096)
    connection.dataReceived(client_frame(rfc6455.BINARY, b"", fin=False))
    for _ in range(4096 // rfc6455.FRAGMENT_COST - 1):
        connection.dataReceived(client_frame(rfc6455.CONTINUATION, b"", fin=False))
    assert not transport.disconnecting
    connection.dataReceived(client_frame(rfc6455.CONTINUATION, b"", fin=False))
    assert close_code(transport.value()) == rfc6455.TOO_BIG


@pytest.mark.parametrize(
    "frame_bytes, code",
    [
        (client_frame(rfc6455.TEXT, b"\xff\xfe"), rfc6455.INVALID_DATA),
        (client_frame(rfc6455.BINARY, b"x")[:1] + b"\x01x", rfc6455.PROTOCOL_ERROR),  # unmasked
        (
            bytes([0x80 | 0x40 | rfc6455.BINARY]) + client_frame(rfc6455.BINARY, b"x")[1:],
            rfc6455.PROTOCOL_ERROR,
        ),  # reserved bit
        (client_frame(0x3, b"x"), rfc6455.PROTOCOL_ERROR),  # unknown opcode
        (client_frame(rfc6455.CONTINUATION, b"x"), rfc6455.PROTOCOL_ERROR),
        (client_frame(rfc6455.PING, b"x", fin=False), rfc6455.PROTOCOL_ERROR),
    ],
)
def test_broken_frames_close_with_their_code(frame_bytes: bytes, code: int) -> None:
    connection, recorder, transport, _ = make()
    connection.dataReceived(frame_bytes)
    assert ("refused", code) in recorder.events
    assert close_code(transport.value()) == code
    assert [e for e in recorder.events if e[0] in ("text", "binary")] == []


def test_close_frame_is_answered_and_connection_dropped() -> None:
    connection, _, transport, _ = make()
    connection.dataReceived(client_frame(rfc6455.CLOSE, struct.pack("!H", 1001)))
    assert close_code(transport.value()) == 1001
    assert transport.disconnecting


@pytest.mark.parametrize(
    "payload, answer",
    [
        (b"", 1000),  # no code: a normal close
        (struct.pack("!H", 3000) + "bye é".encode(), 3000),  # an application's code, echoed
        (b"\x03", 1002),  # one byte cannot hold a code (RFC 6455 §5.5.1)
        (struct.pack("!H", 1000) + b"\xff\xfe", 1007),  # the reason is not UTF-8 (§7.1.6)
        (struct.pack("!H", 1005), 1002),  # never sent on the wire (§7.4.1)
        (struct.pack("!H", 999), 1002),
        (struct.pack("!H", 2000), 1002),
    ],
)
def test_close_frames_are_echoed_or_refused(payload: bytes, answer: int) -> None:
    connection, recorder, transport, _ = make()
    connection.dataReceived(client_frame(rfc6455.CLOSE, payload))
    assert close_code(transport.value()) == answer
    assert transport.disconnecting
    assert ("text", None) not in recorder.events


def test_our_close_waits_for_the_peers_reading_and_dropping_what_it_still_sends() -> None:
    """Hanging up with bytes unread sends a TCP reset, which can destroy the MsgError
    before it: so the socket is read (even if the handler had paused it) until the
    peer's close frame comes."""
    connection, recorder, transport, _ = make()
    connection.pause_reading()
    assert transport.producerState == "paused"
    connection.send_text("last words")
    connection.close(rfc6455.POLICY)
    assert close_code(transport.value()) == rfc6455.POLICY
    assert transport.producerState == "producing" and not transport.disconnecting
    connection.dataReceived(client_frame(rfc6455.BINARY, b"x" * 500))
    connection.dataReceived(client_frame(rfc6455.TEXT, b'{"MsgType":"MsgAck"}'))
    connection.dataReceived(client_frame(rfc6455.PING, b"p"))
    assert not transport.disconnecting
    assert [e for e in recorder.events if e[0] in ("text", "binary")] == []
    written = transport.value()
    connection.dataReceived(client_frame(rfc6455.CLOSE, struct.pack("!H", 1000)))
    assert transport.disconnecting
    assert transport.value() == written  # no pong, no second close frame


def test_our_close_in_the_middle_of_a_fragmented_message_skips_what_follows() -> None:
    """What the peer sends after our close is skipped unread, whatever it is (a new
    message inside a fragmented one, a frame past the size limit), until its close."""
    connection, recorder, transport, _ = make(max_binary=1000)
    connection.dataReceived(client_frame(rfc6455.BINARY, b"x" * 600, fin=False))
    connection.close(rfc6455.POLICY)
    connection.dataReceived(client_frame(rfc6455.BINARY, b"y" * 100))
    connection.dataReceived(client_frame(rfc6455.BINARY, b"z" * 5000))
    assert not transport.disconnecting
    assert ("refused", rfc6455.TOO_BIG) not in recorder.events
    connection.dataReceived(client_frame(rfc6455.CLOSE, b""))
    assert transport.disconnecting
    assert [e for e in recorder.events if e[0] in ("text", "binary")] == []


def test_our_close_hangs_up_after_close_wait_without_the_peers() -> None:
    connection, _, transport, clock = make(timeout=60)
    connection.close(rfc6455.POLICY)
    clock.advance(rfc6455.CLOSE_WAIT - 0.1)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting
    connection.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_silent_peer_is_pinged_then_dropped_within_the_timeout() -> None:
    connection, _, transport, clock = make(timeout=10)
    clock.advance(5)
    assert transport.value() == rfc6455.frame(rfc6455.PING, b"incoming")
    assert not transport.disconnecting
    clock.advance(5)
    assert transport.disconnecting  # abortConnection on a StringTransport


def test_a_peer_is_not_dropped_as_silent_while_we_do_not_read_it() -> None:
    """Back-pressure (the disk, the object store) holds our reading: the pongs wait unread
    in the kernel, so the peer's silence cannot be told until we read again."""
    connection, _, transport, clock = make(timeout=10)
    connection.pause_reading()
    clock.advance(30)
    assert not transport.disconnecting
    connection.resume_reading()
    clock.advance(5)  # reading again: pinged,
    assert not transport.disconnecting
    clock.advance(5)  # and silent: dropped
    assert transport.disconnecting


def test_a_peer_that_answers_pings_stays() -> None:
    connection, _, transport, clock = make(timeout=10)
    for _ in range(10):
        clock.advance(5)
        connection.dataReceived(client_frame(rfc6455.PONG, b"incoming"))
    assert not transport.disconnecting


def test_timer_stops_when_connection_is_lost() -> None:
    connection, recorder, _, clock = make(timeout=10)
    connection.connectionLost(None)
    assert recorder.events[-1] == ("lost", None)
    assert clock.getDelayedCalls() == []


def handshake(port: int, path: str = "/incoming/frontend/upload_ws") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 101")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in answer
    return s


def read_all(s: socket.socket) -> bytes:
    received = b""
    while chunk := s.recv(65536):
        received += chunk
    return received


@pytest_twisted.ensureDeferred
async def test_oversized_frame_over_loopback_gets_msgerror_and_1009(
    server: Server, backend: Backend
) -> None:
    ticket = await server.new_upload(backend.url)

    def talk() -> bytes:
        with handshake(server.port) as s:
            request = {"Id": ticket, "LengthBytes": 99999999, "Name": "n"}
            text = json.dumps({"MsgType": "MsgUploadReq", "MsgData": request})
            s.sendall(client_frame(rfc6455.TEXT, text.encode()))
            s.sendall(client_frame(rfc6455.TEXT, b'{"MsgType":"MsgAck","MsgData":{"Ack":true}}'))
            # announce 100 MiB but send only the header: the server must not wait for it
            s.sendall(struct.pack("!BBQ", 0x82, 0xFF, 100 << 20) + b"mask")
            return read_all(s)

    written = await threads.deferToThread(talk)
    assert b'"MsgType":"MsgUploadConf"' in written
    assert b'"ErrorCode":%d' % ErrorCode.FRAME_TOO_LARGE in written
    assert close_code(written) == rfc6455.TOO_BIG
    upload = server.manager.get(ticket)
    assert upload is not None and upload.stored == 0 and not upload.phase.final


@pytest.mark.parametrize(
    "headers, status",
    [
        ("", b"400"),
        (
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            b"426",
        ),
        (
            "Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: short\r\n",
            b"400",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_upgrade_requests_are_refused(
    server: Server, headers: str, status: bytes
) -> None:
    def talk() -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(
                f"GET /incoming/0.1/frontend/upload_ws HTTP/1.1\r\nHost: x\r\n{headers}"
                "\r\n".encode()
            )
            return s.recv(4096)

    answer = await threads.deferToThread(talk)
    assert answer.split(b" ")[1] == status


def test_half_sent_http_requests_are_dropped_at_the_timeout() -> None:
    """Slowloris: a connection that never finishes its request does not stay forever."""
    from twisted.internet.address import IPv4Address
    from twisted.web.resource import Resource

    from incoming.site import IncomingSite

    clock = Clock()
    site = IncomingSite(Resource(), max_body=1024, timeout=58, reactor=clock)
    slow = [site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1000 + n)) for n in range(100)]
    transports = []
    for channel in slow:
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /incoming/frontend/upload_ws HTTP/1.1\r\nHost: x\r\nX-")
        transports.append(transport)
    clock.advance(57)
    assert not any(t.disconnecting for t in transports)
    clock.advance(1)
    assert all(t.disconnecting for t in transports)
