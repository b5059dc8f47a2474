"""tus 1.0 over loopback (SPEC: HTTP upload transport): the protocol, refusals and bounds."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import deferLater

from incoming.config import Config
from incoming.errors import ErrorCode

from .fakes import MemoryStorage
from .harness import CHUNK_KB, SEND_AHEAD, Backend, Server, acked_upload, serving, start_server

CHUNK = CHUNK_KB * 1024
TUS = {"Tus-Resumable": "1.0.0"}
OFFSET_STREAM = "application/offset+octet-stream"


def metadata(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


async def create(server: Server, ticket: str, length: int, **headers: str) -> Any:
    return await treq.post(
        f"{server.base}/tus/",
        headers={**TUS, "Upload-Length": str(length),
                 "Upload-Metadata": metadata(ticket=ticket, filename="photo.jpg"), **headers},
    )  # fmt: skip


async def patch(server: Server, ticket: str, offset: int, body: bytes, **headers: str) -> Any:
    return await treq.request(
        "PATCH",
        f"{server.base}/tus/{ticket}",
        data=body,
        headers={**TUS, "Content-Type": OFFSET_STREAM, "Upload-Offset": str(offset), **headers},
    )


async def head(server: Server, ticket: str) -> Any:
    return await treq.head(f"{server.base}/tus/{ticket}", headers=TUS)


def header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


async def created(server: Server, backend: Backend, length: int, **params: str) -> str:
    ticket = await server.new_upload(backend.url, **params)
    response = await create(server, ticket, length)
    assert response.code == 201, await response.text()
    return ticket


@pytest_twisted.ensureDeferred
async def test_options_describe_the_server(server: Server) -> None:
    response = await treq.request(
        "OPTIONS",
        f"{server.base}/tus/",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "PATCH"},
    )
    assert response.code == 204
    assert header(response, "Tus-Version") == "1.0.0"
    assert header(response, "Tus-Extension") == (
        "creation,creation-with-upload,creation-defer-length,termination,expiration,checksum,"
        "concatenation"
    )
    assert header(response, "Tus-Checksum-Algorithm") == "sha1,sha256"
    assert header(response, "Tus-Max-Size") is None  # no limit configured
    assert header(response, "Access-Control-Allow-Origin") == "*"
    assert "PATCH" in (header(response, "Access-Control-Allow-Methods") or "")
    assert "Upload-Offset" in (header(response, "Access-Control-Allow-Headers") or "")


@pytest.mark.parametrize("prefix", ["/incoming", "/incoming/0.1"])
@pytest_twisted.ensureDeferred
async def test_create_patch_and_hand_over(server: Server, backend: Backend, prefix: str) -> None:
    data = os.urandom(3 * CHUNK + 5)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    url = f"http://127.0.0.1:{server.port}{prefix}/tus/"
    response = await treq.post(
        url,
        headers={**TUS, "Upload-Length": str(len(data)), "Origin": "https://app.example",
                 "Upload-Metadata": metadata(ticket=ticket, filename="../../etc/x")},
    )  # fmt: skip
    assert response.code == 201
    assert header(response, "Location") == f"{prefix}/tus/{ticket}"
    assert header(response, "Upload-Offset") == "0"
    assert header(response, "Tus-Resumable") == "1.0.0"
    assert "Location" in (header(response, "Access-Control-Expose-Headers") or "")
    assert header(response, "Upload-Expires")
    first = await patch(server, ticket, 0, data[:CHUNK])
    assert (first.code, header(first, "Upload-Offset")) == (204, str(CHUNK))
    probe = await head(server, ticket)
    assert (probe.code, header(probe, "Upload-Offset")) == (200, str(CHUNK))
    assert header(probe, "Upload-Length") == str(len(data))
    assert header(probe, "Cache-Control") == "no-store"
    assert backend.posts.pending == []
    last = await patch(server, ticket, CHUNK, data[CHUNK:])
    assert (last.code, header(last, "Upload-Offset")) == (204, str(len(data)))
    post = backend.posts.pending[0]  # the final PATCH was answered after the handover
    assert (post["id"], post["filenameFromBrowser"], post["size"]) == (
        ticket,
        "../../etc/x",
        str(len(data)),
    )
    assert server.files() == {ticket: data}
    finished = await head(server, ticket)
    assert header(finished, "Upload-Offset") == str(len(data))  # complete, for a reloaded page


@pytest_twisted.ensureDeferred
async def test_creation_refusals(server: Server, backend: Backend) -> None:
    ticket = await server.new_upload(backend.url)
    unknown = await create(server, "7e6a8b8e-0a0a-4a0a-8a0a-0a0a0a0a0a0a", 5)
    assert unknown.code == 404
    no_version = await treq.post(f"{server.base}/tus/", headers={"Upload-Length": "5"})
    assert (no_version.code, header(no_version, "Tus-Version")) == (412, "1.0.0")
    for bad in ({"Upload-Length": "-1"}, {"Upload-Length": "x"}, {"Upload-Metadata": "ticket"}):
        response = await treq.post(
            f"{server.base}/tus/",
            headers={**TUS, "Upload-Length": "5", "Upload-Metadata": metadata(ticket=ticket),
                     **bad},
        )  # fmt: skip
        assert response.code == 400, bad
    missing = await treq.post(f"{server.base}/tus/", headers={**TUS, "Upload-Length": "5"})
    assert missing.code == 400
    assert (await create(server, ticket, 5)).code == 201
    again = await create(server, ticket, 5)  # a reloaded page creates again
    assert (again.code, header(again, "Upload-Offset")) == (201, "0")
    other = await create(server, ticket, 6)
    assert other.code == 409  # LENGTH_MISMATCH


@pytest_twisted.ensureDeferred
async def test_finished_and_cancelled_uploads_are_gone(server: Server, backend: Backend) -> None:
    done = await created(server, backend, 1)
    assert (await patch(server, done, 0, b"x")).code == 204
    assert (await create(server, done, 1)).code == 410
    assert (await patch(server, done, 0, b"x")).code in (409, 410)
    cancelled = await created(server, backend, 10, backendSecret="k")
    response = await treq.post(
        f"{server.base}/backend/cancel_upload", data={"id": cancelled, "backendSecret": "k"}
    )
    assert response.code == 200
    assert (await head(server, cancelled)).code == 410
    assert (await create(server, cancelled, 10)).code == 410
    assert (await patch(server, cancelled, 0, b"x")).code == 410
    unknown = await head(server, "7e6a8b8e-0a0a-4a0a-8a0a-0a0a0a0a0a0a")
    assert unknown.code == 404


@pytest_twisted.ensureDeferred
async def test_patch_refusals_leave_the_upload_as_it_was(server: Server, backend: Backend) -> None:
    ticket = await created(server, backend, 10)
    assert (await patch(server, ticket, 0, b"abcd")).code == 204
    mismatch = await patch(server, ticket, 2, b"zz")
    assert (mismatch.code, header(mismatch, "Upload-Offset")) == (409, "4")
    for offset in ("-1", "x", ""):
        response = await treq.request(
            "PATCH", f"{server.base}/tus/{ticket}", data=b"zz",
            headers={**TUS, "Content-Type": OFFSET_STREAM, "Upload-Offset": offset},
        )  # fmt: skip
        assert response.code in (400, 409), offset
    untyped = await treq.request(
        "PATCH", f"{server.base}/tus/{ticket}", data=b"zz",
        headers={**TUS, "Upload-Offset": "4"},
    )  # fmt: skip
    assert untyped.code == 415
    too_long = await patch(server, ticket, 4, b"0123456789")  # would pass Upload-Length
    assert too_long.code == 413
    assert header(await head(server, ticket), "Upload-Offset") == "4"
    assert (server.storage_dir / f"{ticket}.part").read_bytes() == b"abcd"
    assert (await patch(server, ticket, 4, b"efghij")).code == 204
    assert backend.posts.pending[0]["size"] == "10"


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
@pytest_twisted.ensureDeferred
async def test_checksums(server: Server, backend: Backend, algorithm: str) -> None:
    data = os.urandom(2 * CHUNK + 3)
    ticket = await created(server, backend, len(data), removeFileWhenFinished="false")
    good = base64.b64encode(hashlib.new(algorithm, data[:CHUNK]).digest()).decode()
    ok = await patch(server, ticket, 0, data[:CHUNK], **{"Upload-Checksum": f"{algorithm} {good}"})
    assert (ok.code, header(ok, "Upload-Offset")) == (204, str(CHUNK))
    bad = base64.b64encode(hashlib.new(algorithm, b"other").digest()).decode()
    wrong = await patch(
        server, ticket, CHUNK, data[CHUNK:], **{"Upload-Checksum": f"{algorithm} {bad}"}
    )
    assert wrong.code == 460
    assert header(await head(server, ticket), "Upload-Offset") == str(CHUNK)  # nothing stored
    assert (server.storage_dir / f"{ticket}.part").read_bytes() == data[:CHUNK]
    assert backend.posts.pending == []  # the last bytes failed their check: no handover
    unknown = await patch(server, ticket, CHUNK, b"x", **{"Upload-Checksum": "md5 AAAA"})
    assert unknown.code == 400
    good = base64.b64encode(hashlib.new(algorithm, data[CHUNK:]).digest()).decode()
    last = await patch(
        server, ticket, CHUNK, data[CHUNK:], **{"Upload-Checksum": f"{algorithm} {good}"}
    )
    assert last.code == 204
    assert server.files() == {ticket: data}


@pytest_twisted.ensureDeferred
async def test_creation_with_upload(server: Server, backend: Backend) -> None:
    data = os.urandom(CHUNK + 1)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    part = await create(server, ticket, len(data) + 7, **{"Content-Type": OFFSET_STREAM})
    assert part.code == 201  # no body: an ordinary creation
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    response = await treq.post(
        f"{server.base}/tus/",
        data=data,
        headers={**TUS, "Upload-Length": str(len(data)), "Content-Type": OFFSET_STREAM,
                 "Upload-Metadata": metadata(ticket=ticket, filename="all.bin")},
    )  # fmt: skip
    assert response.code == 201
    assert header(response, "Upload-Offset") == str(len(data))
    assert header(response, "Location") == f"/incoming/tus/{ticket}"
    assert backend.posts.pending[-1]["filenameFromBrowser"] == "all.bin"
    assert server.files()[ticket] == data


@pytest_twisted.ensureDeferred
async def test_a_zero_byte_upload_is_handed_over_at_its_creation(
    server: Server, backend: Backend
) -> None:
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    response = await create(server, ticket, 0)
    assert (response.code, header(response, "Upload-Offset")) == (201, "0")
    assert backend.posts.pending[0]["size"] == "0"
    assert server.files() == {ticket: b""}
    zeros = await server.new_upload(backend.url, removeFileWhenFinished="false")
    response = await treq.post(  # `00` is as much a zero as `0`
        f"{server.base}/tus/",
        headers={**TUS, "Upload-Length": "00", "Upload-Metadata": metadata(ticket=zeros)},
    )
    assert response.code == 201
    assert backend.posts.pending[1]["id"] == zeros


@pytest_twisted.ensureDeferred
async def test_a_failed_handover_fails_the_final_patch(server: Server, backend: Backend) -> None:
    backend.answer = b"internal details"
    ticket = await created(server, backend, 3)
    response = await patch(server, ticket, 0, b"abc")
    assert response.code == 502
    assert "internal" not in await response.text()
    await server.settled()
    assert (await head(server, ticket)).code == 410  # cancelled
    assert server.files() == {}


@pytest_twisted.ensureDeferred
async def test_termination(server: Server, backend: Backend) -> None:
    ticket = await created(server, backend, 10, backendSecret="k")
    assert (await patch(server, ticket, 0, b"abc")).code == 204
    deleted = await treq.delete(f"{server.base}/tus/{ticket}", headers=TUS)
    assert deleted.code == 204
    assert server.files() == {}
    notice = await backend.posts.get()
    assert (notice["id"], notice["cancelled"], notice["backendSecret"]) == (ticket, "yes", "k")
    assert (await treq.delete(f"{server.base}/tus/{ticket}", headers=TUS)).code == 410
    backend.answer = b"wait"
    waiting = await created(server, backend, 1)
    assert (await patch(server, waiting, 0, b"x")).code == 204
    too_late = await treq.delete(f"{server.base}/tus/{waiting}", headers=TUS)
    assert too_late.code == 412


@pytest_twisted.ensureDeferred
async def test_method_override(server: Server, backend: Backend) -> None:
    ticket = await created(server, backend, 2, removeFileWhenFinished="false")
    response = await treq.post(
        f"{server.base}/tus/{ticket}",
        data=b"ok",
        headers={**TUS, "X-HTTP-Method-Override": "PATCH", "Content-Type": OFFSET_STREAM,
                 "Upload-Offset": "0"},
    )  # fmt: skip
    assert response.code == 204
    assert server.files() == {ticket: b"ok"}


@pytest_twisted.ensureDeferred
async def test_a_patch_is_locked_out_while_a_websocket_writes(
    server: Server, backend: Backend
) -> None:
    ticket, client, _ = await acked_upload(server, backend.url, 2 * CHUNK)
    locked = await patch(server, ticket, 0, b"x" * CHUNK)
    assert locked.code == 423
    client.send_chunk(b"w" * CHUNK)
    await client.expect("MsgChunkAck")
    client.close()
    await client.closed
    await server.settled()
    probe = await head(server, ticket)
    assert header(probe, "Upload-Offset") == str(CHUNK)
    assert (await patch(server, ticket, CHUNK, b"p" * CHUNK)).code == 204


@pytest_twisted.ensureDeferred
async def test_max_upload_size_applies_to_both_transports(config: Config, backend: Backend) -> None:
    limited = dataclasses.replace(config, max_upload_bytes=1000)
    async with serving(limited) as server:
        options = await treq.request("OPTIONS", f"{server.base}/tus/")
        assert header(options, "Tus-Max-Size") == "1000"
        ticket = await server.new_upload(backend.url)
        assert (await create(server, ticket, 1001)).code == 413
        from .harness import connect

        client = await connect(server.ws_url())
        client.send("MsgUploadReq", Id=ticket, LengthBytes=1001, Name="big")
        await client.expect_error(ErrorCode.TOO_LARGE)
        assert (await create(server, ticket, 1000)).code == 201


@pytest_twisted.ensureDeferred
async def test_origins_outside_the_allow_list_are_refused(config: Config, backend: Backend) -> None:
    allowed = dataclasses.replace(config, allowed_origins=frozenset({"https://app.example"}))
    async with serving(allowed) as server:
        ticket = await server.new_upload(backend.url)
        evil = await create(server, ticket, 3, Origin="https://evil.example")
        assert evil.code == 403
        fine = await create(server, ticket, 3, Origin="https://app.example")
        assert fine.code == 201
        assert header(fine, "Access-Control-Allow-Origin") == "https://app.example"
        assert header(fine, "Vary") == "Origin"


# Bodies as they stream


def raw_patch(port: int, ticket: str, offset: int, head_lines: str, chunks: list[bytes]) -> bytes:
    """Send a PATCH by hand (a chunked or lying body) and return the server's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(
            f"PATCH /incoming/tus/{ticket} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: {OFFSET_STREAM}\r\nUpload-Offset: {offset}\r\n{head_lines}\r\n".encode()
        )
        for chunk in chunks:
            s.sendall(chunk)
        answer = b""
        while b"\r\n\r\n" not in answer and (more := s.recv(65536)):
            answer += more
        return answer


