from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool

from incoming.config import Config

from .ceph import Ceph, missing_binaries
from .harness import (
    CHUNK_KB,
    SEND_AHEAD,
    Backend,
    Nginx,
    Redis,
    Server,
    serving,
    start_backend,
)
from .powercut import PowerCutDir, unavailable


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(
        listen="tcp:0:interface=127.0.0.1",
        storage_dir=tmp_path / "storage",
        chunk_size_kb=CHUNK_KB,
        send_ahead=SEND_AHEAD,
        handover_timeout=5,
    )


@pytest.fixture
def pool() -> Iterator[ThreadPool]:
    """A small disk thread pool for tests that build storage themselves."""
    threads = ThreadPool(minthreads=1, maxthreads=2)
    threads.start()
    yield threads
    threads.stop()


@pytest_twisted.async_yield_fixture
async def backend() -> AsyncIterator[Backend]:
    b = Backend()
    port = await start_backend(b)
    yield b
    await port.stopListening()


@pytest_twisted.async_yield_fixture
async def server(config: Config) -> AsyncIterator[Server]:
    async with serving(config) as s:
        yield s


@pytest_twisted.async_yield_fixture
async def redis(tmp_path: Path) -> AsyncIterator[Redis]:
    """A Redis of the test's own, on a free loopback port."""
    server = Redis(tmp_path / "redis")
    await server.start()
    yield server
    await server.stop()


@pytest_twisted.async_yield_fixture
async def nginx(tmp_path: Path) -> AsyncIterator[Nginx]:
    """An nginx of the test's own, on free loopback ports; the test starts it in front of
    its instances (`await nginx.start([port_a, port_b])`)."""
    balancer = Nginx(tmp_path / "nginx")
    yield balancer
    await balancer.stop()


@pytest.fixture
def server_log() -> Iterator[list[str]]:
    """Every line the in-process server logs while the test runs."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.async_yield_fixture
async def stopper() -> AsyncIterator[list[Any]]:
    processes: list[Any] = []
    yield processes
    for process in processes:  # only if a test failed before stopping its own
        if process.pid is not None:
            process.signalProcess(signal.SIGKILL)


@pytest_twisted.async_yield_fixture
async def powercut_dir(tmp_path: Path) -> AsyncIterator[PowerCutDir]:
    """A directory on the power-cut file system (`tests/powercut.py`): `.path`, `.power_cut()`."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    directory = PowerCutDir(tmp_path / "powercut")
    try:
        await directory.mount()
        yield directory
    finally:
        await directory.close()


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[Ceph]:
    """One throwaway Ceph (radosgw's S3 on a loopback port) for the whole run, started
    when the first test asks for it (about 2 s, 150 MB), killed at the end."""
    missing = missing_binaries()
    if missing:
        pytest.skip(
            f"Ceph is not installed (no {', '.join(missing)}): "
            "apt-get install ceph-mon ceph-osd radosgw ceph-common (contrib/install-test-deps)"
        )
    with Ceph() as cluster:
        yield cluster


@pytest.fixture
def ceph(ceph_cluster: Ceph) -> Ceph:
    """The run's Ceph, its radosgw running (a test before may have stopped it)."""
    ceph_cluster.start_rgw()
    return ceph_cluster


@pytest.fixture
def bucket(ceph: Ceph) -> str:
    """A new, empty S3 bucket of the test's own."""
    return ceph.make_bucket()
