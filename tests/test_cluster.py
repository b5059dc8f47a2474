"""Several instances on one Redis and one shared directory (SPEC: Several instances):
real daemons, a real redis-server, loopback."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor, threads
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import deferLater

from incoming.errors import ErrorCode

from .harness import (
    CHUNK_KB,
    ROOT,
    SEND_AHEAD,
    Backend,
    Daemon,
    Redis,
    Server,
    acked_upload,
    complete_upload,
    connect,
    send_all,
    start_daemon,
    stop_daemon,
    upload_request,
)

CHUNK = CHUNK_KB * 1024
LEASE = 3  # seconds (--ws-timeout): how long a crashed instance holds on to its uploads
TUS = {"Tus-Resumable": "1.0.0"}


async def instances(
    count: int, redis: Redis, tmp_path: Path, stopper: list[Any], *extra: str
) -> list[tuple[Daemon, Any, Server]]:
    """`count` daemons on one Redis and one storage directory."""
    storage = tmp_path / "shared"
    started = []
    for _ in range(count):
        started.append(
            await start_daemon(
                storage, tmp_path, stopper, "--redis", redis.url, "--ws-timeout", str(LEASE), *extra
            )
        )
    return started


async def stop_all(started: list[tuple[Daemon, Any, Server]]) -> None:
    for daemon, process, _ in started:
        if process.pid is not None:
            await stop_daemon(daemon, process)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def resumed_on(server: Server, ticket: str, length: int) -> tuple[Any, dict[str, Any]]:
    """MsgUploadReq until MsgUploadConf, as a browser does: the instance that served the
    last connection lets go of the upload a moment after it closed (13 meanwhile)."""
    while True:
        client = await connect(server.ws_url())
        client.send("MsgUploadReq", Id=ticket, LengthBytes=length, Name="f.bin")
        message = await client.next()
        if message["MsgType"] == "MsgUploadConf":
            return client, message["MsgData"]
        assert message["MsgData"]["ErrorCode"] == ErrorCode.ALREADY_CONNECTED, message
        await client.closed
        await deferLater(reactor, 0.1, lambda: None)


async def patched(url: str, body: bytes, offset: int) -> Any:
    """A PATCH, again after a 423 (the instance of the last one is letting go), as tus
    clients do."""
    while True:
        response = await treq.request(
            "PATCH", url, data=body,
            headers={**TUS, "Content-Type": "application/offset+octet-stream",
                     "Upload-Offset": str(offset)},
        )  # fmt: skip
        if response.code != 423:
            return response
        await response.content()
        await deferLater(reactor, 0.1, lambda: None)


@pytest_twisted.ensureDeferred
async def test_an_upload_resumes_on_another_instance(
    tmp_path: Path, redis: Redis, backend: Backend, stopper: list[Any]
) -> None:
    started = await instances(3, redis, tmp_path, stopper)
    (_, _, a), (_, _, b), (_, _, c) = started
    data = os.urandom(9 * CHUNK + 5)
    ticket = await a.new_upload(backend.url, removeFileWhenFinished="false")
    client, conf = await upload_request(b, ticket, len(data))
    client.send("MsgAck", Ack=True)
    await send_all(client, data[: 4 * CHUNK], CHUNK, SEND_AHEAD)
    client.close()
    await client.closed
    resumed, conf = await resumed_on(c, ticket, len(data))
    assert conf["FilePos"] == 4 * CHUNK
    await complete_upload(resumed, data[4 * CHUNK :], CHUNK, SEND_AHEAD)
    post = await backend.posts.get()
    assert (post["id"], post["sha256"], post["size"]) == (ticket, sha256(data), str(len(data)))
    assert (tmp_path / "shared" / ticket).read_bytes() == data
    await stop_all(started)
    assert backend.posts.pending == []  # one handover


@pytest_twisted.ensureDeferred
async def test_only_one_instance_writes_an_upload(
    tmp_path: Path, redis: Redis, backend: Backend, stopper: list[Any]
) -> None:
    started = await instances(2, redis, tmp_path, stopper)
    (_, _, a), (_, _, b) = started
    ticket, first, _ = await acked_upload(a, backend.url, 2 * CHUNK)
    second = await connect(b.ws_url())
    second.send("MsgUploadReq", Id=ticket, LengthBytes=2 * CHUNK, Name="x")
    await second.expect_error(ErrorCode.ALREADY_CONNECTED)
    locked = await treq.request(
        "PATCH", f"{b.base}/tus/{ticket}", data=b"x",
        headers={**TUS, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"},
    )  # fmt: skip
    assert locked.code in (404, 423)  # not created over tus, or locked
    first.close()
    await stop_all(started)


@pytest_twisted.ensureDeferred
async def test_sigkill_of_the_writing_instance_then_resume_elsewhere(
    tmp_path: Path, redis: Redis, backend: Backend, stopper: list[Any]
) -> None:
    started = await instances(2, redis, tmp_path, stopper)
    (daemon_a, process_a, a), (_, _, b) = started
    data = os.urandom(12 * CHUNK + 1)
    ticket, client, _ = await acked_upload(a, backend.url, len(data))
    await send_all(client, data[: 5 * CHUNK], CHUNK, SEND_AHEAD)
    await daemon_a.kill(process_a)
    await client.closed
    # the lease of the dead instance runs out within LEASE seconds; until then 13
    asked = reactor.seconds()
    resumed, conf = await resumed_on(b, ticket, len(data))
    assert reactor.seconds() - asked <= LEASE + 1
    position = conf["FilePos"]
    assert position == 5 * CHUNK
    await complete_upload(resumed, data[position:], CHUNK, SEND_AHEAD)
    post = await backend.posts.get()
    assert (post["sha256"], post["size"]) == (sha256(data), str(len(data)))
    await stop_all(started)
    assert backend.posts.pending == []


@pytest_twisted.ensureDeferred
async def test_cancel_and_finish_through_an_instance_that_does_not_hold_the_upload(
    tmp_path: Path, redis: Redis, backend: Backend, stopper: list[Any]
) -> None:
    started = await instances(3, redis, tmp_path, stopper)
    (_, _, a), (_, _, b), (_, _, c) = started
    ticket, client, _ = await acked_upload(a, backend.url, 10 * CHUNK, backendSecret="k")
    await send_all(client, b"c" * CHUNK, CHUNK, SEND_AHEAD)
    asked = reactor.seconds()
    response = await treq.post(
        f"{b.base}/backend/cancel_upload", data={"id": ticket, "backendSecret": "k"}
    )
    assert (response.code, await response.text()) == (200, "ok")
    assert await client.expect("MsgCancel") == {"Reason": "cancelled by the backend"}
    assert reactor.seconds() - asked < 1
    assert not (tmp_path / "shared" / f"{ticket}.part").exists()
    again = await treq.post(
        f"{c.base}/backend/cancel_upload", data={"id": ticket, "backendSecret": "k"}
    )
    assert again.code == 412  # known everywhere as cancelled

    backend.answer = b"wait"
    ticket, client, _ = await acked_upload(a, backend.url, 3, backendSecret="k")
    client.send_chunk(b"abc")
    await client.expect("MsgChunkAck")
    await backend.posts.get()
    asked = reactor.seconds()
    response = await treq.post(
        f"{c.base}/backend/finish_upload",
        data={"id": ticket, "backendSecret": "k", "result": "done elsewhere"},
    )
    assert (response.code, await response.text()) == (200, "ok")
    assert await client.expect("MsgAllDone") == {"Success": True, "Result": "done elsewhere"}
    assert reactor.seconds() - asked < 1
    await stop_all(started)


@pytest_twisted.ensureDeferred
async def test_a_handover_interrupted_by_sigkill_is_redone_by_another_instance(
    tmp_path: Path, redis: Redis, backend: Backend, stopper: list[Any]
) -> None:
    started = await instances(2, redis, tmp_path, stopper)
    (daemon_a, process_a, a), (_, _, b) = started
    data = os.urandom(3 * CHUNK)
    ticket, client, _ = await acked_upload(
        a, backend.url, len(data), removeFileWhenFinished="false"
    )
    backend.hold = True
    await send_all(client, data, CHUNK, SEND_AHEAD)
    first = await backend.posts.get()  # the handover is under way, and hangs
    await daemon_a.kill(process_a)
    backend.release()
    again = await backend.posts.get()  # redone by B once A's lease ran out
    assert (again["id"], again["cancelled"], again["sha256"]) == (ticket, "no", sha256(data))
    assert again["filename"] == first["filename"] == str(tmp_path / "shared" / ticket)
    late = await connect(b.ws_url())
    late.send("MsgUploadReq", Id=ticket, LengthBytes=len(data), Name="x")
    await late.expect_error(ErrorCode.TICKET_FINISHED)
    await stop_all(started)


@pytest_twisted.ensureDeferred
async def test_an_idle_upload_expires_once_cluster_wide(
    tmp_path: Path, redis: Redis, backend: Backend, stopper: list[Any]
) -> None:
    started = await instances(3, redis, tmp_path, stopper, "--max-idle", "2")
    (_, _, a), _, _ = started
    ticket, client, _ = await acked_upload(a, backend.url, 4 * CHUNK, backendSecret="k")
    await send_all(client, b"i" * CHUNK, CHUNK, SEND_AHEAD)
    client.close()
    notice = await backend.posts.get()
    assert (notice["id"], notice["cancelled"]) == (ticket, "yes")
    assert "idle" in notice["cancelReason"]
    await stop_all(started)
    assert backend.posts.pending == []  # once, not once per instance


@pytest_twisted.ensureDeferred
async def test_tus_resumes_on_another_instance(
    tmp_path: Path, redis: Redis, backend: Backend, stopper: list[Any]
) -> None:
    started = await instances(2, redis, tmp_path, stopper)
    (_, _, a), (_, _, b) = started
    data = os.urandom(5 * CHUNK)
    ticket = await a.new_upload(backend.url)
    created = await treq.post(
        f"{a.base}/tus/",
        headers={**TUS, "Upload-Length": str(len(data)),
                 "Upload-Metadata": "ticket " + base64.b64encode(ticket.encode()).decode()},
    )  # fmt: skip
    assert created.code == 201
    stream = {**TUS, "Content-Type": "application/offset+octet-stream"}
    first = await treq.request(
        "PATCH",
        f"{a.base}/tus/{ticket}",
        data=data[:CHUNK],
        headers={**stream, "Upload-Offset": "0"},
    )
    assert first.code == 204
    head = await treq.head(f"{b.base}/tus/{ticket}", headers=TUS)
    assert head.headers.getRawHeaders("upload-offset") == [str(CHUNK)]
    rest = await patched(f"{b.base}/tus/{ticket}", data[CHUNK:], CHUNK)
    assert rest.code == 204
    post = await backend.posts.get()
    assert post["sha256"] == sha256(data)
    await stop_all(started)


@pytest_twisted.ensureDeferred
async def test_redis_away_and_back(
    tmp_path: Path, redis: Redis, backend: Backend, stopper: list[Any]
) -> None:
    started = await instances(2, redis, tmp_path, stopper)
    (_, _, a), (_, _, b) = started
    data = os.urandom(8 * CHUNK)
    ticket, client, _ = await acked_upload(
        a, backend.url, len(data), removeFileWhenFinished="false"
    )
    await send_all(client, data[: 2 * CHUNK], CHUNK, SEND_AHEAD)
    await redis.stop()
    await send_all(client, data[2 * CHUNK : 6 * CHUNK], CHUNK, SEND_AHEAD)  # writing goes on
    response = await treq.post(
        f"{b.base}/backend/new_upload", data={"signalFinishURL": backend.url}
    )
    assert response.code == 503  # a clear error for new tickets
    other = await connect(b.ws_url())
    other.send("MsgUploadReq", Id=ticket, LengthBytes=len(data), Name="x")
    await other.expect_error(ErrorCode.REGISTRY_UNAVAILABLE)
    await redis.start()  # same port, same data
    await send_all(client, data[6 * CHUNK :], CHUNK, SEND_AHEAD)
    await client.expect("MsgAllDone")
    assert (tmp_path / "shared" / ticket).read_bytes() == data
    while True:  # the instances reconnect by themselves
        response = await treq.post(
            f"{b.base}/backend/new_upload", data={"signalFinishURL": backend.url}
        )
        if response.code == 200:
            break
        await deferLater(reactor, 0.5)
    await stop_all(started)


@pytest_twisted.ensureDeferred
async def test_many_uploads_reconnecting_to_random_instances(
    tmp_path: Path, redis: Redis, backend: Backend, stopper: list[Any]
) -> None:
    started = await instances(3, redis, tmp_path, stopper)
    servers = [server for _, _, server in started]
    rng = random.Random(7)

    async def one(n: int) -> tuple[str, bytes]:
        data = os.urandom(rng.randrange(1, 6) * CHUNK + rng.randrange(CHUNK))
        ticket = await rng.choice(servers).new_upload(backend.url, removeFileWhenFinished="false")
        position = 0
        while True:
            server = rng.choice(servers)
            client = await connect(server.ws_url())
            client.send("MsgUploadReq", Id=ticket, LengthBytes=len(data), Name=f"{n}.bin")
            message = await client.next()
            if message is None or message["MsgType"] == "MsgError":
                await client.closed  # the previous instance still lets go: try again
                continue
            position = message["MsgData"]["FilePos"]
            client.send("MsgAck", Ack=True)
            end = min(len(data), position + rng.randrange(1, 3) * CHUNK)
            await send_all(client, data[position:end], CHUNK, SEND_AHEAD)
            if end == len(data):
                await client.expect("MsgAllDone")
                return ticket, data
            client.close()
            await client.closed

    results = await DeferredList([ensureDeferred(one(n)) for n in range(30)], fireOnOneErrback=True)
    uploads = dict(result for _, result in results)
    posts: dict[str, dict[str, str]] = {}
    while len(posts) < len(uploads):  # at least once: an instance stalled past its lease
        post = await backend.posts.get()  # may see its handover taken up and made again
        posts[post["id"]] = post
    assert sorted(posts) == sorted(uploads)
    for post in posts.values():
        assert post["sha256"] == sha256(uploads[post["id"]])
        assert (tmp_path / "shared" / post["id"]).read_bytes() == uploads[post["id"]]
    await stop_all(started)
    assert backend.posts.pending == []  # one handover each


@pytest_twisted.ensureDeferred
async def test_redis_is_rebuilt_from_the_directory_and_one_process_can_take_it_over(
    tmp_path: Path, redis: Redis, backend: Backend, stopper: list[Any]
) -> None:
    started = await instances(2, redis, tmp_path, stopper)
    (_, _, a), (_, _, b) = started
    data = os.urandom(4 * CHUNK)
    ticket, client, _ = await acked_upload(
        a, backend.url, len(data), removeFileWhenFinished="false"
    )
    await send_all(client, data[:CHUNK], CHUNK, SEND_AHEAD)
    client.close()
    unused = await b.new_upload(backend.url, removeFileWhenFinished="false")
    await stop_all(started)

    await threads.deferToThread(
        subprocess.run, ["redis-cli", "-p", str(redis.port), "FLUSHALL"], check=True
    )  # Redis loses everything
    rebuilt = await threads.deferToThread(
        subprocess.run,
        [sys.executable, "-m", "incoming.cluster", "--redis", redis.url,
         "--storage-dir", str(tmp_path / "shared")],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert rebuilt.stdout.startswith("2 uploads put back")
    started = await instances(1, redis, tmp_path, stopper)
    [(_, _, c)] = started
    resumed, conf = await resumed_on(c, ticket, len(data))
    assert conf["FilePos"] == CHUNK
    await complete_upload(resumed, data[CHUNK:], CHUNK, SEND_AHEAD)
    assert (await backend.posts.get())["sha256"] == sha256(data)
    await stop_all(started)

    # one process, no Redis, takes over the cluster's directory
    daemon, process, single = await start_daemon(tmp_path / "shared", tmp_path, stopper)
    client, conf = await upload_request(single, unused, 3)
    assert conf["FilePos"] == 0
    await complete_upload(client, b"one", CHUNK, SEND_AHEAD)
    assert (await backend.posts.get())["id"] == unused
    late = await connect(single.ws_url())
    late.send("MsgUploadReq", Id=ticket, LengthBytes=len(data), Name="x")
    await late.expect_error(ErrorCode.TICKET_FINISHED)
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_an_unreadable_record_does_not_stop_the_janitor(
    tmp_path: Path, redis: Redis, backend: Backend, stopper: list[Any]
) -> None:
    started = await instances(1, redis, tmp_path, stopper, "--max-idle", "1")
    [(_, _, a)] = started
    stranger = "7e6a8b8e-0a0a-4a0a-8a0a-0a0a0a0a0a0a"  # a newer version's record, say
    for command in (
        ["SET", f"incoming:upload:{stranger}", json.dumps({"id": stranger, "phase": "v2"})],
        ["ZADD", "incoming:deadlines", "0", stranger],  # first in line
    ):
        await threads.deferToThread(
            subprocess.run, ["redis-cli", "-p", str(redis.port), *command], check=True
        )
    ticket = await a.new_upload(backend.url)
    notice = await backend.posts.get()  # expired all the same
    assert (notice["id"], notice["cancelled"]) == (ticket, "yes")
    await stop_all(started)