@pytest_twisted.ensureDeferred
async def test_a_chunked_body_past_upload_length_is_refused_whole(
    server: Server, backend: Backend
) -> None:
    ticket = await created(server, backend, 10, removeFileWhenFinished="false")
    assert (await patch(server, ticket, 0, b"ab")).code == 204
    body = b"6\r\ncdefgh\r\n" + b"8\r\nijklmnop\r\n" + b"0\r\n\r\n"
    answer = await threads.deferToThread(
        raw_patch, server.port, ticket, 2, "Transfer-Encoding: chunked\r\n", [body]
    )
    assert answer.startswith(b"HTTP/1.1 413")
    await server.settled()
    assert header(await head(server, ticket), "Upload-Offset") == "2"  # none of it stands
    assert server.files() == {f"{ticket}.part": b"ab"}
    assert backend.posts.pending == []  # and no handover of a file cut at the length


@pytest_twisted.ensureDeferred
async def test_bytes_that_arrived_before_the_connection_broke_are_kept(
    server: Server, backend: Backend
) -> None:
    data = os.urandom(5 * CHUNK + 7)
    ticket = await created(server, backend, 2 * len(data), removeFileWhenFinished="false")

    def send_and_drop() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
            s.sendall(
                f"PATCH /incoming/tus/{ticket} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                f"Content-Type: {OFFSET_STREAM}\r\nUpload-Offset: 0\r\n"
                f"Content-Length: {2 * len(data)}\r\n\r\n".encode()
                + data
            )  # half of the promised body, then the connection breaks

    await threads.deferToThread(send_and_drop)
    upload = server.manager.get(ticket)
    assert upload is not None
    await eventually(lambda: upload.received == len(data) and upload.transport is None)
    probe = await head(server, ticket)
    assert header(probe, "Upload-Offset") == str(len(data))
    assert (server.storage_dir / f"{ticket}.part").read_bytes() == data


