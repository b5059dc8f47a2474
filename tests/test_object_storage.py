"""Object storage (SPEC: Object storage): finished files in an S3 store, a real one (the
throwaway Ceph RGW of tests/ceph.py), by way of each instance's spool; real daemons
(twistd), real clients (tus-js-client under Node, the WebSocket protocol), loopback."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from .ceph import Ceph
from .harness import Backend, Server, acked_upload, send_all, start_daemon
from .test_tus_clients import tus_js

MiB = 1 << 20
PART = 5 * MiB  # the smallest part size: tests need few bytes for several parts
LARGE = ("--chunk-size-kb", "256", "--send-ahead", "8")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def credentials(ceph: Ceph) -> dict[str, str]:
    """The daemon finds them the standard way: the environment."""
    return {"AWS_ACCESS_KEY_ID": ceph.access_key, "AWS_SECRET_ACCESS_KEY": ceph.secret_key}


async def s3_daemon(
    ceph: Ceph, bucket: str, spool: Path, cwd: Path, stopper: list[Any], *extra: str
) -> tuple[Any, Any, Server]:
    return await start_daemon(
        spool, cwd, stopper, *LARGE, "--storage", f"s3://{bucket}/up/", "--s3-endpoint",
        ceph.endpoint, "--s3-part-size", "5MiB", *extra, env=credentials(ceph),
    )  # fmt: skip


def assert_object_handover(
    post: dict[str, str], ceph: Ceph, bucket: str, ticket: str, data: bytes
) -> None:
    """The handover names the object; its size and SHA-256 are those of its bytes."""
    key = f"up/{ticket}"
    assert post["filename"] == f"s3://{bucket}/{key}"
    assert (post["s3Bucket"], post["s3Key"], post["s3Endpoint"]) == (bucket, key, ceph.endpoint)
    assert (post["size"], post["sha256"], post["cancelled"]) == (str(len(data)), sha256(data), "no")


def spool_holds(spool: Path) -> int:
    """Bytes of disk the spool's upload files take (state files and the journal aside)."""
    return sum(
        p.stat().st_blocks * 512
        for p in spool.iterdir()
        if p.suffix not in (".json", ".journal", ".tmp")
    )


@pytest_twisted.ensureDeferred
async def test_a_tus_upload_lands_as_one_object_with_its_sha256_and_no_part_left(
    ceph: Ceph, bucket: str, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    spool = tmp_path / "spool"
    _, _, server = await s3_daemon(ceph, bucket, spool, tmp_path, stopper)
    data = os.urandom(3 * PART + 12345)
    (tmp_path / "f.bin").write_bytes(data)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    client = tus_js(server, [{"file": tmp_path / "f.bin", "metadata": {"ticket": ticket,
                    "filename": "f.bin"}}], chunkSize=4 * MiB)  # fmt: skip
    post = await backend.posts.get()
    assert_object_handover(post, ceph, bucket, ticket, data)
    assert ceph.read(bucket, f"up/{ticket}") == data  # complete before the backend is told
    events = await client.ended
    assert events[-1]["ok"], events
    assert ceph.objects(bucket) == {f"up/{ticket}": len(data)}
    assert ceph.multipart_uploads(bucket) == []
    assert spool_holds(spool) == 0


@pytest_twisted.ensureDeferred
async def test_a_websocket_upload_lands_and_remove_file_when_finished_deletes_it(
    ceph: Ceph, bucket: str, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    spool = tmp_path / "spool"
    _, _, server = await s3_daemon(ceph, bucket, spool, tmp_path, stopper)
    data = os.urandom(2 * PART + 99)
    seen: list[dict[str, int]] = []

    async def look(fields: dict[str, str]) -> None:  # what the backend finds when told
        seen.append(ceph.objects(bucket))

    backend.before_answer = look
    ticket, client, conf = await acked_upload(server, backend.url, len(data))
    await send_all(client, data, conf["ChunkSizeKB"] * 1024, conf["SendAhead"])
    await client.expect("MsgAllDone")
    post = await backend.posts.get()
    assert_object_handover(post, ceph, bucket, ticket, data)
    assert seen == [{f"up/{ticket}": len(data)}]
    assert ceph.objects(bucket) == {}  # gone by the time the browser hears MsgAllDone
    assert ceph.multipart_uploads(bucket) == []
    assert spool_holds(spool) == 0
