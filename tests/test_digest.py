"""End to end (issue: SHA-256 and the backend's verdict): the SHA-256 of every stored
file goes to the backend, and the backend's verdict comes back to the page."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from incoming.errors import ErrorCode
from incoming.handover import HandoverFailed, parse_answer
from incoming.storage import DiskStorage

from .harness import (
    CHUNK_KB,
    SEND_AHEAD,
    Backend,
    Server,
    acked_upload,
    connect,
    send_all,
    start_daemon,
    stop_daemon,
    upload_request,
    upload_small,
)

CHUNK = CHUNK_KB * 1024
TUS = {"Tus-Resumable": "1.0.0"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Storage: the digest kept while writing, and made anew when it cannot be continued


@pytest_twisted.ensureDeferred
async def test_the_digest_follows_writes_releases_rewinds_and_restarts(
    tmp_path: Path, pool: ThreadPool
) -> None:
    data = os.urandom(300_000)
    storage = DiskStorage(tmp_path, reactor, pool)
    upload_id = str(uuid.uuid4())
    await storage.write(upload_id, 0, data[:100_000])
    await storage.release(upload_id)  # the connection went: the file is closed
    await storage.write(upload_id, 100_000, b"x" * 50_000)
    await storage.truncate(upload_id, 100_000)  # those bytes failed a check
    await storage.write(upload_id, 100_000, data[100_000:200_000])
    restarted = DiskStorage(tmp_path, reactor, pool)  # a new process: no digest in memory
    await restarted.write(upload_id, 200_000, data[200_000:])
    completed = await restarted.complete(upload_id)
    assert completed.filename == str(tmp_path / upload_id)
    assert completed.sha256 == sha256(data)
    again = await DiskStorage(tmp_path, reactor, pool).complete(upload_id)  # handover redone
    assert again.sha256 == sha256(data)


@pytest_twisted.ensureDeferred
async def test_a_zero_byte_file_has_the_digest_of_nothing_and_none_can_be_off(
    tmp_path: Path, pool: ThreadPool
) -> None:
    completed = await DiskStorage(tmp_path, reactor, pool).complete(str(uuid.uuid4()))
    assert completed.sha256 == sha256(b"")
    off = DiskStorage(tmp_path, reactor, pool, sha256=False)
    upload_id = str(uuid.uuid4())
    await off.write(upload_id, 0, b"abc")
    assert (await off.complete(upload_id)).sha256 is None


@pytest.mark.parametrize(
    "body, kind, result",
    [
        (b"done", "done", ""),
        (b"done\n", "done", ""),
        (b"done and then some", "done", ""),
        (b'done\n{"url": "/f/1"}', "done", '{"url": "/f/1"}'),
        (b"done\r\n\xc3\xa9t\xc3\xa9\nline 2", "done", "été\nline 2"),
        (b"done\n" + b"r" * 4096, "done", "r" * 4096),
        (b"wait\nignored", "wait", ""),
    ],
)
def test_answers_and_verdicts(body: bytes, kind: str, result: str) -> None:
    answer = parse_answer(body)
    assert (answer.kind, answer.result) == (kind, result.replace("\r", ""))


@pytest.mark.parametrize("body", [b"done\n" + b"r" * 4097, b"done\n\xff\xfe", b"ok"])
def test_a_verdict_too_long_or_not_utf8_fails_the_handover(body: bytes) -> None:
    with pytest.raises(HandoverFailed):
        parse_answer(body)


# Over loopback, the WebSocket


@pytest_twisted.ensureDeferred
async def test_the_handover_carries_the_digest_and_the_page_gets_the_verdict(
    server: Server, backend: Backend
) -> None:
    data = os.urandom(7 * CHUNK + 3)
    verdict = json.dumps({"url": "/files/x.bin", "sha256": sha256(data), "note": "été"})
    backend.answer = b"done\n" + verdict.encode()
    ticket, client, _ = await acked_upload(
        server, backend.url, len(data), removeFileWhenFinished="false"
    )
    await send_all(client, data, CHUNK, SEND_AHEAD)
    post = await backend.posts.get()
    assert post["sha256"] == sha256(data)
    assert await client.expect("MsgAllDone") == {"Success": True, "Result": verdict}
    assert server.files() == {ticket: data}


@pytest_twisted.ensureDeferred
async def test_a_zero_byte_upload_is_handed_over_with_the_digest_of_nothing(
    server: Server, backend: Backend
) -> None:
    ticket, client = await upload_small(server, backend.url, b"")
    await client.expect("MsgAllDone")
    assert (await backend.posts.get())["sha256"] == sha256(b"")


@pytest_twisted.ensureDeferred
async def test_finish_upload_carries_the_verdict_after_wait(
    server: Server, backend: Backend
) -> None:
    backend.answer = b"wait"
    ticket, client = await upload_small(server, backend.url, b"abc", backendSecret="k")
    await backend.posts.get()
    await server.settled()
    too_long = await treq.post(
        f"{server.base}/backend/finish_upload",
        data={"id": ticket, "backendSecret": "k", "result": "r" * 4097},
    )
    assert too_long.code == 400
    response = await treq.post(
        f"{server.base}/backend/finish_upload",
        data={"id": ticket, "backendSecret": "k", "result": "virus-free ✓"},
    )
    assert response.code == 200
    assert await client.expect("MsgAllDone") == {"Success": True, "Result": "virus-free ✓"}


@pytest_twisted.ensureDeferred
async def test_old_clients_and_old_backends_are_unaffected(
    server: Server, backend: Backend
) -> None:
    """A 2014 client reads MsgAllDone's Success; a 2014 backend answers `done`."""
    backend.answer = b"done"
    ticket, client = await upload_small(server, backend.url, b"old")
    done = await client.expect("MsgAllDone")
    assert done["Success"] is True and done["Result"] == ""
    backend.answer = b"done\nfor the page"
    ticket, client = await upload_small(server, backend.url, b"new")
    assert (await client.expect("MsgAllDone"))["Success"] is True


