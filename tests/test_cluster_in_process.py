"""A cluster instance in this process, on a real redis-server: concurrent requests for an
upload it does not hold yet, and its health while Redis is away (issue 16)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater

from incoming.config import Config
from incoming.errors import ErrorCode, UploadError

from .harness import (
    CHUNK_KB,
    Backend,
    Redis,
    Server,
    complete_upload,
    log_line,
    serving,
    upload_request,
)

CHUNK = CHUNK_KB * 1024
TUS = {"Tus-Resumable": "1.0.0"}
STREAM = {**TUS, "Content-Type": "application/offset+octet-stream"}


@pytest_twisted.async_yield_fixture
async def instance(config: Config, redis: Redis) -> AsyncIterator[Server]:
    """A cluster instance on the test's Redis, in this process."""
    async with serving(dataclasses.replace(config, redis=redis.url, ws_timeout=3)) as server:
        server.manager.start()
        yield server


def creation(ticket: str, length: int) -> dict[str, str]:
    encoded = base64.b64encode(ticket.encode()).decode()
    return {**TUS, "Upload-Length": str(length), "Upload-Metadata": f"ticket {encoded}"}


async def let_go(server: Server, ticket: str) -> None:
    """Until the instance no longer holds the upload (its lease released)."""
    await server.settled()
    assert server.manager.get(ticket) is None


@pytest_twisted.ensureDeferred
async def test_concurrent_holds_each_get_the_upload_or_the_refusal(
    instance: Server, backend: Backend
) -> None:
    manager = instance.manager
    ticket = await instance.new_upload(backend.url)
    first, second = ensureDeferred(manager.hold(ticket)), ensureDeferred(manager.hold(ticket))
    assert await first is await second is manager.get(ticket)
    unknown = "0b5a6fcd-7f5b-4f5e-9bb0-4de4b1fd5c39"
    holds = [ensureDeferred(manager.hold(unknown)) for _ in range(3)]
    for hold in holds:
        with pytest.raises(UploadError) as refused:
            await hold
        assert refused.value.code is ErrorCode.UNKNOWN_TICKET


@pytest_twisted.ensureDeferred
async def test_eight_concurrent_tus_creations_all_succeed(
    instance: Server, backend: Backend
) -> None:
    ticket = await instance.new_upload(backend.url)
    requests = [treq.post(f"{instance.base}/tus/", headers=creation(ticket, 100)) for _ in range(8)]
    answers = [response for _, response in await DeferredList(requests, fireOnOneErrback=True)]
    assert [response.code for response in answers] == [201] * 8
    await let_go(instance, ticket)
    head = await treq.head(f"{instance.base}/tus/{ticket}", headers=TUS)
    assert head.headers.getRawHeaders("upload-length") == ["100"]


@pytest_twisted.ensureDeferred
async def test_a_cancel_racing_a_patch_is_never_lost(instance: Server, backend: Backend) -> None:
    for _ in range(5):
        ticket = await instance.new_upload(backend.url, backendSecret="k")
        created = await treq.post(f"{instance.base}/tus/", headers=creation(ticket, 4 * CHUNK))
        assert created.code == 201
        await let_go(instance, ticket)
        patch = treq.request(
            "PATCH", f"{instance.base}/tus/{ticket}", data=b"p" * CHUNK,
            headers={**STREAM, "Upload-Offset": "0"},
        )  # fmt: skip
        cancel = treq.post(
            f"{instance.base}/backend/cancel_upload", data={"id": ticket, "backendSecret": "k"}
        )
        (_, patched), (_, cancelled) = await DeferredList([patch, cancel], fireOnOneErrback=True)
        assert (cancelled.code, await cancelled.text()) == (200, "ok")
        assert patched.code in (204, 410), await patched.text()
        await instance.settled()
        head = await treq.head(f"{instance.base}/tus/{ticket}", headers=TUS)
        assert head.code == 410  # cancelled
        assert not (instance.storage_dir / f"{ticket}.part").exists()


