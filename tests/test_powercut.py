"""Acknowledged means durable (SPEC): the real daemon on the power-cut file system, killed
(SIGKILL) and then cut off from everything it did not fsync, at each moment a client or
the backend was told something; restarted on what survived, every ticket, offset (the
same bytes) and finished file it acknowledged is there, and the upload finishes from
where it stands with the right SHA-256."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor

from .harness import (
    CHUNK_KB,
    SEND_AHEAD,
    Backend,
    Client,
    Server,
    acked_upload,
    send_all,
    start_daemon,
    stop_daemon,
    upload_request,
)
from .powercut import PowerCutDir
from .test_restart import connect_and_request
from .test_tus import create, head, header, patch

CHUNK = CHUNK_KB * 1024


class Run:
    """The daemon on a storage directory it creates itself on the power-cut file system."""

    def __init__(self, directory: PowerCutDir, cwd: Path, stopper: list[Any]) -> None:
        self.directory = directory
        self.storage = directory.path / "storage"
        self.cwd = cwd
        self.stopper = stopper
        self.daemon: Any = None
        self.process: Any = None

    async def start(self) -> Server:
        self.daemon, self.process, server = await start_daemon(self.storage, self.cwd, self.stopper)
        return server

    async def power_cut(self) -> Server:
        """SIGKILL, lose what was not fsynced, start again on what survived."""
        await self.daemon.kill(self.process)
        await self.directory.power_cut()
        return await self.start()

    async def stop(self) -> None:
        await stop_daemon(self.daemon, self.process)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def finish_over_websocket(server: Server, ticket: str, data: bytes) -> Client:
    """Resume where the server stands and send the rest; returns the client after its
    MsgAllDone. The bytes already stored must be the source's."""
    client, conf = await upload_request(server, ticket, len(data))
    position = conf["FilePos"]
    stored = (server.storage_dir / f"{ticket}.part").read_bytes() if position else b""
    assert stored == data[:position]
    client.send("MsgAck", Ack=True)
    await send_all(client, data[position:], CHUNK, SEND_AHEAD)
    await client.expect("MsgAllDone")
    return client


async def handed_over(backend: Backend, ticket: str, data: bytes) -> dict[str, str]:
    post = await backend.posts.get().addTimeout(30, reactor)  # none comes if the file is lost
    assert (post["id"], post["cancelled"]) == (ticket, "no")
    assert (post["size"], post["sha256"]) == (str(len(data)), sha256(data))
    return post


