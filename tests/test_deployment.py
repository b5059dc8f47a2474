"""Deployment options: metrics, health, a separate backend listener, allow-lists."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor, threads
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.python.threadpool import ThreadPool

from incoming.config import Config
from incoming.service import build_manager, build_site

from .conftest import CHUNK_KB, SEND_AHEAD
from .harness import Backend, Server, complete_upload, serving, upload_request
from .test_access import call, other_address

CHUNK = CHUNK_KB * 1024


@pytest_twisted.ensureDeferred
async def test_metrics_count_what_happened(server: Server, backend: Backend) -> None:
    data = os.urandom(3 * CHUNK + 5)
    ticket = await server.new_upload(backend.url)
    await server.new_upload(backend.url)  # one that stays in `receiving`
    client, _ = await upload_request(server, ticket, len(data))
    await complete_upload(client, data, CHUNK, SEND_AHEAD)
    await client.closed
    response = await treq.get(f"{server.base}/metrics")
    text = await response.text()
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain; version=")
    figures = {k: float(v) for k, v in re.findall(r"^(\S+) (\S+)$", text, re.M)}
    assert figures['incoming_uploads{state="finished"}'] == 1
    assert figures['incoming_uploads{state="receiving"}'] == 1
    assert figures["incoming_tickets_created_total"] == 2
    assert figures["incoming_bytes_received_total"] == len(data)
    assert figures["incoming_handover_attempts_total"] == 1
    assert figures["incoming_handover_failures_total"] == 0
    assert figures["incoming_websocket_connections"] == 0
    assert figures["incoming_chunk_write_seconds_count"] == 4
    assert figures['incoming_chunk_write_seconds_bucket{le="+Inf"}'] == 4
    assert figures["process_open_fds"] > 0 and figures["process_resident_memory_bytes"] > 0


@pytest_twisted.ensureDeferred
async def test_health(server: Server) -> None:
    response = await treq.get(f"{server.base}/health")
    assert (response.code, await response.text()) == (200, "ok")


@pytest_twisted.async_yield_fixture
async def split(config: Config) -> AsyncIterator[tuple[Server, str]]:
    """A public listener for browsers and a separate one for the backend API."""
    pool = ThreadPool(minthreads=1, maxthreads=2)
    pool.start()
    manager = build_manager(config, reactor, pool)
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    public = await endpoint.listen(build_site(manager, config, reactor, backend=False))
    private = await endpoint.listen(build_site(manager, config, reactor, browser=False))
    yield (
        Server(manager, public.getHost().port, config.storage_dir),
        f"http://127.0.0.1:{private.getHost().port}/incoming",
    )
    await public.stopListening()
    await private.stopListening()
    await ensureDeferred(manager.shutdown())
    pool.stop()


@pytest_twisted.ensureDeferred
async def test_backend_api_only_on_its_own_listener(split: Any, backend: Backend) -> None:
    public, private = split
    for path in ("backend/new_upload", "0.1/backend/cancel_upload", "backend/finish_upload"):
        response = await treq.post(f"{public.base}/{path}", data={"signalFinishURL": backend.url})
        assert response.code == 404, path
    for path in ("metrics", "health"):
        assert (await treq.get(f"{public.base}/{path}")).code == 404
        assert (await treq.get(f"{private}/{path}")).code == 200
    assert (await treq.get(f"{private}/frontend/incoming.js")).code == 404
    response = await treq.post(
        f"{private}/backend/new_upload", data={"signalFinishURL": backend.url}
    )
    ticket = await response.text()
    assert response.code == 200
    assert (await treq.get(f"{public.base}/frontend/incoming.js")).code == 200
    client, _ = await upload_request(public, ticket, 3)
    client.send("MsgAck", Ack=True)
    client.send_chunk(b"abc")
    await client.expect("MsgChunkAck")
    await client.expect("MsgAllDone")


@pytest_twisted.ensureDeferred
async def test_a_separate_backend_listener_answers_whoever_reaches_it(
    backend: Backend, split: tuple[Server, str]
) -> None:
    remote = other_address()
    _public, private = split
    port = int(private.split(":")[2].split("/")[0])
    own_url = f"http://{remote}:{backend.port}/handover"
    code, _ = await call(
        port, "POST", "backend/new_upload", form={"signalFinishURL": own_url}, source=remote
    )
    assert code == 200
    code, _ = await call(  # but its handovers still go to the caller's host only
        port, "POST", "backend/new_upload", form={"signalFinishURL": backend.url}, source=remote
    )
    assert code == 400


@pytest_twisted.ensureDeferred
async def test_websocket_origin_allow_list(config: Config) -> None:
    config = dataclasses.replace(config, allowed_origins=frozenset({"https://app.example"}))

    def status(server: Server, origin: str | None) -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            extra = f"Origin: {origin}\r\n" if origin else ""
            s.sendall(
                "GET /incoming/frontend/upload_ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\n{extra}\r\n".encode()
            )
            return s.recv(4096).split(b" ")[1]

    async with serving(config) as server:
        assert await threads.deferToThread(status, server, "https://evil.example") == b"403"
        assert await threads.deferToThread(status, server, "https://APP.example/") == b"101"
        assert await threads.deferToThread(status, server, None) == b"101"  # not a browser