class AbortedPatch(Protocol):
    """Sends a PATCH's head and part of its body, then hangs up."""

    def __init__(self, ticket: str, data: bytes) -> None:
        self.request = (
            f"PATCH /incoming/tus/{ticket} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Tus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\n"
            f"Upload-Offset: 0\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode() + data[:100]

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)
        self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_many_quickly_aborted_patches_do_no_harm(
    instance: Server, backend: Backend, server_log: list[str]
) -> None:
    data = os.urandom(3 * CHUNK)
    ticket = await instance.new_upload(backend.url, removeFileWhenFinished="false")
    created = await treq.post(f"{instance.base}/tus/", headers=creation(ticket, len(data)))
    assert created.code == 201
    await let_go(instance, ticket)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", instance.port)
    for _ in range(50):
        await connectProtocol(endpoint, AbortedPatch(ticket, data))
    await instance.settled()
    for _attempt in range(100):  # an aborted PATCH may still be letting go of it: 423
        head = await treq.head(f"{instance.base}/tus/{ticket}", headers=TUS)
        offset = head.headers.getRawHeaders("upload-offset")[0]
        response = await treq.request(
            "PATCH", f"{instance.base}/tus/{ticket}", data=data[int(offset) :],
            headers={**STREAM, "Upload-Offset": offset},
        )  # fmt: skip
        if response.code != 423:
            break
        await deferLater(reactor, 0.1, lambda: None)
    else:
        pytest.fail("the upload stayed locked (423) for 10 s")
    assert response.code == 204, await response.text()
    post = await backend.posts.get()
    assert post["sha256"] == hashlib.sha256(data).hexdigest()
    assert (instance.storage_dir / ticket).read_bytes() == data
    failures = [line for line in server_log if "internal error" in line or "Traceback" in line]
    assert failures == []


async def health(server: Server) -> tuple[int, str]:
    response = await treq.get(f"{server.base}/health")
    return response.code, await response.text()


@pytest_twisted.ensureDeferred
async def test_health_follows_redis_while_no_upload_is_held(instance: Server, redis: Redis) -> None:
    assert await health(instance) == (200, "ok")
    assert len(instance.manager) == 0
    with log_line("Redis is unavailable") as away:
        await redis.stop()
        stopped = reactor.seconds()
        await away.addTimeout(10, reactor)
    assert reactor.seconds() - stopped < 4  # a PING a second, each given 2 s
    assert await health(instance) == (503, "redis unavailable")
    with log_line("Redis is back") as back:
        await redis.start()
        await back.addTimeout(20, reactor)  # the client reconnects within 10 s
    assert await health(instance) == (200, "ok")


@pytest_twisted.ensureDeferred
async def test_an_upload_whose_lease_another_instance_took_is_let_go_here(
    instance: Server, backend: Backend
) -> None:
    """Renewal finds the lease taken (this instance stalled past it): the upload is
    dropped here and its client sent away; once the lease is free it goes on here."""
    coordinator = instance.manager.coordinator
    assert coordinator is not None
    data = os.urandom(3 * CHUNK)
    ticket = await instance.new_upload(backend.url, removeFileWhenFinished="false")
    client, conf = await upload_request(instance, ticket, len(data))
    assert instance.manager.get(ticket) is not None
    lease = f"incoming:lease:{ticket}"
    await coordinator.cluster._call("set", lease, "another-instance")
    await coordinator._renew()
    assert instance.manager.get(ticket) is None
    await client.closed  # going away
    await coordinator.cluster._call("delete", lease)  # that instance died
    client, conf = await upload_request(instance, ticket, len(data))
    assert conf["FilePos"] == 0
    await complete_upload(client, data, CHUNK, 4)
    post = await backend.posts.get()
    assert post["sha256"] == hashlib.sha256(data).hexdigest()
    assert (instance.storage_dir / ticket).read_bytes() == data
