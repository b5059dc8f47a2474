"""tus clients against the real daemon (SPEC: HTTP upload transport: tus 1.0).

tus-js-client runs under Node (`tests/tus_client.mjs`, a subprocess printing JSON
events), tuspy in a thread; the rules no client breaks on purpose are checked with
raw requests (treq). The backend is the harness's, in this process.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from tusclient import client as tus_client
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.web.client import UNKNOWN_LENGTH
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from .harness import (
    CHUNK_KB,
    ROOT,
    SEND_AHEAD,
    Backend,
    Server,
    acked_upload,
    send_all,
    start_daemon,
    stop_daemon,
)

MiB = 1024 * 1024
CHUNK = CHUNK_KB * 1024
NODE = shutil.which("node") or "node"
CLIENT = ROOT / "tests" / "tus_client.mjs"
# The daemon's defaults (512 KiB x 4 in flight) for the large files; the harness's
# 4 KiB chunks are for the many-chunk WebSocket tests.
LARGE = ("--chunk-size-kb", "512", "--send-ahead", "4")
RETRY = [100, 250, 500, 1000, 1000, 2000, 2000, 4000]  # ms: covers a daemon's restart
TUS = {"Tus-Resumable": "1.0.0"}


@pytest.fixture(autouse=True)
def node_modules() -> None:
    if not (ROOT / "node_modules" / "tus-js-client").is_dir():
        pytest.fail("tus-js-client is missing: `make node_modules/.installed` (npm ci) first")


def random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def metadata(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


# tus-js-client under Node


class NodeClient(ProcessProtocol):
    """`node tests/tus_client.mjs OPTIONS`: its JSON events as they come, and its end."""

    def __init__(self, timeout: float) -> None:
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self._line = b""
        self._waiting: list[tuple[str, Deferred[dict[str, Any]]]] = []
        self.ended: Deferred[list[dict[str, Any]]] = Deferred()
        self._guard = reactor.callLater(timeout, self._too_long)  # type: ignore[attr-defined]

    def outReceived(self, data: bytes) -> None:
        *lines, self._line = (self._line + data).split(b"\n")
        for line in lines:
            event = json.loads(line)
            self.events.append(event)
            for name, d in list(self._waiting):
                if event["event"] == name:
                    self._waiting.remove((name, d))
                    d.callback(event)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def event(self, name: str) -> Deferred[dict[str, Any]]:
        """Fires with the first event called `name` (at once if it came already)."""
        d: Deferred[dict[str, Any]] = Deferred()
        seen = [e for e in self.events if e["event"] == name]
        if seen:
            d.callback(seen[0])
        else:
            self._waiting.append((name, d))
        return d

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    def _too_long(self) -> None:
        self.transport.signalProcess(signal.SIGKILL)  # type: ignore[union-attr]

    def processEnded(self, reason: Any) -> None:
        if self._guard.active():
            self._guard.cancel()
        if not self.events or self.events[-1]["event"] != "end":
            self.ended.errback(
                RuntimeError(
                    f"tus_client.mjs: {reason.value}\n{self.stderr.decode()}\n{self.events}"
                )
            )
        else:
            self.ended.callback(self.events)


def tus_js(
    server: Server, uploads: list[dict[str, Any]], timeout: float = 60, **options: Any
) -> NodeClient:
    """Starts tus-js-client on `uploads` ({file, metadata}) against the server's endpoint."""
    options = {"endpoint": f"{server.base}/tus/", "uploads": uploads, **options}
    client = NodeClient(timeout)
    command = [NODE, str(CLIENT), json.dumps({**options, "uploads": [
        {**u, "file": str(u["file"])} for u in uploads]})]  # fmt: skip
    reactor.spawnProcess(client, NODE, command, env=dict(os.environ), path=str(ROOT))  # type: ignore[attr-defined]
    return client