async def eventually(condition: Any, timeout: float = 10) -> None:
    """Wait (polling the reactor) until `condition()` holds."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition never held")


class SlowDisk(MemoryStorage):
    """Storage whose writes land only when the test lets them."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[Deferred[None], Any]] = []

    def write(
        self, upload_id: str, offset: int, data: Any, digests: Any = (), hashed: bool = True
    ) -> Deferred[None]:
        landed: Deferred[None] = Deferred()
        self.held.append((landed, lambda: super(SlowDisk, self).write(upload_id, offset, data)))
        return landed

    def land(self) -> None:
        while self.held:
            landed, write = self.held.pop(0)
            write()
            landed.callback(None)

    def drain(self, upload_id: str) -> Deferred[None]:
        return succeed(None) if not self.held else Deferred()


@pytest_twisted.async_yield_fixture
async def slow_server(config: Config) -> AsyncIterator[tuple[Server, SlowDisk]]:
    disk = SlowDisk()
    s, port, pool = await start_server(config, disk)
    yield s, disk
    await port.stopListening()
    disk.land()
    await ensureDeferred(s.manager.shutdown())
    pool.stop()


@pytest_twisted.ensureDeferred
async def test_the_socket_is_paused_while_writes_queue_up(
    slow_server: tuple[Server, SlowDisk], backend: Backend
) -> None:
    """A slow disk stops the server reading a PATCH body: memory stays bounded."""
    server, disk = slow_server
    size = 64 * 1024 * 1024
    ticket = await created(server, backend, size, removeFileWhenFinished="false")
    upload = server.manager.get(ticket)
    assert upload is not None
    sent: list[int] = []

    def push() -> bytes:
        block = b"z" * (1024 * 1024)
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(
                f"PATCH /incoming/tus/{ticket} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                f"Content-Type: {OFFSET_STREAM}\r\nUpload-Offset: 0\r\n"
                f"Content-Length: {size}\r\n\r\n".encode()
            )
            s.settimeout(2)  # the server stops reading: our sends stall
            try:
                while sum(sent) < size:
                    sent.append(s.send(block))
            except TimeoutError:
                pass
            return b""

    pushing = threads.deferToThread(push)
    await eventually(lambda: upload.pending_bytes > 0)
    await pushing
    # what waits for the disk: at most the window, or one socket read past it
    assert 0 < upload.pending_bytes <= CHUNK * SEND_AHEAD + 256 * 1024
    assert sum(sent) < 32 * 1024 * 1024  # kernel buffers; the rest was never read


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_reads_its_answer_changes_nothing(
    server: Server, backend: Backend
) -> None:
    ticket = await created(server, backend, 3, removeFileWhenFinished="false")

    def send_and_never_read() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(
            f"PATCH /incoming/tus/{ticket} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: {OFFSET_STREAM}\r\nUpload-Offset: 0\r\nContent-Length: 3\r\n\r\n"
            "abc".encode()
        )
        return s

    quiet = await threads.deferToThread(send_and_never_read)
    try:
        post = await backend.posts.get()
        assert (post["id"], post["size"]) == (ticket, "3")
        await server.settled()
        assert server.files() == {ticket: b"abc"}
        upload = server.manager.get(ticket)
        assert upload is not None and upload.transport is None  # answered, let go
    finally:
        quiet.close()