@pytest_twisted.ensureDeferred
async def test_tickets_answered_by_new_upload_survive(
    powercut_dir: PowerCutDir, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    run = Run(powercut_dir, tmp_path, stopper)
    server = await run.start()
    tickets = [await server.new_upload(backend.url, backendSecret=f"k{i}") for i in range(5)]

    server = await run.power_cut()
    for ticket in tickets:
        client, conf = await upload_request(server, ticket, 3 * CHUNK)
        assert conf["FilePos"] == 0
        client.close()
        await client.closed
    data = os.urandom(3 * CHUNK)
    await finish_over_websocket(server, tickets[3], data)
    post = await handed_over(backend, tickets[3], data)
    assert post["backendSecret"] == "k3"
    await run.stop()


@pytest_twisted.ensureDeferred
async def test_a_tus_creation_survives(
    powercut_dir: PowerCutDir, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    run = Run(powercut_dir, tmp_path, stopper)
    server = await run.start()
    ticket = await server.new_upload(backend.url)
    data = os.urandom(5 * CHUNK + 3)
    assert (await create(server, ticket, len(data))).code == 201

    server = await run.power_cut()
    status = await head(server, ticket)
    assert status.code == 200
    assert (header(status, "Upload-Offset"), header(status, "Upload-Length")) == (
        "0",
        str(len(data)),
    )
    final = await patch(server, ticket, 0, data)
    assert final.code == 204, await final.text()
    post = await handed_over(backend, ticket, data)
    assert post["filenameFromBrowser"] == "photo.jpg"
    await run.stop()


@pytest_twisted.ensureDeferred
async def test_acknowledged_patches_survive_with_their_bytes(
    powercut_dir: PowerCutDir, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    run = Run(powercut_dir, tmp_path, stopper)
    server = await run.start()
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    data = os.urandom(20 * CHUNK + 5)
    assert (await create(server, ticket, len(data))).code == 201
    piece, acknowledged = 3 * CHUNK + 1, 0
    for _ in range(4):
        answer = await patch(
            server, ticket, acknowledged, data[acknowledged : acknowledged + piece]
        )
        assert answer.code == 204, await answer.text()
        acknowledged = int(header(answer, "Upload-Offset") or "")
        assert acknowledged > 0

    server = await run.power_cut()
    status = await head(server, ticket)
    offset = int(header(status, "Upload-Offset") or "")
    assert offset == acknowledged
    assert (run.storage / f"{ticket}.part").read_bytes() == data[:offset]
    final = await patch(server, ticket, offset, data[offset:])
    assert final.code == 204, await final.text()
    await handed_over(backend, ticket, data)
    assert (run.storage / ticket).read_bytes() == data
    await run.stop()


@pytest_twisted.ensureDeferred
async def test_acknowledged_websocket_chunks_survive_with_their_bytes(
    powercut_dir: PowerCutDir, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    run = Run(powercut_dir, tmp_path, stopper)
    server = await run.start()
    data = os.urandom(30 * CHUNK + 7)
    ticket, client, _ = await acked_upload(server, backend.url, len(data))
    await send_all(client, data[: 12 * CHUNK], CHUNK, SEND_AHEAD)
    acknowledged = 12 * CHUNK
    for i in range(12, 12 + SEND_AHEAD):  # in flight: some may be acknowledged, some not
        client.send_chunk(data[i * CHUNK : (i + 1) * CHUNK])
    ack = await client.expect("MsgChunkAck")
    acknowledged += ack["ChunkSize"]

    server = await run.power_cut()
    await client.closed
    while (message := await client.next()) is not None:  # acks sent before the kill count
        if message["MsgType"] == "MsgChunkAck":
            acknowledged += message["MsgData"]["ChunkSize"]
    resumed, conf = await upload_request(server, ticket, len(data))
    assert conf["FilePos"] >= acknowledged
    resumed.close()
    await resumed.closed
    await finish_over_websocket(server, ticket, data)
    await handed_over(backend, ticket, data)
    await run.stop()


@pytest_twisted.ensureDeferred
async def test_a_finished_upload_and_its_file_survive(
    powercut_dir: PowerCutDir, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    run = Run(powercut_dir, tmp_path, stopper)
    server = await run.start()
    backend.answer = b'done\n{"kept": true}'
    ws_data, tus_data = os.urandom(4 * CHUNK + 1), os.urandom(3 * CHUNK + 2)
    by_ws = await server.new_upload(backend.url, removeFileWhenFinished="false")
    await finish_over_websocket(server, by_ws, ws_data)
    by_tus = await server.new_upload(backend.url, removeFileWhenFinished="false")
    assert (await create(server, by_tus, len(tus_data))).code == 201
    final = await patch(server, by_tus, 0, tus_data)
    assert final.code == 204

    server = await run.power_cut()
    assert (run.storage / by_ws).read_bytes() == ws_data
    assert (run.storage / by_tus).read_bytes() == tus_data
    status = await head(server, by_tus)
    assert (status.code, header(status, "Upload-Offset")) == (200, str(len(tus_data)))
    assert header(status, "Incoming-Result") == "%7B%22kept%22%3A%20true%7D"
    again = await connect_and_request(server, by_ws, len(ws_data))
    refused = await again.expect_error(11)  # TICKET_FINISHED, with the backend's verdict
    assert refused["Result"] == '{"kept": true}'
    await run.stop()


@pytest_twisted.ensureDeferred
async def test_a_handover_cut_short_is_redone_with_the_whole_file(
    powercut_dir: PowerCutDir, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    run = Run(powercut_dir, tmp_path, stopper)
    server = await run.start()
    data = os.urandom(6 * CHUNK + 9)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    client, _ = await upload_request(server, ticket, len(data))
    client.send("MsgAck", Ack=True)
    backend.hold = True  # the backend takes its time: the server dies meanwhile
    await send_all(client, data, CHUNK, SEND_AHEAD)
    await handed_over(backend, ticket, data)

    backend.release()
    server = await run.power_cut()
    await handed_over(backend, ticket, data)  # again, after the restart
    assert (run.storage / ticket).read_bytes() == data
    await run.stop()
