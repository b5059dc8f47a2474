"""Cluster mode when Redis loses its data (restarted without persistence, FLUSHALL, a
fail-over to an empty replica) and nobody runs `python -m incoming.cluster` (which puts
the shared directory's records back, with every instance stopped): every upload's state
file is still in the shared directory, so what Redis forgot can be found again."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor

from .harness import Backend, Redis
from .test_cluster import instances, stop_all


@pytest_twisted.ensureDeferred
async def test_an_idle_upload_expires_even_after_redis_lost_its_data(
    tmp_path: Path, redis: Redis, backend: Backend, stopper: list[Any]
) -> None:
    started = await instances(1, redis, tmp_path, stopper, "--max-idle", "1")
    (_, _, a) = started[0]
    ticket = await a.new_upload(backend.url)
    await redis.stop()
    shutil.rmtree(redis.directory)  # its append-only file: Redis comes back empty
    await redis.start()
    try:
        notice = await backend.posts.get().addTimeout(6, reactor)  # lease 3 s, idle 1 s
    finally:
        await stop_all(started)
    assert (notice["id"], notice["cancelled"]) == (ticket, "yes")