def test_a_patch_body_that_stalls_is_dropped_at_the_timeout(tmp_path: Any) -> None:
    """Slowloris: a PATCH whose body stops coming is cut at the site's timeout; the
    bytes that came are kept."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    from incoming.manager import UploadManager
    from incoming.metrics import Metrics
    from incoming.service import build_site

    from .fakes import RecordingHandover

    clock, storage = Clock(), MemoryStorage()
    manager = UploadManager(
        storage, RecordingHandover(), clock, Metrics(), max_idle=3600, confirm_timeout=60
    )
    config = Config(chunk_size_kb=CHUNK_KB, send_ahead=SEND_AHEAD, ws_timeout=58)
    upload = ensureDeferred(manager.create("http://b/h", "", False)).result
    upload.life.declare(100_000, "slow.bin", manager.room())
    site = build_site(manager, config, clock)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    transport = StringTransport()
    channel.makeConnection(transport)
    head_lines = (
        f"PATCH /incoming/tus/{upload.id} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: {OFFSET_STREAM}\r\nUpload-Offset: 0\r\nContent-Length: 100000\r\n\r\n"
    )
    channel.dataReceived(head_lines.encode() + b"s" * 5000)
    assert upload.transport is not None
    clock.advance(57)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting
    channel.connectionLost(Failure(ConnectionDone()))
    assert upload.transport is None
    assert bytes(storage.parts[upload.id]) == b"s" * 5000


def test_a_refused_body_stays_refused_when_its_client_hangs_up() -> None:
    """A body past Upload-Length is refused whole even when the client hangs up before
    the refused body's writes have landed: none of it stands, no handover starts."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    from incoming.manager import UploadManager
    from incoming.metrics import Metrics
    from incoming.service import build_site
    from incoming.upload import Phase

    from .fakes import RecordingHandover

    clock, disk, handover = Clock(), SlowDisk(), RecordingHandover()
    manager = UploadManager(disk, handover, clock, Metrics(), max_idle=3600, confirm_timeout=60)
    config = Config(chunk_size_kb=CHUNK_KB, send_ahead=SEND_AHEAD, ws_timeout=58)
    upload = ensureDeferred(manager.create("http://b/h", "", False)).result
    upload.life.declare(2 * CHUNK, "full.bin", manager.room())
    channel = build_site(manager, config, clock).buildProtocol(
        IPv4Address("TCP", "127.0.0.1", 1234)
    )
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(
        f"PATCH /incoming/tus/{upload.id} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: {OFFSET_STREAM}\r\nUpload-Offset: 0\r\n"
        f"Transfer-Encoding: chunked\r\n\r\n{2 * CHUNK:x}\r\n".encode()
        + b"f" * (2 * CHUNK)
        + b"\r\n1\r\n!\r\n"  # one byte past Upload-Length
    )
    assert len(disk.held) == 1 and transport.value() == b""  # refused once its write lands
    channel.connectionLost(Failure(ConnectionDone()))
    disk.land()
    assert (upload.stored, upload.phase, upload.transport) == (0, Phase.RECEIVING, None)
    assert handover.handovers == []
    assert bytes(disk.parts[upload.id]) == b""


