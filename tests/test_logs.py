"""What the log says of an upload (issue 16): one line per event that means something to
an operator, in words that say what happened; nothing for a request that ended normally."""

from __future__ import annotations

import base64
import os
import re

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from .harness import (
    CHUNK_KB,
    SEND_AHEAD,
    Backend,
    Server,
    acked_upload,
    complete_upload,
    log_line,
    send_all,
    upload_request,
)

CHUNK = CHUNK_KB * 1024
TUS = {"Tus-Resumable": "1.0.0"}
STREAM = {**TUS, "Content-Type": "application/offset+octet-stream"}


def events(log: list[str], ticket: str) -> list[str]:
    """The upload's lines, each without `upload <ticket> ` and figures after `at` or `:`."""
    found = []
    for line in log:
        if line.startswith(f"upload {ticket} "):
            found.append(re.split(r" at |: ", line.removeprefix(f"upload {ticket} "))[0])
    return found


async def created(server: Server, ticket: str, length: int) -> None:
    encoded = base64.b64encode(ticket.encode()).decode()
    response = await treq.post(
        f"{server.base}/tus/",
        headers={**TUS, "Upload-Length": str(length), "Upload-Metadata": f"ticket {encoded}"},
    )
    assert response.code == 201


async def patched(server: Server, ticket: str, offset: int, body: bytes) -> int:
    response = await treq.request(
        "PATCH", f"{server.base}/tus/{ticket}", data=body,
        headers={**STREAM, "Upload-Offset": str(offset)},
    )  # fmt: skip
    await response.content()
    code: int = response.code
    return code


@pytest_twisted.ensureDeferred
async def test_a_tus_upload_in_several_patches_logs_started_complete_finished(
    server: Server, backend: Backend, server_log: list[str]
) -> None:
    data = os.urandom(4 * CHUNK)
    ticket = await server.new_upload(backend.url)
    await created(server, ticket, len(data))
    for offset in range(0, len(data), CHUNK):
        assert await patched(server, ticket, offset, data[offset : offset + CHUNK]) == 204
    await server.settled()
    assert events(server_log, ticket) == [
        "started over tus",
        "complete",
        "handed over and finished",
    ]
    assert f"upload {ticket} started over tus: '', {len(data)} bytes" in server_log
    # treq's connection pool says nothing of the handover's connection
    assert [line for line in server_log if f"127.0.0.1:{backend.port}>" in line] == []


class CutShort(Protocol):
    """A PATCH whose client goes away after `sent` bytes of its body."""

    def __init__(self, ticket: str, length: int, sent: bytes) -> None:
        self.request = (
            f"PATCH /incoming/tus/{ticket} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Tus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\n"
            f"Upload-Offset: 0\r\nContent-Length: {length}\r\n\r\n"
        ).encode() + sent

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)
        self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_patch_cut_short_is_an_interruption_and_the_next_one_resumes(
    server: Server, backend: Backend, server_log: list[str]
) -> None:
    data = os.urandom(3 * CHUNK)
    ticket = await server.new_upload(backend.url)
    await created(server, ticket, len(data))
    with log_line(f"upload {ticket} interrupted") as interrupted:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
        await connectProtocol(endpoint, CutShort(ticket, len(data), data[:1000]))
        await interrupted.addTimeout(10, reactor)
    assert await patched(server, ticket, 1000, data[1000:]) == 204
    await server.settled()
    assert events(server_log, ticket) == [
        "started over tus",
        "interrupted",
        "resumed",
        "complete",
        "handed over and finished",
    ]
    assert f"upload {ticket} interrupted at 1000 of {len(data)} bytes" in server_log
    assert f"upload {ticket} resumed at 1000 of {len(data)} bytes over tus" in server_log


@pytest_twisted.ensureDeferred
async def test_a_websocket_upload_logs_pauses_and_interruptions(
    server: Server, backend: Backend, server_log: list[str]
) -> None:
    data = os.urandom(3 * CHUNK)
    ticket, client, _ = await acked_upload(server, backend.url, len(data))
    await send_all(client, data[:CHUNK], CHUNK, SEND_AHEAD)
    with log_line(f"upload {ticket} paused") as paused:
        client.send("MsgPause")
        client.close()
        await paused.addTimeout(10, reactor)
    client, _ = await upload_request(server, ticket, len(data))
    client.send("MsgAck", Ack=True)
    await send_all(client, data[CHUNK : 2 * CHUNK], CHUNK, SEND_AHEAD)
    with log_line(f"upload {ticket} interrupted") as interrupted:
        client.close()  # without MsgPause: the tab was closed, the network went...
        await interrupted.addTimeout(10, reactor)
    client, _ = await upload_request(server, ticket, len(data))
    await complete_upload(client, data[2 * CHUNK :], CHUNK, SEND_AHEAD)
    await server.settled()
    assert events(server_log, ticket) == [
        "started over websocket",
        "paused",
        "resumed",
        "interrupted",
        "resumed",
        "complete",
        "handed over and finished",
    ]
    n = len(data)
    assert f"upload {ticket} paused at {CHUNK} of {n} bytes" in server_log
    assert f"upload {ticket} interrupted at {2 * CHUNK} of {n} bytes" in server_log
    assert f"upload {ticket} resumed at {2 * CHUNK} of {n} bytes over websocket" in server_log


@pytest_twisted.ensureDeferred
async def test_a_cancel_says_who_and_why_in_one_line(
    server: Server, backend: Backend, server_log: list[str]
) -> None:
    ticket, client, _ = await acked_upload(server, backend.url, 3 * CHUNK)
    await send_all(client, b"c" * CHUNK, CHUNK, SEND_AHEAD)
    client.send("MsgCancel", Reason="wrong file")
    await client.expect("MsgCancelAck")
    await server.settled()
    assert events(server_log, ticket) == ["started over websocket", "cancelled (by_client)"]
    assert f"upload {ticket} cancelled (by_client): wrong file" in server_log
