"""The real daemon: `twistd -n incoming` and `twistd -ny incoming.tac` as subprocesses."""

from __future__ import annotations

import grp
import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from incoming import __version__
from incoming.config import Config
from incoming.service import Listener, StartupSummary

from .harness import (
    ROOT,
    TWISTD,
    Backend,
    Daemon,
    Redis,
    Server,
    run_daemon,
    send_all,
    stop_daemon,
    upload_request,
)


async def upload_through(port: int, storage: Path, backend: Backend) -> None:
    server = Server(manager=None, port=port, storage_dir=storage)  # type: ignore[arg-type]
    data = os.urandom(3 * 1024 * 1024 + 7)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    client, conf = await upload_request(server, ticket, len(data), prefix="/incoming/0.1")
    assert conf == {"ChunkSizeKB": 64, "FilePos": 0, "SendAhead": 128}  # 8 MiB: covers a sync
    client.send("MsgAck", Ack=True)
    await send_all(client, data, 64 * 1024, 128)
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


def spawn(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[Daemon, Any]:
    """`twistd -n ARGS` without waiting for it to listen."""
    daemon = Daemon()
    command = [TWISTD, "-n", "--pidfile=", *args]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    process = reactor.spawnProcess(  # type: ignore[attr-defined]
        daemon, TWISTD, command, env=environment, path=str(cwd)
    )
    daemon.listening.addErrback(lambda _: None)  # it may end without listening
    return daemon, process


@pytest.mark.parametrize("busy", ["--listen", "--backend-listen"])
@pytest_twisted.ensureDeferred
async def test_a_busy_port_ends_the_daemon_with_the_reason(
    tmp_path: Path, busy: str, stopper: list[Any]
) -> None:
    with socket.socket() as holder:  # whoever holds the port
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"tcp:{holder.getsockname()[1]}:interface=127.0.0.1"
        free = "tcp:0:interface=127.0.0.1"
        listen, backend = (taken, free) if busy == "--listen" else (free, taken)
        daemon, process = spawn(
            ["incoming", "--listen", listen, "--backend-listen", backend,
             "--storage-dir", str(tmp_path / "s")],
            tmp_path,
        )  # fmt: skip
        stopper.append(process)
        exit_code, _signal = await daemon.ended.addTimeout(60, reactor)
    assert exit_code == 1
    log = daemon.output.decode()
    role = "browser" if busy == "--listen" else "backend"
    [line] = [line for line in log.splitlines() if "critical" in line]
    assert line.endswith(f"cannot listen on {taken} ({role}): Address already in use")
    assert "Traceback" not in log and "started:" not in log


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--listen", "tcp:port"], "incoming: bad endpoint 'tcp:port' (browser and backend): "),
        (["--storage-dir", "/proc/1/nope"], "incoming: cannot use the storage directory "),
    ],
)
@pytest_twisted.ensureDeferred
async def test_what_cannot_start_says_why_in_one_line(
    tmp_path: Path, args: list[str], reason: str, stopper: list[Any]
) -> None:
    daemon, process = spawn(["incoming", "--storage-dir", str(tmp_path / "s"), *args], tmp_path)
    stopper.append(process)
    assert (await daemon.ended.addTimeout(60, reactor))[0] == 1
    [line] = daemon.output.decode().splitlines()
    assert line.startswith(reason)


@pytest_twisted.ensureDeferred
async def test_the_start_is_summed_up_in_one_line(
    tmp_path: Path, redis: Redis, stopper: list[Any]
) -> None:
    storage = tmp_path / "store"
    socket_path = tmp_path / "backend.sock"
    daemon, process, port = await run_daemon(
        ["incoming", "--listen", "tcp:0:interface=127.0.0.1", "--storage-dir", "store",
         "--backend-networks", "10.0.0.0/8", "--redis", f"redis://127.0.0.1:{redis.port}/3"],
        tmp_path,
    )  # fmt: skip
    stopper.append(process)
    await daemon.logged(rb"started: ").addTimeout(60, reactor)
    await stop_daemon(daemon, process)
    [summary] = [line for line in daemon.output.decode().splitlines() if "started: " in line]
    assert summary.endswith(
        f"[incoming#info] Incoming!! {__version__} started: browser and backend on "
        f"127.0.0.1:{port} (backend API for this host, 10.0.0.0/8); storage {storage}; "
        f"cluster mode, Redis at 127.0.0.1:{redis.port}/3"
    )
    daemon, process, port = await run_daemon(
        ["incoming", "--listen", "tcp:0:interface=127.0.0.1", "--storage-dir", str(storage),
         "--backend-listen", f"unix:{socket_path}", "--group", grp.getgrgid(os.getgid()).gr_name],
        tmp_path,
    )  # fmt: skip
    stopper.append(process)
    await daemon.logged(rb"started: ").addTimeout(60, reactor)
    await stop_daemon(daemon, process)
    [summary] = [line for line in daemon.output.decode().splitlines() if "started: " in line]
    assert summary.endswith(
        f"started: browser on 127.0.0.1:{port}; backend on unix:{socket_path}; storage "
        f"{storage} shared with group {grp.getgrgid(os.getgid()).gr_name}; single process"
    )


def test_the_summary_never_shows_a_redis_password() -> None:
    config = Config(redis="redis://:hunter2@redis.internal:6380/1", storage_dir=Path("/s"))
    summary = StartupSummary(config, []).summary()
    assert summary.endswith("storage /s; cluster mode, Redis at redis.internal:6380/1")
    assert "hunter2" not in summary


def test_an_endpoint_that_fails_to_listen_later_stops_the_process_with_status_1() -> None:
    """Endpoints other than tcp, ssl, unix and systemd may answer after the start."""
    later: Deferred[Any] = Deferred()
    endpoint = type("Later", (), {"listen": lambda self, factory: later})()
    fake = MemoryReactorClock()
    listener = Listener("onion:80", endpoint, None, "browser", fake)
    listener.privilegedStartService()
    assert not fake.hasStopped and not listener.failed
    later.errback(Failure(OSError("no route to the onion")))
    assert listener.failed and fake.hasStopped
    assert fake.triggers["after"]["shutdown"] == [(os._exit, (1,), {})]