@pytest_twisted.ensureDeferred
async def test_a_body_of_many_tiny_chunks_is_written_whole(
    config: Config, backend: Backend
) -> None:
    """1,100 chunks of 100 bytes, within one 512 KiB write: more than a pwritev takes."""
    async with serving(dataclasses.replace(config, chunk_size_kb=512)) as server:
        data = os.urandom(1100 * 100)
        ticket = await created(server, backend, len(data), removeFileWhenFinished="false")
        body = b"".join(b"64\r\n" + data[i : i + 100] + b"\r\n" for i in range(0, len(data), 100))
        answer = await threads.deferToThread(
            raw_patch, server.port, ticket, 0, "Transfer-Encoding: chunked\r\n",
            [body + b"0\r\n\r\n"],
        )  # fmt: skip
        assert answer.startswith(b"HTTP/1.1 204")
        assert server.files() == {ticket: data}


@pytest_twisted.ensureDeferred
async def test_a_body_past_upload_length_is_refused_before_it_ends(
    server: Server, backend: Backend
) -> None:
    ticket = await created(server, backend, 10, removeFileWhenFinished="false")

    def overflow_and_wait() -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
            s.sendall(
                f"PATCH /incoming/tus/{ticket} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                f"Content-Type: {OFFSET_STREAM}\r\nUpload-Offset: 0\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
                + b"14\r\n"
                + b"o" * 20
                + b"\r\n"  # fmt: skip
            )  # and the body goes on (no last chunk): the answer must not wait for its end
            return s.recv(4096)

    answer = await threads.deferToThread(overflow_and_wait)
    assert answer.startswith(b"HTTP/1.1 413")
    assert header(await head(server, ticket), "Upload-Offset") == "0"


@pytest_twisted.ensureDeferred
async def test_head_while_the_handover_runs_waits_for_the_backends_answer(
    server: Server, backend: Backend
) -> None:
    """A tus client that sees every byte stored takes the upload as done: so HEAD says so
    only once the backend has answered."""
    ticket = await created(server, backend, 3, removeFileWhenFinished="false")
    backend.hold = True
    patching = ensureDeferred(patch(server, ticket, 0, b"abc"))
    await backend.posts.get()  # the handover runs
    probing = ensureDeferred(head(server, ticket))
    await eventually(lambda: server.manager._answers.get(ticket))  # it waits
    assert not probing.called
    backend.answer = b"done\nok"
    backend.release()
    probe = await probing
    assert header(probe, "Upload-Offset") == "3"
    assert header(probe, "Incoming-Result") == "ok"
    assert (await patching).code == 204
