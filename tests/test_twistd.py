"""The real daemon: `twistd -n incoming` and `twistd -ny incoming.tac` as subprocesses."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest_twisted

from .harness import ROOT, Backend, Server, run_daemon, send_all, stop_daemon, upload_request


async def upload_through(port: int, storage: Path, backend: Backend) -> None:
    server = Server(manager=None, port=port, storage_dir=storage)  # type: ignore[arg-type]
    data = os.urandom(3 * 1024 * 1024 + 7)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    client, conf = await upload_request(server, ticket, len(data), prefix="/incoming/0.1")
    assert conf == {"ChunkSizeKB": 64, "FilePos": 0, "SendAhead": 4}
    client.send("MsgAck", Ack=True)
    await send_all(client, data, 64 * 1024, 4)
    post = await backend.posts.get()
    assert post["filename"] == str(storage / ticket)
    await client.expect("MsgAllDone")
    assert (storage / ticket).read_bytes() == data


@pytest_twisted.ensureDeferred
async def test_twistd_plugin_serves_an_upload(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "store" / "deep"
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "keep.txt").write_text("not wiped")
    daemon, process, port = await run_daemon(
        [
            "incoming",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--storage-dir",
            str(storage),
            "--chunk-size-kb",
            "64",
        ],
        tmp_path,
    )
    stopper.append(process)
    await upload_through(port, storage, backend)
    assert (tmp_path / "store" / "keep.txt").read_text() == "not wiped"
    await stop_daemon(daemon, process)
    log = daemon.output.decode()
    for event in ("started", "complete", "handed over and finished"):
        assert re.search(rf"upload [0-9a-f-]{{36}} .*{event}", log), event


@pytest_twisted.ensureDeferred
async def test_tac_file_reads_config_from_environment(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    import socket

    with socket.socket() as s:  # a free port for the YAML file, which names one
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    config = tmp_path / "incoming.yaml"
    storage = tmp_path / "data"
    config.write_text(
        f"IncomingIP: 127.0.0.1\nIncomingPort: {free}\nStorageDir: {storage}\n"
        "UploadChunkSizeKB: 64\n"
    )
    daemon, process, port = await run_daemon(
        ["-y", str(ROOT / "incoming.tac")], tmp_path, {"INCOMING_CONFIG": str(config)}
    )
    stopper.append(process)
    assert port == free
    await upload_through(port, storage, backend)
    await stop_daemon(daemon, process)
