"""Nothing lost across restarts: SIGKILL at awkward moments, SIGTERM, expiry at start."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import threads

from .conftest import CHUNK_KB, SEND_AHEAD
from .harness import (
    Backend,
    Server,
    acked_upload,
    complete_upload,
    connect,
    send_all,
    start_daemon,
    stop_daemon,
    upload_request,
    upload_small,
)
from .test_websocket import client_frame, handshake

CHUNK = CHUNK_KB * 1024


@pytest_twisted.ensureDeferred
async def test_sigkill_mid_upload_then_resume_is_byte_identical(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    data = os.urandom(20 * CHUNK + 11)
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false", backendSecret="k")
    client, _ = await upload_request(server, ticket, len(data), name="big.bin")
    client.send("MsgAck", Ack=True)
    await send_all(client, data[: 5 * CHUNK], CHUNK, SEND_AHEAD)
    for i in range(5, 5 + SEND_AHEAD):  # in flight when the server dies
        client.send_chunk(data[i * CHUNK : (i + 1) * CHUNK])
    await daemon.kill(process)
    await client.closed

    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    resumed, conf = await upload_request(server, ticket, len(data), name="big.bin")
    position = conf["FilePos"]
    assert 5 * CHUNK <= position <= (5 + SEND_AHEAD) * CHUNK
    assert (storage / f"{ticket}.part").read_bytes() == data[:position]
    resumed.send("MsgAck", Ack=True)
    await send_all(resumed, data[position:], CHUNK, SEND_AHEAD)
    post = await backend.posts.get()
    assert (post["id"], post["backendSecret"], post["filenameFromBrowser"]) == (
        ticket,
        "k",
        "big.bin",
    )
    await resumed.expect("MsgAllDone")
    assert (storage / ticket).read_bytes() == data
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_sigkill_during_handover_redoes_it_with_the_whole_file(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    data = os.urandom(3 * CHUNK)
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    client, _ = await upload_request(server, ticket, len(data))
    client.send("MsgAck", Ack=True)
    backend.hold = True
    await send_all(client, data, CHUNK, SEND_AHEAD)
    first = await backend.posts.get()  # the handover is under way, and hangs
    assert first["filename"] == str(storage / ticket)
    await daemon.kill(process)

    backend.hold = False
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    again = await backend.posts.get()
    assert (again["id"], again["cancelled"], again["size"]) == (ticket, "no", str(len(data)))
    assert (storage / ticket).read_bytes() == data
    late = await connect_and_request(server, ticket, len(data))
    await late.expect_error(11)  # TICKET_FINISHED: the redone handover was answered `done`
    await stop_daemon(daemon, process)


async def connect_and_request(server: Server, ticket: str, length: int) -> Any:
    client = await connect(server.ws_url())
    client.send("MsgUploadReq", Id=ticket, LengthBytes=length, Name="x")
    return client


@pytest_twisted.ensureDeferred
async def test_sigkill_while_waiting_for_finish_upload(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    backend.answer = b"wait"
    ticket, client = await upload_small(server, backend.url, b"wxyz", backendSecret="k")
    first = await backend.posts.get()
    assert (first["id"], first["cancelled"]) == (ticket, "no")
    await daemon.logged(rb"handed over; the backend will call finish_upload")
    await daemon.kill(process)

    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    late, conf = await upload_request(server, ticket, 4)
    assert conf["FilePos"] == 4
    late.send("MsgAck", Ack=True)
    response = await treq.post(f"{server.base}/backend/finish_upload",
                               data={"id": ticket, "backendSecret": "k"})  # fmt: skip
    assert response.code == 200
    await late.expect("MsgAllDone")
    assert not (storage / ticket).exists()  # removeFileWhenFinished defaulted to true
    assert len(backend.posts.pending) == 0  # no second handover was needed
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_uploads_expired_while_down_are_cancelled_at_start(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    ticket = await server.new_upload(backend.url, backendSecret="k")
    client, _ = await upload_request(server, ticket, 2 * CHUNK)
    client.send("MsgAck", Ack=True)
    await send_all(client, b"q" * CHUNK, CHUNK, SEND_AHEAD)
    await stop_daemon(daemon, process)
    state = storage / f"{ticket}.json"
    record = json.loads(state.read_text())
    record["idle_deadline"] -= 43201  # as if the server had stayed down past the idle limit
    state.write_text(json.dumps(record))
    part = storage / f"{ticket}.part"
    os.utime(part, (part.stat().st_atime, part.stat().st_mtime - 43201))

    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    notice = await backend.posts.get()
    assert (notice["id"], notice["cancelled"], notice["backendSecret"]) == (ticket, "yes", "k")
    assert "idle" in notice["cancelReason"]
    await daemon.logged(rb"expired \(idle\)")
    assert not (storage / f"{ticket}.part").exists()
    again = await connect_and_request(server, ticket, 2 * CHUNK)
    await again.expect_error(12)  # TICKET_CANCELLED
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_sigterm_sends_browsers_away_with_1001_and_keeps_the_upload(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    data = os.urandom(4 * CHUNK)
    sock = await threads.deferToThread(handshake, server.port)

    def begin() -> bytes:
        request = {"Id": ticket, "LengthBytes": len(data), "Name": "n"}
        sock.sendall(
            client_frame(1, json.dumps({"MsgType": "MsgUploadReq", "MsgData": request}).encode())
        )
        answer = sock.recv(4096)
        sock.sendall(client_frame(1, b'{"MsgType":"MsgAck","MsgData":{"Ack":true}}'))
        sock.sendall(client_frame(2, data[:CHUNK]))
        while answer.count(b"MsgChunkAck") < 1:
            answer += sock.recv(4096)
        return answer

    assert b"MsgUploadConf" in await threads.deferToThread(begin)
    process.signalProcess("TERM")

    def rest() -> bytes:
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        sock.close()
        return received

    received = await threads.deferToThread(rest)
    close = received[received.rindex(b"\x88") :]
    assert struct.unpack_from("!H", close, 2)[0] == 1001
    await daemon.ended
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    resumed, conf = await upload_request(server, ticket, len(data))
    assert conf["FilePos"] == CHUNK
    await complete_upload(resumed, data[CHUNK:], CHUNK, SEND_AHEAD)
    assert (storage / ticket).read_bytes() == data
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_sigkill_right_after_ticket_creation_keeps_the_ticket(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    tickets = [await server.new_upload(backend.url, backendSecret=f"k{i}") for i in range(5)]
    await daemon.kill(process)
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    client, conf = await upload_request(server, tickets[3], 2)
    assert conf["FilePos"] == 0
    client.send("MsgAck", Ack=True)
    client.send_chunk(b"ok")
    await client.expect("MsgChunkAck")
    post = await backend.posts.get()
    assert (post["id"], post["backendSecret"]) == (tickets[3], "k3")
    await client.expect("MsgAllDone")
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_an_upload_active_until_the_kill_is_not_expired_by_its_old_saved_deadline(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    ticket, client, _ = await acked_upload(server, backend.url, 3 * CHUNK)
    await send_all(client, b"a" * CHUNK, CHUNK, SEND_AHEAD)
    await daemon.kill(process)
    state = storage / f"{ticket}.json"
    record = json.loads(state.read_text())
    record["idle_deadline"] -= 43201  # saved at connect, long ago; bytes kept arriving since
    state.write_text(json.dumps(record))
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    resumed, conf = await upload_request(server, ticket, 3 * CHUNK)
    assert conf["FilePos"] == CHUNK
    await complete_upload(resumed, b"a" * 2 * CHUNK, CHUNK, SEND_AHEAD)
    assert backend.posts.pending[-1]["cancelled"] == "no"
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_a_file_the_backend_kept_outlives_its_forgotten_ticket(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    ticket, client = await upload_small(
        server, backend.url, b"mine", removeFileWhenFinished="false"
    )
    await client.expect("MsgAllDone")
    await daemon.kill(process)
    state = storage / f"{ticket}.json"
    record = json.loads(state.read_text())
    record["idle_deadline"] -= 43201  # the finished ticket's time to be forgotten has come
    state.write_text(json.dumps(record))
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    await daemon.logged(rf"upload {ticket} forgotten".encode())
    await stop_daemon(daemon, process)
    assert not state.exists()
    assert (storage / ticket).read_bytes() == b"mine"  # the backend's file, untouched
