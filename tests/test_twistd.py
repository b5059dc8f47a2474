"""The real daemon: `twistd -n incoming` and `twistd -ny incoming.tac` as subprocesses."""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from .harness import Backend, Server, send_all, upload_request

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


class Daemon(ProcessProtocol):
    """Watches twistd's log for the listening port, and for its exit."""

    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred[int] = Deferred()
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = re.search(rb"IncomingSite starting on (\d+)", self.output)
        if match and not self.listening.called:
            self.listening.callback(int(match.group(1)))

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback((reason.value.exitCode, reason.value.signal))


async def run_daemon(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> tuple[Daemon, Any, int]:
    daemon = Daemon()
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    process = reactor.spawnProcess(  # type: ignore[attr-defined]
        daemon,
        TWISTD,
        [TWISTD, "-n", "--pidfile=", *args],
        env=environment,
        path=str(cwd),
    )
    port = await daemon.listening
    return daemon, process, port


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


async def stop(daemon: Daemon, process: Any) -> None:
    """SIGTERM: twistd shuts down cleanly, then re-raises the signal as its exit status."""
    process.signalProcess(signal.SIGTERM)
    assert await daemon.ended == (None, signal.SIGTERM)
    assert b"Server Shut Down." in daemon.output


@pytest_twisted.async_yield_fixture
async def stopper() -> AsyncIterator[list[Any]]:
    processes: list[Any] = []
    yield processes
    for process in processes:  # only if a test failed before stopping its own
        if process.pid is not None:
            process.signalProcess(signal.SIGKILL)


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
    await stop(daemon, process)
    log = daemon.output.decode()
    for event in ("created", "connected", "complete", "handed over and finished"):
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
    await stop(daemon, process)