@pytest_twisted.ensureDeferred
async def test_an_oversized_verdict_fails_the_handover(server: Server, backend: Backend) -> None:
    backend.answer = b"done\n" + b"r" * 5000
    ticket, client = await upload_small(server, backend.url, b"abc")
    await client.expect_error(ErrorCode.HANDOVER_FAILED)


# Over loopback, tus


@pytest_twisted.ensureDeferred
async def test_tus_final_patch_and_head_carry_the_verdict(server: Server, backend: Backend) -> None:
    data = os.urandom(2 * CHUNK)
    backend.answer = 'done\n{"ok": "ça va"}'.encode()
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    created = await treq.post(
        f"{server.base}/tus/",
        headers={**TUS, "Upload-Length": str(len(data)),
                 "Upload-Metadata": "ticket " + base64.b64encode(ticket.encode()).decode()},
    )  # fmt: skip
    assert created.code == 201
    response = await treq.request(
        "PATCH", f"{server.base}/tus/{ticket}", data=data,
        headers={**TUS, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"},
    )  # fmt: skip
    assert response.code == 204
    encoded = "%7B%22ok%22%3A%20%22%C3%A7a%20va%22%7D"
    assert response.headers.getRawHeaders("incoming-result") == [encoded]
    assert (await backend.posts.get())["sha256"] == sha256(data)
    head = await treq.head(f"{server.base}/tus/{ticket}", headers=TUS)
    assert head.headers.getRawHeaders("incoming-result") == [encoded]


# The real daemon: digests across SIGKILL, and a verdict kept across a restart


@pytest_twisted.ensureDeferred
async def test_digest_of_an_upload_resumed_after_sigkill_is_that_of_the_whole_file(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    data = os.urandom(40 * CHUNK + 9)
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    ticket, client, _ = await acked_upload(server, backend.url, len(data))
    await send_all(client, data[: 15 * CHUNK], CHUNK, SEND_AHEAD)
    await daemon.kill(process)
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    resumed, conf = await upload_request(server, ticket, len(data))
    resumed.send("MsgAck", Ack=True)
    await send_all(resumed, data[conf["FilePos"] :], CHUNK, SEND_AHEAD)
    post = await backend.posts.get()
    assert post["sha256"] == sha256(data)
    await resumed.expect("MsgAllDone")
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_checksum_none_sends_no_digest(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    daemon, process, server = await start_daemon(
        tmp_path / "s", tmp_path, stopper, "--checksum", "none"
    )
    ticket, client = await upload_small(server, backend.url, b"abc")
    post = await backend.posts.get()
    assert "sha256" not in post and post["size"] == "3"
    await client.expect("MsgAllDone")
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_the_verdict_survives_a_restart_before_the_page_returns(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    backend.answer = b'done\n{"id": 42}'
    ticket, client, _ = await acked_upload(server, backend.url, 3)
    client.send_chunk(b"abc")
    client.close()  # the page goes away before the handover's answer
    await backend.posts.get()
    await daemon.logged(rf"upload {ticket} handed over and finished".encode())
    await daemon.kill(process)
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    returning = await connect(server.ws_url())
    returning.send("MsgUploadReq", Id=ticket, LengthBytes=3, Name="f.bin")
    finished = await returning.expect_error(ErrorCode.TICKET_FINISHED)
    assert finished["Result"] == '{"id": 42}'
    head = await treq.head(f"{server.base}/tus/{ticket}", headers=TUS)
    assert head.headers.getRawHeaders("incoming-result") == ["%7B%22id%22%3A%2042%7D"]
    await stop_daemon(daemon, process)
