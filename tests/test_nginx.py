"""Incoming!! behind nginx, configured as docs/deployment shows (the files the docs
include, `harness.NGINX_SINGLE` and `harness.NGINX_CLUSTER`): one instance, and two behind
a round-robin load balancer without stickiness, across which one upload resumes. Real
daemons, a real redis-server, a real nginx, loopback."""

from __future__ import annotations

import base64
import os
import re
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from incoming.errors import ErrorCode

from .harness import (
    CHUNK_KB,
    NGINX_SINGLE,
    SEND_AHEAD,
    Backend,
    Daemon,
    Nginx,
    Redis,
    Server,
    connect,
    free_port,
    send_all,
    start_daemon,
)
from .test_cluster import instances, sha256, stop_all

CHUNK = CHUNK_KB * 1024
TUS = {"Tus-Resumable": "1.0.0"}


async def behind_nginx(
    tmp_path: Path, redis: Redis, nginx: Nginx, stopper: list[Any]
) -> tuple[list[tuple[Daemon, Any, Server]], Server, Server]:
    """Two instances on one Redis and one directory, and nginx in front of them: the
    browsers' side of it, and the backend's."""
    started = await instances(2, redis, tmp_path, stopper)
    await nginx.start([server.port for _, _, server in started])
    storage = tmp_path / "shared"
    front = Server(manager=None, port=nginx.port, storage_dir=storage)  # type: ignore[arg-type]
    api = Server(manager=None, port=nginx.backend_port, storage_dir=storage)  # type: ignore[arg-type]
    return started, front, api