async def size_reaches(path: Path, size: int, timeout: float = 30) -> int:
    """Polls a file's size until it reaches `size`; returns the size seen."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            seen = path.stat().st_size
        except FileNotFoundError:
            seen = 0
        if seen >= size:
            return seen
        assert time.monotonic() < deadline, f"{path} stayed at {seen} bytes"
        await deferLater(reactor, 0.005)


async def restart_on(port: int, storage: Path, cwd: Path, stopper: list[Any], *extra: str) -> Any:
    """The daemon again, on the same storage and port (tus clients resume at its URL)."""
    return await start_daemon(
        storage, cwd, stopper, *extra, "--listen", f"tcp:{port}:interface=127.0.0.1"
    )


def assert_one_handover(
    post: dict[str, str], ticket: str, stored: Path, name: str, data: bytes
) -> None:
    """The handover of `data`: its size and SHA-256, whatever restarts came between."""
    assert (post["id"], post["cancelled"], post["filenameFromBrowser"]) == (ticket, "no", name)
    assert (post["filename"], post["size"]) == (str(stored), str(len(data)))
    assert post["sha256"] == hashlib.sha256(data).hexdigest()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "chunk_size, with_creation",
    [(None, False), (1 * MiB, False), (1 * MiB, True)],
    ids=["one-patch", "1MiB-chunks", "creation-with-upload"],
)
async def test_tus_js_client_uploads_with_the_ticket_and_the_backend_has_it_first(
    tmp_path: Path,
    backend: Backend,
    stopper: list[Any],
    chunk_size: int | None,
    with_creation: bool,
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper, *LARGE)
    data = random_file(tmp_path / "photo.jpg", 3 * MiB + 123)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false", backendSecret="k")
    backend.hold = True  # the final PATCH must wait for the backend's answer
    client = tus_js(server, [{"file": tmp_path / "photo.jpg",
                              "metadata": {"ticket": ticket, "filename": "Ferien 2024.jpg"}}],
                    chunkSize=chunk_size, uploadDataDuringCreation=with_creation)  # fmt: skip
    post = await backend.posts.get()
    assert_one_handover(post, ticket, storage / ticket, "Ferien 2024.jpg", data)
    assert post["backendSecret"] == "k"
    assert (storage / ticket).read_bytes() == data  # complete when the backend is asked
    await deferLater(reactor, 0.3)
    assert client.named("success") == []  # not before the backend has answered
    backend.release()
    events = await client.ended
    [created] = client.named("created")
    assert created["url"] == f"{server.base}/tus/{ticket}"
    [success] = client.named("success")
    assert (success["status"], success["offset"]) == (204, str(len(data)))
    assert client.named("retry") == [] and events[-1]["ok"] is True
    if chunk_size:
        assert [c["accepted"] for c in client.named("chunk")] == [MiB, 2 * MiB, 3 * MiB, len(data)]
    assert len(backend.posts.pending) == 0
    head = await treq.head(created["url"], headers=TUS)
    assert head.headers.getRawHeaders("upload-offset") == [str(len(data))]  # finished: complete
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_tus_js_client_resumes_after_the_daemon_is_sigkilled_mid_patch(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper, *LARGE)
    size = 64 * MiB
    data = random_file(tmp_path / "big.bin", size)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    client = tus_js(server, [{"file": tmp_path / "big.bin",
                              "metadata": {"ticket": ticket, "filename": "big.bin"}}],
                    retryDelays=RETRY, rate=128 * MiB)  # one PATCH of ~0.5 s  # fmt: skip
    part = storage / f"{ticket}.part"
    await size_reaches(part, 8 * MiB)
    await daemon.kill(process)
    kept = part.stat().st_size
    assert 8 * MiB <= kept < size  # killed while the PATCH streamed
    assert part.read_bytes() == data[:kept]  # what was stored is intact
    assert client.named("success") == [] and client.named("chunk") == []
    assert len(backend.posts.pending) == 0

    daemon, process, server = await restart_on(server.port, storage, tmp_path, stopper, *LARGE)
    events = await client.ended
    assert events[-1]["ok"] is True, events
    retries = client.named("retry")
    assert retries and all(r["status"] == 0 and r["retry"] for r in retries)  # connection errors
    [chunk] = client.named("chunk")
    assert chunk["size"] == size - kept  # resumed where the server's HEAD said, sent the rest
    post = await backend.posts.get()
    assert_one_handover(post, ticket, storage / ticket, "big.bin", data)
    assert (storage / ticket).read_bytes() == data
    assert not part.exists()
    await stop_daemon(daemon, process)
    assert len(backend.posts.pending) == 0  # exactly one handover, up to the daemon's end


@pytest_twisted.ensureDeferred
async def test_tus_js_client_creating_again_after_a_reload_resumes_through_a_409(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper, *LARGE)
    data = random_file(tmp_path / "again.bin", 2 * MiB + 1)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    assert (await create(server, ticket, len(data), name="again.bin")).code == 201
    assert (await patch(f"{server.base}/tus/{ticket}", 0, data[:MiB]))[0] == 204
    # A reloaded page knows only the ticket: it creates again (the same Location), then
    # sends from 0, gets 409, asks HEAD and goes on from the stored offset.
    client = tus_js(server, [{"file": tmp_path / "again.bin",
                              "metadata": {"ticket": ticket, "filename": "again.bin"}}],
                    retryDelays=RETRY)  # fmt: skip
    events = await client.ended
    assert events[-1]["ok"] is True, events
    assert client.named("created")[0]["url"] == f"{server.base}/tus/{ticket}"
    # 409, or a broken pipe: the server answers before the body is in and hangs up, and
    # Node's http client may fail on writing the rest before it reads the answer
    [retry] = client.named("retry")
    assert retry["status"] in (409, 0) and retry["retry"], retry
    assert [c["size"] for c in client.named("chunk")] == [MiB + 1]  # only the rest was sent
    post = await backend.posts.get()
    assert_one_handover(post, ticket, storage / ticket, "again.bin", data)
    assert (storage / ticket).read_bytes() == data
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_tus_js_client_termination_cancels_the_upload(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper, *LARGE)
    random_file(tmp_path / "gone.bin", 32 * MiB)
    ticket = await server.new_upload(backend.url, backendSecret="k")
    client = tus_js(server, [{"file": tmp_path / "gone.bin", "metadata": {"ticket": ticket}}],
                    abortAfter=4 * MiB, retryDelays=RETRY)  # fmt: skip
    events = await client.ended
    assert [e["event"] for e in events] == ["created", "aborted", "end"], events
    assert 4 * MiB <= events[1]["sent"] < 32 * MiB
    notice = await backend.posts.get()
    assert (notice["id"], notice["cancelled"], notice["backendSecret"]) == (ticket, "yes", "k")
    assert notice["filename"] == ""
    assert not (storage / f"{ticket}.part").exists() and not (storage / ticket).exists()
    head = await treq.head(f"{server.base}/tus/{ticket}", headers=TUS)
    assert head.code == 410
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_tus_js_client_gets_404_and_410_for_unknown_finished_and_cancelled_tickets(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    random_file(tmp_path / "f.bin", 1000)
    finished = await server.new_upload(backend.url)
    client = tus_js(server, [{"file": tmp_path / "f.bin", "metadata": {"ticket": finished}}])
    assert (await client.ended)[-1]["ok"] is True
    assert (await backend.posts.get())["cancelled"] == "no"
    cancelled = await server.new_upload(backend.url, backendSecret="k")
    assert (await create(server, cancelled, 1000)).code == 201
    assert (await patch(f"{server.base}/tus/{cancelled}", 0, b"z" * 10))[0] == 204
    response = await treq.post(f"{server.base}/backend/cancel_upload",
                               data={"id": cancelled, "backendSecret": "k"})  # fmt: skip
    assert response.code == 200
    assert not (storage / f"{cancelled}.part").exists()

    tickets = {"unknown": "5d2f3a5e-0000-4000-8000-000000000000", "finished": finished,
               "cancelled": cancelled}  # fmt: skip
    client = tus_js(server, [{"file": tmp_path / "f.bin", "metadata": {"ticket": t}}
                             for t in tickets.values()], retryDelays=RETRY)  # fmt: skip
    events = await client.ended
    errors = {e["upload"]: e for e in client.named("error")}
    assert [errors[i]["status"] for i in range(3)] == [404, 410, 410], events
    assert not [r for r in client.named("retry") if r["retry"]]  # 4xx: no retries

    no_ticket = await treq.post(f"{server.base}/tus/", headers={**TUS, "Upload-Length": "10",
                                "Upload-Metadata": metadata(filename="x")})  # fmt: skip
    assert no_ticket.code == 400
    for name, ticket in tickets.items():
        url = f"{server.base}/tus/{ticket}"
        head = await treq.head(url, headers=TUS)
        patched = await treq.request("PATCH", url, data=b"x", headers={**TUS,
            "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})  # fmt: skip
        await patched.content()
        if name == "unknown":
            assert (head.code, patched.code) == (404, 404)
        elif name == "finished":
            assert head.code == 200 and head.headers.getRawHeaders("upload-offset") == ["1000"]
            assert patched.code == 410
        else:
            assert (head.code, patched.code) == (410, 410)
    await stop_daemon(daemon, process)
    assert len(backend.posts.pending) == 0  # a backend's own cancel is not echoed


@pytest_twisted.ensureDeferred
async def test_tus_js_client_retries_423_while_a_websocket_writes_then_takes_over(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    data = random_file(tmp_path / "both.bin", 10 * CHUNK + 7)
    ticket, ws, conf = await acked_upload(
        server, backend.url, len(data), removeFileWhenFinished="false"
    )
    await send_all(ws, data[: 3 * CHUNK], CHUNK, SEND_AHEAD)
    client = tus_js(server, [{"file": tmp_path / "both.bin",
                              "metadata": {"ticket": ticket, "filename": "both.bin"}}],
                    retryDelays=[200] * 20)  # fmt: skip
    locked = await client.event("retry")
    assert (locked["status"], locked["retry"]) == (423, True)
    assert len(backend.posts.pending) == 0
    ws.close()
    await ws.closed
    events = await client.ended
    assert events[-1]["ok"] is True, events
    post = await backend.posts.get()
    assert (post["id"], post["cancelled"], post["size"]) == (ticket, "no", str(len(data)))
    assert (storage / ticket).read_bytes() == data
    await stop_daemon(daemon, process)


# The rules, with raw requests


async def create(server: Server, ticket: str, length: int, name: str = "") -> Any:
    meta = metadata(ticket=ticket, filename=name) if name else metadata(ticket=ticket)
    headers = {"Upload-Length": str(length), "Upload-Metadata": meta}
    response = await treq.post(f"{server.base}/tus/", headers={**TUS, **headers})
    await response.content()
    return response


async def patch(url: str, offset: int, body: Any, **headers: str) -> tuple[int, Any, str]:
    response = await treq.request("PATCH", url, data=body, headers={**TUS,
        "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream",
        **headers})  # fmt: skip
    return response.code, response.headers, await response.text()


def checksum(algorithm: str, data: bytes) -> str:
    return f"{algorithm} {base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"


async def offset_of(url: str) -> int:
    head = await treq.head(url, headers=TUS)
    assert head.code == 200, head.code
    return int(head.headers.getRawHeaders("upload-offset")[0])


@pytest_twisted.ensureDeferred
async def test_checksum_mismatch_is_460_and_stores_nothing(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    data = os.urandom(3 * CHUNK + 5)
    first, second, rest = data[:CHUNK], data[CHUNK : 2 * CHUNK + 1], data[2 * CHUNK + 1 :]
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    assert (await create(server, ticket, len(data))).code == 201
    url = f"{server.base}/tus/{ticket}"
    part = storage / f"{ticket}.part"
    code, headers, _ = await patch(url, 0, first, **{"Upload-Checksum": checksum("sha256", first)})
    assert code == 204 and headers.getRawHeaders("upload-offset") == [str(CHUNK)]
    wrong = {"Upload-Checksum": checksum("sha1", b"not the body")}
    code, _, text = await patch(url, CHUNK, second, **wrong)
    assert code == 460, text
    assert await offset_of(url) == CHUNK
    assert part.read_bytes() == first  # the mismatching body's bytes are gone
    code, _, text = await patch(url, CHUNK, second, **{"Upload-Checksum": "md5 AAAA"})
    assert code == 400 and await offset_of(url) == CHUNK  # an algorithm it does not offer
    code, _, _ = await patch(url, CHUNK, second, **{"Upload-Checksum": checksum("sha1", second)})
    assert code == 204
    code, _, _ = await patch(
        url, 2 * CHUNK + 1, rest, **{"Upload-Checksum": checksum("sha256", rest)}
    )
    assert code == 204
    post = await backend.posts.get()
    assert (post["id"], post["cancelled"], post["size"]) == (ticket, "no", str(len(data)))
    assert (storage / ticket).read_bytes() == data
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_a_final_patch_failing_its_checksum_hands_nothing_over(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    assert (await create(server, ticket, 100)).code == 201
    url = f"{server.base}/tus/{ticket}"
    assert (await patch(url, 0, b"a" * 60))[0] == 204
    wrong = {"Upload-Checksum": checksum("sha1", b"not the body")}
    assert (await patch(url, 60, b"b" * 40, **wrong))[0] == 460
    try:
        assert await offset_of(url) == 60  # the 460 came after the bytes were voided
        assert len(backend.posts.pending) == 0  # and no handover of 60 bytes as complete
        good = {"Upload-Checksum": checksum("sha1", b"b" * 40)}
        assert (await patch(url, 60, b"b" * 40, **good))[0] == 204
        assert (storage / ticket).read_bytes() == b"a" * 60 + b"b" * 40
    finally:
        await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_offset_mismatch_is_409_and_changes_nothing(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    assert (await create(server, ticket, 100)).code == 201
    url = f"{server.base}/tus/{ticket}"
    assert (await patch(url, 0, b"a" * 40))[0] == 204
    for wrong in (0, 39, 41, 100):
        code, headers, _ = await patch(url, wrong, b"b" * 10)
        assert code == 409 and headers.getRawHeaders("upload-offset") == ["40"], (wrong, code)
    assert await offset_of(url) == 40
    assert (storage / f"{ticket}.part").read_bytes() == b"a" * 40
    assert (await patch(url, 40, b"c" * 60))[0] == 204
    assert (await backend.posts.get())["size"] == "100"
    await stop_daemon(daemon, process)


@implementer(IBodyProducer)
class Chunked:
    """A request body of unknown length: sent with Transfer-Encoding: chunked."""

    length = UNKNOWN_LENGTH

    def __init__(self, *parts: bytes) -> None:
        self.parts = parts

    def startProducing(self, consumer: Any) -> Deferred[None]:
        for part in self.parts:
            consumer.write(part)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_a_body_past_upload_length_is_refused_and_nothing_past_it_is_written(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    assert (await create(server, ticket, 100)).code == 201
    url = f"{server.base}/tus/{ticket}"
    part = storage / f"{ticket}.part"
    assert (await patch(url, 0, b"a" * 60))[0] == 204
    code, _, text = await patch(url, 60, b"b" * 41)  # Content-Length says it: refused up front
    assert code == 413, text
    assert await offset_of(url) == 60 and part.read_bytes() == b"a" * 60
    assert len(backend.posts.pending) == 0
    assert (await patch(url, 60, b"b" * 40))[0] == 204
    assert (storage / ticket).read_bytes() == b"a" * 60 + b"b" * 40
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_a_chunked_body_past_upload_length_is_refused(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    assert (await create(server, ticket, 100)).code == 201
    url = f"{server.base}/tus/{ticket}"
    assert (await patch(url, 0, b"a" * 60))[0] == 204
    try:
        code, _, text = await patch(url, 60, Chunked(b"c" * 30, b"d" * 30))  # 20 bytes too many
        assert code == 413, (code, text)
        assert await offset_of(url) == 60  # none of the refused body stands
        assert backend.posts.pending == []  # not handed over as if it were the file
    finally:
        await stop_daemon(daemon, process)


# tuspy


class Throttled(io.BytesIO):
    """A file whose reads take at least size / rate seconds (tuspy reads a chunk at a time)."""

    def __init__(self, data: bytes, rate: float) -> None:
        super().__init__(data)
        self.rate = rate

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        time.sleep(len(data) / self.rate)
        return data


def tuspy_upload(server: Server, stream: Any, chunk_size: int, **options: Any) -> str:
    """Blocking, for a thread: tuspy's whole upload; returns the upload URL."""
    uploader = tus_client.TusClient(f"{server.base}/tus/").uploader(
        file_stream=stream, chunk_size=chunk_size, **options
    )
    uploader.upload()
    return str(uploader.url)


