"""tus `creation-defer-length` against the real daemon (SPEC: Long fat links): an upload
created before its length is known (`Upload-Defer-Length: 1`), the length given later by
a PATCH's `Upload-Length` or a WebSocket's `LengthBytes`. tus-js-client's
`uploadLengthDeferred` under Node, raw requests for the rules, SIGKILLs and restarts,
cluster mode and object storage."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import threads
from twisted.internet.defer import CancelledError

from incoming.errors import ErrorCode

from .ceph import Ceph
from .harness import (
    CHUNK_KB,
    SEND_AHEAD,
    Backend,
    Redis,
    Server,
    complete_upload,
    connect,
    start_daemon,
    stop_daemon,
)
from .test_cluster import instances, patched, stop_all
from .test_disk_full import small_disk  # noqa: F401 (fixture)
from .test_object_storage import PART, assert_object_handover, parts_in_store, s3_daemon
from .test_tus_clients import (
    LARGE,
    RETRY,
    TUS,
    Chunked,
    NodeClient,
    assert_one_handover,
    metadata,
    node_modules,  # noqa: F401 (autouse fixture)
    offset_of,
    patch,
    random_file,
    restart_on,
    size_reaches,
    tus_js,
)
from .test_tus_concat import final, stored_partial

MiB = 1024 * 1024
CHUNK = CHUNK_KB * 1024
DEFER = {"Upload-Defer-Length": "1"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def create(server: Server, ticket: str, body: bytes | None = None, **headers: str) -> Any:
    """A creation of `ticket` that defers its length (unless `headers` say otherwise);
    with `body`, a creation-with-upload."""
    headers = {**TUS, **DEFER, "Upload-Metadata": metadata(ticket=ticket, filename="d.bin"),
               **headers}  # fmt: skip
    if body is not None:
        headers["Content-Type"] = "application/offset+octet-stream"
    response = await treq.post(f"{server.base}/tus/", data=body, headers=headers)
    response.text_ = await response.text()
    return response


async def head(url: str) -> dict[str, str]:
    """HEAD's status and tus headers, by name."""
    response = await treq.head(url, headers=TUS)
    found = {"status": str(response.code)}
    for name in ("Upload-Offset", "Upload-Length", "Upload-Defer-Length", "Upload-Metadata"):
        values = response.headers.getRawHeaders(name)
        if values:
            found[name] = values[0]
    return found


async def bare(url: str, ticket: str) -> dict[str, str]:
    """HEAD without the metadata (it names the ticket)."""
    found = await head(url)
    assert found.pop("Upload-Metadata", None) == metadata(ticket=ticket, filename="d.bin")
    return found


# tus-js-client


async def handed_over(backend: Backend, client: NodeClient) -> dict[str, str]:
    """The backend's handover POST; an AssertionError at once if the client ends first."""
    post = backend.posts.get()

    def ended(result: Any) -> Any:
        if not post.called:
            post.cancel()
        return result

    client.ended.addBoth(ended)
    try:
        return await post
    except CancelledError:
        raise AssertionError(f"the client ended before any handover: {client.events}") from None