@pytest_twisted.ensureDeferred
async def test_one_instance_behind_nginx_as_the_docs_configure_it(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    """docs/deployment/nginx.conf in front of a daemon started as its first lines say
    (`--backend-listen` on loopback): the script, a tus upload with the longest verdict and
    a WebSocket upload pass through; the backend API and the metrics do not."""
    storage = tmp_path / "storage"
    backend_port = free_port()
    _, _, daemon = await start_daemon(
        storage, tmp_path, stopper, "--backend-listen", f"tcp:{backend_port}:interface=127.0.0.1"
    )
    nginx = Nginx(tmp_path / "nginx", NGINX_SINGLE)
    await nginx.start([daemon.port])
    try:
        front = Server(manager=None, port=nginx.port, storage_dir=storage)  # type: ignore[arg-type]
        api = Server(manager=None, port=backend_port, storage_dir=storage)  # type: ignore[arg-type]
        script = await treq.get(f"{front.base}/frontend/incoming.js")
        assert script.code == 200 and b"Uploader" in await script.content()
        for path in ("backend/new_upload", "0.1/backend/new_upload", "metrics"):
            refused = await treq.post(f"http://127.0.0.1:{nginx.port}/incoming/{path}")
            assert refused.code == 404, path
        # tus, with the longest verdict in its Incoming-Result header
        data = os.urandom(200 * 1024 + 5)
        ticket = await api.new_upload(backend.url, removeFileWhenFinished="false")
        verdict = "é" * 2048
        backend.answer = b"done\n" + verdict.encode()
        metadata = "ticket " + base64.b64encode(ticket.encode()).decode()
        created = await treq.post(
            f"{front.base}/tus/",
            headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": metadata},
        )
        assert created.code == 201
        location = created.headers.getRawHeaders("location")[0]
        patched = await treq.request(
            "PATCH", f"http://127.0.0.1:{nginx.port}{location}", data=data,
            headers={**TUS, "Content-Type": "application/offset+octet-stream",
                     "Upload-Offset": "0"},
        )  # fmt: skip
        await patched.content()
        assert patched.code == 204
        assert patched.headers.getRawHeaders("incoming-result") == [quote(verdict, safe="")]
        post = await backend.posts.get()
        assert (post["id"], post["sha256"]) == (ticket, sha256(data))
        assert (storage / ticket).read_bytes() == data
        # the WebSocket, upgraded through it
        data = os.urandom(5 * CHUNK + 3)
        backend.answer = b"done"
        ticket = await api.new_upload(backend.url, removeFileWhenFinished="false")
        client = await connect(front.ws_url())
        client.send("MsgUploadReq", Id=ticket, LengthBytes=len(data), Name="f.bin")
        assert (await client.expect("MsgUploadConf"))["FilePos"] == 0
        client.send("MsgAck", Ack=True)
        await send_all(client, data, CHUNK, SEND_AHEAD)
        await client.expect("MsgAllDone")
        await client.closed  # the closing handshake, through nginx
        post = await backend.posts.get()
        assert (post["id"], post["sha256"]) == (ticket, sha256(data))
        assert (storage / ticket).read_bytes() == data
    finally:
        await nginx.stop()
    methods = [(method, status) for method, _, status, _ in nginx.requests()]
    assert ("PATCH", 204) in methods and ("GET", 101) in methods
    # refused by nginx itself: no request reached the daemon
    private = [r for r in nginx.requests() if "/backend/" in r[1] or r[1].endswith("metrics")]
    assert [(status, upstream) for _, _, status, upstream in private] == [(404, "-")] * 3
    assert nginx.problems() == []


def served(daemon: Daemon, ticket: str) -> int:
    """How many WebSocket connections of `ticket` this instance took."""
    return len(re.findall(rb"upload %s (started|resumed) " % ticket.encode(), daemon.output))


@pytest_twisted.ensureDeferred
async def test_a_websocket_upload_resumes_across_instances_through_nginx(
    tmp_path: Path, redis: Redis, nginx: Nginx, backend: Backend, stopper: list[Any]
) -> None:
    started, front, api = await behind_nginx(tmp_path, redis, nginx, stopper)
    data = os.urandom(11 * CHUNK + 7)
    ticket = await api.new_upload(backend.url, removeFileWhenFinished="false")
    position, connections, refused = 0, 0, 0
    while True:  # a connection per 3 chunks, each one where nginx sends it
        client = await connect(front.ws_url())
        client.send("MsgUploadReq", Id=ticket, LengthBytes=len(data), Name="f.bin")
        message = await client.next()
        if message["MsgType"] == "MsgError":
            # the previous instance lets go of the upload just after the connection ends
            assert message["MsgData"]["ErrorCode"] == ErrorCode.ALREADY_CONNECTED, message
            await client.closed
            refused += 1
            assert refused < 20
            continue
        assert message["MsgData"]["FilePos"] == position
        connections += 1
        client.send("MsgAck", Ack=True)
        end = min(len(data), position + 3 * CHUNK)
        await send_all(client, data[position:end], CHUNK, SEND_AHEAD)
        position = end
        if end == len(data):
            await client.expect("MsgAllDone")
        client.close()
        await client.closed
        if end == len(data):
            break
    post = await backend.posts.get()
    assert (post["id"], post["sha256"], post["size"]) == (ticket, sha256(data), str(len(data)))
    assert (tmp_path / "shared" / ticket).read_bytes() == data
    await stop_all(started)
    await nginx.stop()  # its access log complete
    assert backend.posts.pending == []  # one handover
    (daemon_a, _, a), (daemon_b, _, b) = started
    counts = served(daemon_a, ticket), served(daemon_b, ticket)
    assert min(counts) >= 1 and sum(counts) == connections == 4, counts
    upgrades = [r for r in nginx.requests() if r[1] == "/incoming/frontend/upload_ws"]
    assert [status for _, _, status, _ in upgrades] == [101] * (connections + refused)
    turns = [upstream for *_, upstream in upgrades]
    assert set(turns) == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
    assert all(x != y for x, y in pairwise(turns)), turns  # round robin
    assert nginx.problems() == []


@pytest_twisted.ensureDeferred
async def test_a_tus_upload_resumes_across_instances_through_nginx(
    tmp_path: Path, redis: Redis, nginx: Nginx, backend: Backend, stopper: list[Any]
) -> None:
    started, front, api = await behind_nginx(tmp_path, redis, nginx, stopper)
    data = os.urandom(300 * 1024 + 3)
    ticket = await api.new_upload(backend.url, removeFileWhenFinished="false")
    verdict = "é" * 2048  # the longest (4 KiB), 12 KiB percent-encoded: proxy_buffer_size
    backend.answer = b"done\n" + verdict.encode()
    metadata = "ticket " + base64.b64encode(ticket.encode()).decode()
    created = await treq.post(
        f"{front.base}/tus",  # the endpoint without its slash, as tusd serves it too
        headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": metadata},
    )
    assert created.code == 201
    location = created.headers.getRawHeaders("location")[0]
    assert location == f"/incoming/tus/{ticket}"
    for _ in started:  # each instance gives back the creation's metadata
        probe = await treq.head(f"http://127.0.0.1:{nginx.port}{location}", headers=TUS)
        assert probe.headers.getRawHeaders("upload-metadata") == [metadata]
    stream = {**TUS, "Content-Type": "application/offset+octet-stream"}
    offset, locked, piece = 0, 0, 64 * 1024
    while offset < len(data):  # a PATCH per 64 KiB, each one where nginx sends it
        response = await treq.request(
            "PATCH", f"http://127.0.0.1:{nginx.port}{location}", data=data[offset : offset + piece],
            headers={**stream, "Upload-Offset": str(offset)},
        )  # fmt: skip
        await response.content()
        if response.code == 423:  # the previous instance lets go just after its answer
            locked += 1
            assert locked < 20
            continue
        assert response.code == 204, response.code
        offset = int(response.headers.getRawHeaders("upload-offset")[0])
    assert response.headers.getRawHeaders("incoming-result") == [quote(verdict, safe="")]
    post = await backend.posts.get()
    assert (post["id"], post["sha256"], post["size"]) == (ticket, sha256(data), str(len(data)))
    assert (tmp_path / "shared" / ticket).read_bytes() == data
    await stop_all(started)
    await nginx.stop()
    assert backend.posts.pending == []  # one handover
    heads = [r for r in nginx.requests() if r[0] == "HEAD"]
    assert {upstream for *_, upstream in heads} == {f"127.0.0.1:{s.port}" for *_, s in started}
    patches = [r for r in nginx.requests() if r[0] == "PATCH"]
    assert [status for _, _, status, _ in patches if status != 423] == [204] * 5
    (_, _, a), (_, _, b) = started
    turns = [upstream for _, _, status, upstream in patches if status == 204]
    assert set(turns) == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
    assert nginx.problems() == []


@pytest_twisted.ensureDeferred
async def test_an_upload_goes_on_through_nginx_when_its_instance_is_killed(
    tmp_path: Path, redis: Redis, nginx: Nginx, backend: Backend, stopper: list[Any]
) -> None:
    started, front, api = await behind_nginx(tmp_path, redis, nginx, stopper)
    data = os.urandom(7 * CHUNK + 1)
    ticket = await api.new_upload(backend.url, removeFileWhenFinished="false")
    client = await connect(front.ws_url())
    client.send("MsgUploadReq", Id=ticket, LengthBytes=len(data), Name="f.bin")
    await client.expect("MsgUploadConf")
    client.send("MsgAck", Ack=True)
    await send_all(client, data[: 3 * CHUNK], CHUNK, SEND_AHEAD)
    [(daemon, process, _)] = [s for s in started if served(s[0], ticket)]
    await daemon.kill(process)
    await client.closed
    while True:  # nginx skips the dead instance; the other waits for its lease to run out
        client = await connect(front.ws_url())
        client.send("MsgUploadReq", Id=ticket, LengthBytes=len(data), Name="f.bin")
        message = await client.next()
        if message["MsgType"] == "MsgUploadConf":
            break
        assert message["MsgData"]["ErrorCode"] == ErrorCode.ALREADY_CONNECTED, message
        await client.closed
        await deferLater(reactor, 0.5)
    assert message["MsgData"]["FilePos"] == 3 * CHUNK
    client.send("MsgAck", Ack=True)
    await send_all(client, data[3 * CHUNK :], CHUNK, SEND_AHEAD)
    await client.expect("MsgAllDone")
    post = await backend.posts.get()
    assert (post["id"], post["sha256"], post["size"]) == (ticket, sha256(data), str(len(data)))
    assert (tmp_path / "shared" / ticket).read_bytes() == data
    await stop_all(started)
    assert backend.posts.pending == []
    await nginx.stop()
    # what nginx said of the dead instance: it could not connect, and tried the other
    assert all("connect() failed (111: Connection refused)" in e for e in nginx.problems())