@pytest_twisted.ensureDeferred
async def test_tuspy_uploads_with_the_ticket_and_checksums(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper, *LARGE)
    data = os.urandom(3 * MiB + 99)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    url = await threads.deferToThread(
        tuspy_upload, server, io.BytesIO(data), MiB, upload_checksum=True,
        metadata={"ticket": ticket, "filename": "résumé.pdf"},
    )  # fmt: skip
    assert url == f"{server.base}/tus/{ticket}"
    post = await backend.posts.get()
    assert_one_handover(post, ticket, storage / ticket, "résumé.pdf", data)
    assert (storage / ticket).read_bytes() == data
    assert len(backend.posts.pending) == 0
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_tuspy_resumes_after_the_daemon_is_sigkilled_mid_upload(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper, *LARGE)
    size = 32 * MiB
    data = os.urandom(size)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    uploading = threads.deferToThread(
        tuspy_upload, server, Throttled(data, 64 * MiB), 2 * MiB, retries=40, retry_delay=0.2,
        metadata={"ticket": ticket, "filename": "py.bin"},
    )  # fmt: skip
    part = storage / f"{ticket}.part"
    await size_reaches(part, 8 * MiB)
    await daemon.kill(process)
    kept = part.stat().st_size
    assert 8 * MiB <= kept < size and part.read_bytes() == data[:kept]
    assert not uploading.called

    daemon, process, server = await restart_on(server.port, storage, tmp_path, stopper, *LARGE)
    assert await uploading == f"{server.base}/tus/{ticket}"
    post = await backend.posts.get()
    assert_one_handover(post, ticket, storage / ticket, "py.bin", data)
    assert (storage / ticket).read_bytes() == data
    await stop_daemon(daemon, process)
    assert len(backend.posts.pending) == 0  # one handover, up to the daemon's end
