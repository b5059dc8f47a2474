"""The real daemon against careless and hostile use: file modes, what it logs,
file descriptors, and memory per connection whatever a client sends."""

from __future__ import annotations

import base64
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import threads

from .harness import (
    CHUNK_KB,
    SEND_AHEAD,
    Backend,
    Server,
    acked_upload,
    send_all,
    start_daemon,
    stop_daemon,
    upload_request,
    upload_small,
)
from .system import NEEDS_ROOT, open_directory, spawn_twistd, throwaway_accounts
from .test_websocket import client_frame, handshake

CHUNK = CHUNK_KB * 1024
MiB = 1024 * 1024


def resident_bytes(pid: int) -> int:
    """The process's resident memory (VmRSS)."""
    status = Path(f"/proc/{pid}/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(kib) * 1024


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest_twisted.ensureDeferred
async def test_state_files_are_private_and_data_files_not_world_readable(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "new" / "storage"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    ticket = await server.new_upload(backend.url, backendSecret="s3cret")
    kept = await server.new_upload(backend.url, removeFileWhenFinished="false")
    client, _ = await upload_request(server, ticket, 2 * CHUNK)
    client.send("MsgAck", Ack=True)
    await send_all(client, b"p" * CHUNK, CHUNK, SEND_AHEAD)
    _, done = await upload_small(server, backend.url, b"q")
    other, _ = await upload_request(server, kept, 1)
    other.send("MsgAck", Ack=True)
    other.send_chunk(b"k")
    await other.expect("MsgChunkAck")
    await other.expect("MsgAllDone")
    await stop_daemon(daemon, process)
    assert mode(storage) == 0o750  # created by the server
    assert mode(storage / "tickets.journal") == 0o600  # every live ticket's backendSecret
    assert mode(storage / f"{ticket}.json") == 0o600
    assert mode(storage / f"{ticket}.part") == 0o640
    assert mode(storage / kept) == 0o640


@NEEDS_ROOT
@pytest_twisted.ensureDeferred
async def test_a_backend_in_the_group_moves_and_deletes_handed_over_files(
    backend: Backend, stopper: list[Any]
) -> None:
    """Two real users: the daemon's, and the backend's, both in `--group` (here a
    supplementary group of the daemon's user: the directory must be setgid)."""
    with throwaway_accounts("supplementary") as who, open_directory() as top:
        state = top / "lib"
        state.mkdir()
        os.chown(state, who.server.uid, who.server.gid)
        storage = state / "storage"
        daemon, process = spawn_twistd(
            ["incoming", "--listen", "tcp:0:interface=127.0.0.1", "--storage-dir", str(storage),
             "--group", who.group],
            top, account=who.server,
        )  # fmt: skip
        stopper.append(process)
        server = Server(manager=None, port=await daemon.listening, storage_dir=storage)  # type: ignore[arg-type]
        files = {}
        for content in (b"moved by the backend", b"deleted by the backend"):
            ticket, client = await upload_small(
                server, backend.url, content, removeFileWhenFinished="false", backendSecret="s"
            )
            await client.expect("MsgAllDone")
            files[(await backend.posts.get())["filename"]] = content
        pending = await server.new_upload(backend.url, backendSecret="secret")
        await upload_request(server, pending, 10)  # its state file is written
        assert storage.stat().st_gid == who.gid
        assert mode(storage) == 0o770 | stat.S_ISGID
        (moved, kept), (deleted, _) = files.items()
        for path in (moved, deleted):
            assert Path(path).stat().st_gid == who.gid and mode(Path(path)) == 0o640
        state_file = storage / f"{pending}.json"
        assert mode(state_file) == 0o600  # backend secrets stay the daemon's
        # what another user in the group may do, and may not
        away = top / "backend-files"
        away.mkdir()
        os.chown(away, who.backend.uid, who.backend.gid)
        assert who.backend.run("mv", moved, str(away)).returncode == 0
        assert who.backend.run("rm", "-f", deleted).returncode == 0
        assert (away / Path(moved).name).read_bytes() == kept
        assert not Path(moved).exists() and not Path(deleted).exists()
        assert "Permission denied" in who.backend.run("cat", str(state_file)).stderr
        # and a user outside the group: nothing
        assert "Permission denied" in who.outsider.run("ls", str(storage)).stderr
        await stop_daemon(daemon, process)


@NEEDS_ROOT
@pytest_twisted.ensureDeferred
async def test_a_daemon_outside_the_group_says_so_and_exits(stopper: list[Any]) -> None:
    with throwaway_accounts() as who, open_directory() as top:
        storage = top / "storage"
        storage.mkdir()
        os.chown(storage, who.outsider.uid, who.outsider.gid)
        daemon, process = spawn_twistd(
            ["incoming", "--storage-dir", str(storage), "--group", who.group], top,
            account=who.outsider,
        )  # fmt: skip
        stopper.append(process)
        assert (await daemon.ended)[0] == 1
        assert daemon.output.decode().splitlines() == [
            f"incoming: cannot use the storage directory {storage}: Operation not permitted"
        ]
        assert storage.stat().st_gid == who.outsider.gid


@pytest_twisted.ensureDeferred
async def test_failed_backend_calls_are_logged_without_query_or_form_values(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    daemon, process, server = await start_daemon(tmp_path / "s", tmp_path, stopper)
    ticket = await server.new_upload(backend.url, backendSecret="right")
    response = await treq.post(
        f"{server.base}/backend/cancel_upload?backendSecret=QUERY-SECRET&id={ticket}",
        data={"backendSecret": "FORM-SECRET"},
    )
    assert response.code == 403
    await stop_daemon(daemon, process)
    log = daemon.output.decode()
    assert '"POST /incoming/backend/cancel_upload" 403' in log
    assert "QUERY-SECRET" not in log and "FORM-SECRET" not in log


@pytest_twisted.ensureDeferred
async def test_client_text_is_logged_short(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    daemon, process, server = await start_daemon(tmp_path / "s", tmp_path, stopper)
    ticket, client, _ = await acked_upload(server, backend.url, 10)
    client.send("MsgError", ErrorCode=1, Msg="x" * 60_000)
    client.send("MsgBogus" + "y" * 60_000)
    await client.expect_error(2)  # UNKNOWN_MESSAGE_TYPE
    await stop_daemon(daemon, process)
    assert daemon.output.count(b"x") < 1000 and daemon.output.count(b"y") < 1000


@pytest_twisted.ensureDeferred
async def test_abandoned_uploads_hold_no_file_descriptors(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    """Many resumable uploads left half-sent must not use up the daemon's fds."""
    daemon, process, server = await start_daemon(tmp_path / "s", tmp_path, stopper, max_files=64)
    for _ in range(80):  # more uploads than the daemon may open files
        ticket, client, _ = await acked_upload(server, backend.url, 2 * CHUNK)
        client.send_chunk(b"a" * CHUNK)
        await client.expect("MsgChunkAck")
        client.close()
        await client.closed
    ticket, client = await upload_small(server, backend.url, b"still works")
    await client.expect("MsgAllDone")
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_sigterm_does_not_rewrite_never_used_tickets(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    tickets = [await server.new_upload(backend.url) for _ in range(300)]
    await stop_daemon(daemon, process)
    assert list(storage.glob("*.json")) == []  # they are all in the journal already
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    ticket, client = await upload_small(server, backend.url, b"ok")
    late, conf = await upload_request(server, tickets[-1], 2)
    assert conf["FilePos"] == 0  # known after the restart
    late.close()
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_frame_headers_reserve_no_memory_before_their_payload(
    tmp_path: Path, stopper: list[Any]
) -> None:
    daemon, process, server = await start_daemon(
        tmp_path / "s", tmp_path, stopper, "--chunk-size-kb", "16384"
    )
    before = resident_bytes(process.pid)

    def announce(count: int) -> list[socket.socket]:
        sockets = []
        for _ in range(count):
            s = handshake(server.port)
            # a ping (answered once the server has read what follows it), then a header
            # announcing a 16 MiB binary frame whose payload never comes
            s.sendall(client_frame(0x9, b"p") + struct.pack("!BBQ", 0x82, 0xFF, 16 * MiB) + b"mask")
            assert s.recv(16)[:1] == b"\x8a"  # the pong
            sockets.append(s)
        return sockets

    sockets = await threads.deferToThread(announce, 40)
    grown = resident_bytes(process.pid) - before
    for s in sockets:
        s.close()
    await stop_daemon(daemon, process)
    assert grown < 64 * MiB  # 40 x 16 MiB had they been reserved


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_reads_its_pongs_is_not_read_either(
    tmp_path: Path, stopper: list[Any]
) -> None:
    daemon, process, server = await start_daemon(tmp_path / "s", tmp_path, stopper)
    before = resident_bytes(process.pid)
    pings = client_frame(0x9, b"p" * 125) * 8000  # about 1 MiB of pings per send

    def flood() -> int:
        sent = 0
        with handshake(server.port) as s:
            s.settimeout(3)  # the server stops reading: our sends stall
            try:
                while sent < 256 * MiB:
                    s.sendall(pings)
                    sent += len(pings)
            except TimeoutError:
                pass
        return sent

    sent = await threads.deferToThread(flood)
    grown = resident_bytes(process.pid) - before
    await stop_daemon(daemon, process)
    assert sent < 64 * MiB  # kernel buffers, not the server's memory
    assert grown < 32 * MiB


@pytest_twisted.ensureDeferred
async def test_a_large_tus_patch_is_written_as_it_arrives_in_bounded_memory(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    """256 MiB in one PATCH: the server's peak memory grows by a few MB, not by the body."""
    daemon, process, server = await start_daemon(
        tmp_path / "s", tmp_path, stopper, "--chunk-size-kb", "512", "--send-ahead", "4"
    )
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    size = 256 * MiB
    response = await treq.post(
        f"{server.base}/tus/",
        headers={"Tus-Resumable": "1.0.0", "Upload-Length": str(size),
                 "Upload-Metadata": "ticket " + base64.b64encode(ticket.encode()).decode()},
    )  # fmt: skip
    assert response.code == 201
    before = resident_bytes(process.pid)

    def send() -> bytes:
        block = os.urandom(MiB)
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(
                f"PATCH /incoming/tus/{ticket} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                "Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
                f"Content-Length: {size}\r\n\r\n".encode()
            )
            for _ in range(size // MiB):
                s.sendall(block)
            return s.recv(4096)

    answer = await threads.deferToThread(send)
    assert answer.startswith(b"HTTP/1.1 204")
    peak = peak_bytes(process.pid)
    await stop_daemon(daemon, process)
    assert (tmp_path / "s" / ticket).stat().st_size == size
    assert peak - before < 16 * MiB  # the body is 256 MiB; per upload: chunk x send-ahead


def peak_bytes(pid: int) -> int:
    """The process's peak resident memory (VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kib) * 1024
