"""A full disk (SPEC: Acknowledged means durable): the real daemon on a small tmpfs that a
filler file fills mid-upload. Nothing acknowledged is lost, the client hears why (ErrorCode
24, 507), new tickets get 507, and once space is free the upload resumes where it stood
and is handed over with the right SHA-256. Over both transports."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from incoming.errors import ErrorCode
from incoming.journal import TicketJournal

from .harness import (
    CHUNK_KB,
    SEND_AHEAD,
    Backend,
    Server,
    acked_upload,
    complete_upload,
    send_all,
    start_daemon,
    stop_daemon,
    upload_request,
)
from .test_tus import create, head, header, patch

CHUNK = CHUNK_KB * 1024
DISK_BYTES = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of the test's own, unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs (a disk to fill) needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    options = f"size={DISK_BYTES},mode=0755"
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """A file taking every free byte of `disk` but `leave`."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            os.write(fd, bytes(64 * 1024))
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.ftruncate(fd, max(os.fstat(fd).st_size - leave, 0))
        os.close(fd)
    return filler


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def new_ticket_status(server: Server, backend: Backend) -> int:
    response = await treq.post(
        f"{server.base}/backend/new_upload", data={"signalFinishURL": backend.url}
    )
    await response.content()
    return int(response.code)


async def handed_over(backend: Backend, ticket: str, data: bytes) -> None:
    post = await backend.posts.get().addTimeout(30, reactor)
    assert (post["id"], post["cancelled"]) == (ticket, "no")
    assert (post["size"], post["sha256"]) == (str(len(data)), sha256(data))


@pytest_twisted.ensureDeferred
async def test_a_full_disk_over_the_websocket_loses_nothing_acknowledged(
    small_disk: Path, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = small_disk / "storage"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    data = os.urandom(40 * CHUNK + 3)
    ticket, client, _ = await acked_upload(
        server, backend.url, len(data), removeFileWhenFinished="false"
    )
    await send_all(client, data[: 10 * CHUNK], CHUNK, SEND_AHEAD)
    filler = fill(small_disk)
    for i in range(10, 10 + SEND_AHEAD):
        client.send_chunk(data[i * CHUNK : (i + 1) * CHUNK])
    messages = []
    while (message := await client.next()) is not None:
        messages.append(message)
    assert [m["MsgType"] for m in messages] == ["MsgError"]
    assert messages[0]["MsgData"]["ErrorCode"] == ErrorCode.STORAGE_FULL
    assert "full" in messages[0]["MsgData"]["Msg"]
    assert await new_ticket_status(server, backend) == 507

    resumed, conf = await upload_request(server, ticket, len(data))  # still full
    assert conf["FilePos"] == 10 * CHUNK
    resumed.send("MsgAck", Ack=True)
    resumed.send_chunk(data[10 * CHUNK : 11 * CHUNK])
    await resumed.expect_error(ErrorCode.STORAGE_FULL)

    filler.unlink()  # space is free again
    resumed, conf = await upload_request(server, ticket, len(data))
    assert conf["FilePos"] == 10 * CHUNK
    assert (storage / f"{ticket}.part").read_bytes() == data[: 10 * CHUNK]
    await complete_upload(resumed, data[10 * CHUNK :], CHUNK, SEND_AHEAD)
    await handed_over(backend, ticket, data)
    assert (storage / ticket).read_bytes() == data
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_a_full_disk_over_tus_loses_nothing_acknowledged(
    small_disk: Path, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = small_disk / "storage"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    data = os.urandom(60 * CHUNK + 5)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    assert (await create(server, ticket, len(data))).code == 201
    first = await patch(server, ticket, 0, data[: 10 * CHUNK])
    assert (first.code, header(first, "Upload-Offset")) == (204, str(10 * CHUNK))

    filler = fill(small_disk)
    refused = await patch(server, ticket, 10 * CHUNK, data[10 * CHUNK : 20 * CHUNK])
    assert refused.code == 507
    assert "full" in await refused.text()
    assert await new_ticket_status(server, backend) == 507
    status = await head(server, ticket)
    assert header(status, "Upload-Offset") == str(10 * CHUNK)

    # Room for two chunks: the bytes that fit and are durable stand, unless a checksum
    # was to vouch for them.
    filler.unlink()
    filler = fill(small_disk, leave=2 * CHUNK)
    checked = await patch(server, ticket, 10 * CHUNK, data[10 * CHUNK : 20 * CHUNK],
                          **{"Upload-Checksum": "sha1 " + "A" * 27 + "="})  # fmt: skip
    assert checked.code == 507
    assert header(await head(server, ticket), "Upload-Offset") == str(10 * CHUNK)
    partly = await patch(server, ticket, 10 * CHUNK, data[10 * CHUNK : 20 * CHUNK])
    assert partly.code == 507
    offset = int(header(await head(server, ticket), "Upload-Offset") or "")
    assert 10 * CHUNK <= offset <= 12 * CHUNK
    assert (storage / f"{ticket}.part").read_bytes() == data[:offset]

    filler.unlink()
    final = await patch(server, ticket, offset, data[offset:])
    assert final.code == 204, await final.text()
    await handed_over(backend, ticket, data)
    assert (storage / ticket).read_bytes() == data
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_a_journal_append_that_finds_no_space_leaves_no_torn_line(
    small_disk: Path, pool: ThreadPool
) -> None:
    path = small_disk / "tickets.journal"
    journal = TicketJournal(path, reactor, pool)
    journal.load()
    ids = [f"00000000-0000-4000-8000-{n:012d}" for n in range(3)]
    line_bytes = len(b'{"id": "%s", "pad": ""}\n' % ids[0].encode())
    await journal.append(ids[0], {"id": ids[0], "pad": "p" * (4096 - 10 - line_bytes)})
    assert path.stat().st_size == 4096 - 10  # the next line will need a page more
    filler = fill(small_disk)
    with pytest.raises(OSError) as full:
        await journal.append(ids[1], {"id": ids[1], "pad": ""})
    assert full.value.errno == errno.ENOSPC
    assert path.stat().st_size == 4096 - 10
    filler.unlink()
    await journal.append(ids[2], {"id": ids[2], "pad": ""})
    journal.close()
    assert sorted(TicketJournal(path, reactor, pool).load()) == [ids[0], ids[2]]