@pytest_twisted.ensureDeferred
# (tus-js-client 4.3.1 never ends a stream whose end falls on a chunk's: its StreamSource
# waits for bytes that do not come; the empty PATCH it would send is tested below.)
@pytest.mark.parametrize("size", [3 * MiB + 123, 1000], ids=["chunks", "one-chunk"])
async def test_tus_js_client_uploads_a_stream_of_unknown_length(
    tmp_path: Path, backend: Backend, stopper: list[Any], size: int
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper, *LARGE)
    data = random_file(tmp_path / "stream.bin", size)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    backend.hold = True  # the PATCH that ends it waits for the backend's answer
    client = tus_js(server, [{"file": tmp_path / "stream.bin",
                              "metadata": {"ticket": ticket, "filename": "stream.bin"}}],
                    chunkSize=MiB, deferred=True)  # fmt: skip
    post = await handed_over(backend, client)
    assert_one_handover(post, ticket, storage / ticket, "stream.bin", data)
    assert (storage / ticket).read_bytes() == data
    assert client.named("success") == []  # not before the backend has answered
    backend.release()
    events = await client.ended
    assert events[-1]["ok"] is True, events
    [success] = client.named("success")
    assert (success["status"], success["offset"]) == (204, str(size))
    chunks = client.named("chunk")
    assert [c["total"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)  # length unknown
    assert (chunks[-1]["accepted"], chunks[-1]["total"]) == (size, size)  # told with the last
    assert client.named("retry") == []
    assert await head(f"{server.base}/tus/{ticket}") == {
        "status": "200", "Upload-Offset": str(size), "Upload-Length": str(size),
        "Upload-Metadata": metadata(ticket=ticket, filename="stream.bin"),
    }  # fmt: skip
    await stop_daemon(daemon, process)
    assert backend.posts.pending == []


@pytest_twisted.ensureDeferred
async def test_tus_js_client_resumes_a_deferred_length_upload_after_a_sigkill(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper, *LARGE)
    size = 32 * MiB + 4321
    data = random_file(tmp_path / "big.bin", size)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    # The stream is read at 16 MiB/s: its end, and the length, come after 2 s at least.
    client = tus_js(server, [{"file": tmp_path / "big.bin",
                              "metadata": {"ticket": ticket, "filename": "big.bin"}}],
                    chunkSize=8 * MiB, deferred=True, retryDelays=RETRY,
                    rate=16 * MiB)  # fmt: skip
    part = storage / f"{ticket}.part"
    await size_reaches(part, 8 * MiB)
    await daemon.kill(process)
    kept = part.stat().st_size
    assert 8 * MiB <= kept < size
    assert part.read_bytes() == data[:kept]
    state = json.loads((storage / f"{ticket}.json").read_text())
    assert (state["length"], state["length_deferred"]) == (None, True)  # killed before it
    assert client.named("success") == [] and len(backend.posts.pending) == 0

    daemon, process, server = await restart_on(server.port, storage, tmp_path, stopper, *LARGE)
    events = await client.ended
    assert events[-1]["ok"] is True, events
    assert client.named("retry")  # it met the dead server and came back
    post = await handed_over(backend, client)
    assert_one_handover(post, ticket, storage / ticket, "big.bin", data)
    assert (storage / ticket).read_bytes() == data
    await stop_daemon(daemon, process)
    assert backend.posts.pending == []  # exactly one handover


# The rules, with raw requests


@pytest_twisted.ensureDeferred
async def test_creation_patches_and_the_length_given_once(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(
        storage, tmp_path, stopper, "--max-upload-size", "1000"
    )
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    url, part = f"{server.base}/tus/{ticket}", storage / f"{ticket}.part"
    try:
        for wrong, why in (
            ({"Upload-Defer-Length": "2"}, "Upload-Defer-Length must be 1"),
            ({"Upload-Defer-Length": "true"}, "Upload-Defer-Length must be 1"),
            ({"Upload-Length": "5"}, "not both"),
        ):
            refused = await create(server, ticket, **wrong)
            assert (refused.code, why in refused.text_) == (400, True), refused.text_
        neither = await treq.post(
            f"{server.base}/tus/", headers={**TUS, "Upload-Metadata": metadata(ticket=ticket)}
        )
        assert neither.code == 400
        assert "Upload-Defer-Length" in await neither.text()
        assert (await head(url))["status"] == "404"  # none of them created it

        created = await create(server, ticket)
        assert created.code == 201, created.text_
        assert created.headers.getRawHeaders("location") == [f"/incoming/tus/{ticket}"]
        assert created.headers.getRawHeaders("upload-defer-length") == ["1"]
        assert await bare(url, ticket) == {"status": "200", "Upload-Offset": "0",
                                           "Upload-Defer-Length": "1"}  # fmt: skip
        code, headers, _ = await patch(url, 0, b"a" * 300)
        assert (code, headers.getRawHeaders("upload-offset")) == (204, ["300"])
        assert headers.getRawHeaders("upload-defer-length") == ["1"]

        # Within --max-upload-size while the length is not known: nothing past it stored.
        code, _, text = await patch(url, 300, b"b" * 701)  # says so in its Content-Length
        assert (code, "1001 bytes exceed the limit of 1000" in text) == (413, True), text
        code, _, text = await patch(url, 300, Chunked(b"c" * 400, b"d" * 400))  # finds out
        assert (code, "upload size limit" in text) == (413, True), text
        assert await offset_of(url) == 300 and part.read_bytes() == b"a" * 300

        # The length: not above the limit, nor below the bytes stored, digits only.
        for given, status, why in (
            ("1001", 413, "exceed the limit of 1000"),
            ("299", 409, "less than the 300 bytes"),
            ("-1", 400, "digits"),
            ("1e3", 400, "digits"),
        ):
            code, _, text = await patch(url, 300, b"e" * 10, **{"Upload-Length": given})
            assert (code, why in text) == (status, True), (given, code, text)
        code, _, _ = await patch(url, 0, b"e" * 10, **{"Upload-Length": "500"})
        assert code == 409  # the wrong offset: refused before the length is taken
        assert await bare(url, ticket) == {"status": "200", "Upload-Offset": "300",
                                           "Upload-Defer-Length": "1"}  # fmt: skip

        code, headers, _ = await patch(url, 300, b"f" * 300, **{"Upload-Length": "700"})
        assert (code, headers.getRawHeaders("upload-offset")) == (204, ["600"])
        assert headers.getRawHeaders("upload-defer-length") is None
        assert await bare(url, ticket) == {"status": "200", "Upload-Offset": "600",
                                           "Upload-Length": "700"}  # fmt: skip
        code, _, text = await patch(url, 600, b"g" * 100, **{"Upload-Length": "701"})
        assert (code, "differs from the 700" in text) == (409, True), text  # once only
        code, _, text = await patch(url, 600, b"g" * 101)
        assert code == 413, text  # past the length now given
        assert await offset_of(url) == 600 and backend.posts.pending == []

        code, headers, _ = await patch(url, 600, b"g" * 100, **{"Upload-Length": "700"})
        assert (code, headers.getRawHeaders("upload-offset")) == (204, ["700"])  # the same again
        data = b"a" * 300 + b"f" * 300 + b"g" * 100
        [post] = backend.posts.pending  # answered once the backend had answered the handover
        assert (post["id"], post["size"], post["sha256"]) == (ticket, "700", sha256(data))
        assert post["filenameFromBrowser"] == "d.bin"
        assert (storage / ticket).read_bytes() == data
    finally:
        await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_creation_with_upload_and_a_zero_length_given_by_an_empty_patch(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    try:
        ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
        created = await create(server, ticket, body=b"x" * 50)
        assert created.code == 201, created.text_
        assert created.headers.getRawHeaders("upload-offset") == ["50"]
        assert created.headers.getRawHeaders("upload-defer-length") == ["1"]
        url = f"{server.base}/tus/{ticket}"
        assert (await create(server, ticket)).code == 201  # a reloaded page: the same upload
        code, headers, _ = await patch(url, 50, b"", **{"Upload-Length": "50"})
        assert (code, headers.getRawHeaders("upload-offset")) == (204, ["50"])
        post = await backend.posts.get()
        assert (post["size"], post["sha256"]) == ("50", sha256(b"x" * 50))

        empty = await server.new_upload(backend.url, removeFileWhenFinished="false")
        assert (await create(server, empty)).code == 201
        code, _, _ = await patch(f"{server.base}/tus/{empty}", 0, b"", **{"Upload-Length": "0"})
        assert code == 204
        post = await backend.posts.get()
        assert (post["id"], post["size"], post["sha256"]) == (empty, "0", sha256(b""))
    finally:
        await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_the_deferred_length_and_the_length_given_survive_sigkills(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    data = os.urandom(250)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    url = f"{server.base}/tus/{ticket}"
    assert (await create(server, ticket)).code == 201
    assert (await patch(url, 0, data[:100]))[0] == 204
    await daemon.kill(process)

    daemon, process, server = await restart_on(server.port, storage, tmp_path, stopper)
    assert await bare(url, ticket) == {"status": "200", "Upload-Offset": "100",
                                       "Upload-Defer-Length": "1"}  # fmt: skip
    code, _, _ = await patch(url, 100, data[100:150], **{"Upload-Length": "250"})
    assert code == 204
    await daemon.kill(process)

    daemon, process, server = await restart_on(server.port, storage, tmp_path, stopper)
    assert await bare(url, ticket) == {"status": "200", "Upload-Offset": "150",
                                       "Upload-Length": "250"}  # fmt: skip
    code, _, text = await patch(url, 150, data[150:], **{"Upload-Length": "251"})
    assert code == 409, text
    assert (await patch(url, 150, data[150:]))[0] == 204
    post = await backend.posts.get()
    assert (post["size"], post["sha256"]) == ("250", sha256(data))
    assert (storage / ticket).read_bytes() == data
    await stop_daemon(daemon, process)
    assert backend.posts.pending == []


@pytest_twisted.ensureDeferred
async def test_a_websocket_gives_the_length_of_a_deferred_tus_upload(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    data = os.urandom(7 * CHUNK + 3)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    url = f"{server.base}/tus/{ticket}"
    try:
        assert (await create(server, ticket)).code == 201
        assert (await patch(url, 0, data[: 3 * CHUNK + 1]))[0] == 204
        short = await connect(server.ws_url())
        short.send("MsgUploadReq", Id=ticket, LengthBytes=3 * CHUNK, Name="ws.bin")
        refused = await short.expect_error(ErrorCode.LENGTH_MISMATCH)
        assert "less than the" in refused["Msg"]
        assert (await bare(url, ticket))["Upload-Defer-Length"] == "1"  # still not given

        client = await connect(server.ws_url())
        client.send("MsgUploadReq", Id=ticket, LengthBytes=len(data), Name="ws.bin")
        conf = await client.expect("MsgUploadConf")
        assert conf["FilePos"] == 3 * CHUNK + 1
        await complete_upload(client, data[3 * CHUNK + 1 :], CHUNK, SEND_AHEAD)
        post = await backend.posts.get()
        assert (post["size"], post["sha256"]) == (str(len(data)), sha256(data))
        assert post["filenameFromBrowser"] == "d.bin"  # the creation named it
        assert (storage / ticket).read_bytes() == data
    finally:
        await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_delete_and_idle_expiry_of_a_deferred_length_upload(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper, "--max-idle", "2")
    try:
        ticket = await server.new_upload(backend.url, backendSecret="k")
        url = f"{server.base}/tus/{ticket}"
        assert (await create(server, ticket)).code == 201
        assert (await patch(url, 0, b"z" * 10))[0] == 204
        deleted = await treq.delete(url, headers=TUS)
        assert deleted.code == 204
        notice = await backend.posts.get()
        assert (notice["id"], notice["cancelled"], notice["backendSecret"]) == (ticket, "yes", "k")
        assert (await head(url))["status"] == "410"
        assert not (storage / f"{ticket}.part").exists()

        idle = await server.new_upload(backend.url)
        assert (await create(server, idle)).code == 201
        assert (await patch(f"{server.base}/tus/{idle}", 0, b"z" * 10))[0] == 204
        notice = await backend.posts.get()  # after --max-idle
        assert (notice["id"], notice["cancelled"]) == (idle, "yes")
        assert "idle" in notice["cancelReason"]
        assert (await head(f"{server.base}/tus/{idle}"))["status"] == "410"
    finally:
        await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_a_partial_upload_of_unknown_length_is_refused(
    server: Server, backend: Backend
) -> None:
    """A ticket's partial uploads are bounded together by their lengths (--max-upload-size):
    one whose length would come later could grow past that bound."""
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    created = await create(server, ticket, body=b"2" * 60, **{"Upload-Concat": "partial"})
    assert (created.code, created.text_) == (400, "a partial upload needs its Upload-Length")
    assert [p.name for p in server.storage_dir.glob("*.part")] == []
    first = await stored_partial(server, ticket, b"1" * 100)
    joined = await final(server, [first])
    assert joined.code == 201, joined.text_
    assert (server.storage_dir / ticket).read_bytes() == b"1" * 100


@pytest_twisted.ensureDeferred
async def test_a_body_of_unknown_length_that_does_not_fit_the_disk_is_refused_507(
    small_disk: Path,  # noqa: F811 (the fixture)
    tmp_path: Path,
    backend: Backend,
    stopper: list[Any],
) -> None:
    storage = small_disk / "storage"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    try:
        ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
        url = f"{server.base}/tus/{ticket}"
        assert (await create(server, ticket)).code == 201
        assert (await patch(url, 0, b"a" * CHUNK))[0] == 204
        code, _, text = await patch(url, CHUNK, os.urandom(2 * MiB))  # a 1 MiB disk
        assert (code, "free storage space" in text) == (507, True), text
        assert await offset_of(url) == CHUNK
        assert (storage / f"{ticket}.part").read_bytes() == b"a" * CHUNK
    finally:
        await stop_daemon(daemon, process)


# Cluster mode, object storage


@pytest_twisted.ensureDeferred
async def test_cluster_the_length_deferred_on_one_instance_is_given_on_another(
    tmp_path: Path, redis: Redis, backend: Backend, stopper: list[Any]
) -> None:
    started = await instances(2, redis, tmp_path, stopper)
    (_, _, a), (_, _, b) = started
    data = os.urandom(5 * CHUNK)
    ticket = await a.new_upload(backend.url, removeFileWhenFinished="false")
    assert (await create(a, ticket)).code == 201
    first = await patched(f"{b.base}/tus/{ticket}", data[: 2 * CHUNK], 0)
    assert first.code == 204
    assert await bare(f"{a.base}/tus/{ticket}", ticket) == {
        "status": "200", "Upload-Offset": str(2 * CHUNK), "Upload-Defer-Length": "1"}  # fmt: skip
    assert (await create(b, ticket)).code == 201  # again, on the other: the same upload
    while True:  # (423 while b lets go of it)
        code, _, text = await patch(f"{a.base}/tus/{ticket}", 2 * CHUNK, data[2 * CHUNK :],
                                    **{"Upload-Length": str(len(data))})  # fmt: skip
        if code != 423:
            break
    assert code == 204, text
    post = await backend.posts.get()
    assert (post["size"], post["sha256"]) == (str(len(data)), sha256(data))
    assert (tmp_path / "shared" / ticket).read_bytes() == data
    await stop_all(started)
    assert backend.posts.pending == []


def claimed_body(port: int, path: str, offset: int, claimed: int) -> tuple[int, str]:
    """A PATCH whose Content-Length claims `claimed` bytes (none sent): the answer."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            f"PATCH {path} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
            f"Content-Length: {claimed}\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"\n"):
            more = s.recv(65536)
            if not more:
                break
            answer += more
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2].decode()


@pytest_twisted.ensureDeferred
async def test_object_storage_parts_go_while_the_length_is_unknown(
    ceph: Ceph, bucket: str, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    spool = tmp_path / "spool"
    _, _, server = await s3_daemon(ceph, bucket, spool, tmp_path, stopper)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    url = f"{server.base}/tus/{ticket}"
    assert (await create(server, ticket)).code == 201
    # Parts of --s3-part-size (no --max-upload-size): 10,000 of them bound the upload.
    code, text = await threads.deferToThread(
        claimed_body, server.port, f"/incoming/tus/{ticket}", 0, 10_000 * PART + 1
    )
    assert (code, f"exceed the limit of {10_000 * PART} bytes" in text) == (413, True), text
    code, _, text = await patch(url, 0, b"", **{"Upload-Length": str(10_000 * PART + 1)})
    assert (code, f"exceed the limit of {10_000 * PART} bytes" in text) == (413, True), text
    data = os.urandom(3 * PART + 4321)
    assert (await patch(url, 0, data[: 2 * PART + 100]))[0] == 204
    await parts_in_store(ceph, bucket, f"up/{ticket}", 2)  # sent before the length is known
    code, _, text = await patch(url, 2 * PART + 100, data[2 * PART + 100 :],
                                **{"Upload-Length": str(len(data))})  # fmt: skip
    assert code == 204, text
    post = await backend.posts.get()
    assert_object_handover(post, ceph, bucket, ticket, data)
    assert ceph.read(bucket, f"up/{ticket}") == data
    assert ceph.multipart_uploads(bucket) == []

    # With --max-upload-size, parts sized for the largest upload allowed (60,000 MiB in
    # 10,000 parts: 6 MiB), as a length given at once would have them.
    _, _, sized = await s3_daemon(ceph, bucket, tmp_path / "spool-2", tmp_path, stopper,
                                  "--max-upload-size", str(60_000 * MiB))  # fmt: skip
    ticket = await sized.new_upload(backend.url, removeFileWhenFinished="false")
    url = f"{sized.base}/tus/{ticket}"
    assert (await create(sized, ticket)).code == 201
    data = os.urandom(12 * MiB + 100)
    assert (await patch(url, 0, data))[0] == 204
    await parts_in_store(ceph, bucket, f"up/{ticket}", 2)
    [(key, upload)] = ceph.multipart_uploads(bucket)
    listed = ceph.client().list_parts(Bucket=bucket, Key=key, UploadId=upload)["Parts"]
    assert [p["Size"] for p in listed] == [6 * MiB, 6 * MiB]
    code, _, text = await patch(url, len(data), b"", **{"Upload-Length": str(len(data))})
    assert code == 204, text
    assert_object_handover(await backend.posts.get(), ceph, bucket, ticket, data)
