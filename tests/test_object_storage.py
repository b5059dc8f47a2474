"""Object storage (SPEC: Object storage): finished files in an S3 store, a real one (the
throwaway Ceph RGW of tests/ceph.py), by way of each instance's spool; real daemons
(twistd), real clients (tus-js-client under Node, the WebSocket protocol), loopback."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, threads
from twisted.internet.task import LoopingCall, deferLater

from incoming import spool as spool_module
from incoming.errors import ErrorCode

from .ceph import Ceph
from .harness import (
    Backend,
    Client,
    Nginx,
    Redis,
    Server,
    acked_upload,
    complete_upload,
    send_all,
    start_daemon,
    upload_request,
)
from .test_cluster import resumed_on
from .test_tus_clients import tus_js

MiB = 1 << 20
PART = 5 * MiB  # the smallest part size: tests need few bytes for several parts
LARGE = ("--chunk-size-kb", "256", "--send-ahead", "8")
TUS = {"Tus-Resumable": "1.0.0"}
LEASE = 3  # seconds (--ws-timeout): how long a killed instance holds on to its uploads


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


def stored_parts(ceph: Ceph, bucket: str, key: str) -> int:
    """Parts in the store of the key's multipart uploads under way."""
    return sum(
        len(ceph.client().list_parts(Bucket=bucket, Key=key, UploadId=upload).get("Parts", []))
        for found, upload in ceph.multipart_uploads(bucket)
        if found == key
    )


async def parts_in_store(ceph: Ceph, bucket: str, key: str, count: int) -> None:
    """Wait until the store holds `count` parts of the key's upload (sent in the background)."""
    for _ in range(600):
        if await threads.deferToThread(stored_parts, ceph, bucket, key) >= count:
            return
        await deferLater(reactor, 0.05)
    raise AssertionError(f"{key}: fewer than {count} parts in the store")


async def no_multipart_upload(ceph: Ceph, bucket: str) -> None:
    """Wait until the bucket has no multipart upload under way (aborts run in the
    background once the client has been told)."""
    for _ in range(600):
        if not await threads.deferToThread(ceph.multipart_uploads, bucket):
            return
        await deferLater(reactor, 0.05)
    raise AssertionError(f"{bucket}: multipart uploads left: {ceph.multipart_uploads(bucket)}")


async def sent(server: Server, backend: Backend, data: bytes) -> tuple[str, Client, int]:
    """A WebSocket upload of `data` (the bytes acknowledged), the connection left open."""
    ticket, client, conf = await acked_upload(server, backend.url, len(data) + PART)
    await send_all(client, data, conf["ChunkSizeKB"] * 1024, conf["SendAhead"])
    return ticket, client, conf["ChunkSizeKB"] * 1024


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("how", ["by-client", "by-backend", "expired"])
async def test_a_cancel_or_an_expiry_mid_upload_leaves_no_part_in_the_store(
    ceph: Ceph, bucket: str, tmp_path: Path, backend: Backend, stopper: list[Any], how: str
) -> None:
    spool = tmp_path / "spool"
    _, _, server = await s3_daemon(ceph, bucket, spool, tmp_path, stopper, "--max-idle", "2")
    ticket, client, _ = await sent(server, backend, os.urandom(2 * PART + 100))
    await parts_in_store(ceph, bucket, f"up/{ticket}", 2)
    if how == "by-client":
        client.send("MsgCancel", Reason="changed my mind")
        await client.expect("MsgCancelAck")
    elif how == "by-backend":
        answer = await treq.post(f"{server.base}/backend/cancel_upload", data={"id": ticket})
        assert answer.code == 200, await answer.text()
    else:
        client.close()  # and nothing more comes
    notice = await backend.posts.get() if how != "by-backend" else None
    if notice is not None:
        assert (notice["id"], notice["cancelled"]) == (ticket, "yes")  # after the abort
    else:
        await client.expect("MsgCancel")
        await client.closed
        await no_multipart_upload(ceph, bucket)  # the abort runs after the client hears
    assert ceph.multipart_uploads(bucket) == []
    assert ceph.objects(bucket) == {}
    assert spool_holds(spool) == 0


@pytest_twisted.ensureDeferred
async def test_sigkill_and_restart_resume_from_the_spool_and_the_store(
    ceph: Ceph, bucket: str, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    spool = tmp_path / "spool"
    daemon, process, server = await s3_daemon(ceph, bucket, spool, tmp_path, stopper)
    data = os.urandom(4 * PART + 777)
    acked = 2 * PART + 3 * MiB  # two parts in the store, the rest of it in the spool
    ticket, client, conf = await acked_upload(server, backend.url, len(data))
    chunk = conf["ChunkSizeKB"] * 1024
    await send_all(client, data[:acked], chunk, conf["SendAhead"])
    await parts_in_store(ceph, bucket, f"up/{ticket}", 2)
    await daemon.kill(process)
    _, _, again = await s3_daemon(ceph, bucket, spool, tmp_path, stopper)
    client, conf = await upload_request(again, ticket, len(data))
    assert conf["FilePos"] == acked  # nothing acknowledged lost
    await complete_upload(client, data[acked:], chunk, conf["SendAhead"])
    post = await backend.posts.get()
    assert_object_handover(post, ceph, bucket, ticket, data)  # hashed again from the object
    assert ceph.multipart_uploads(bucket) == []
    assert ceph.objects(bucket) == {}  # removeFileWhenFinished
    assert backend.posts.pending == []


# Cluster mode: instances on one Redis, each with a spool of its own


async def s3_instances(
    ceph: Ceph, bucket: str, redis: Redis, tmp_path: Path, stopper: list[Any], count: int = 2
) -> list[tuple[Any, Any, Server]]:
    return [
        await s3_daemon(
            ceph,
            bucket,
            tmp_path / f"spool-{n}",
            tmp_path,
            stopper,
            "--redis",
            redis.url,
            "--ws-timeout",
            str(LEASE),
        )  # fmt: skip
        for n in range(count)
    ]


@pytest_twisted.ensureDeferred
async def test_cluster_sigkill_the_writer_lose_its_spool_and_resume_from_the_store(
    ceph: Ceph, bucket: str, redis: Redis, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    """The parts in the store are the durable truth: what only the dead instance's spool
    held is sent again; one handover, of the whole object."""
    (daemon, process, a), (_, _, b) = await s3_instances(ceph, bucket, redis, tmp_path, stopper)
    data = os.urandom(4 * PART + 5)
    found: list[bytes] = []

    async def look(fields: dict[str, str]) -> None:  # the object, when the backend is told
        found.append(await threads.deferToThread(ceph.read, bucket, fields["s3Key"]))

    backend.before_answer = look
    ticket, client, conf = await acked_upload(a, backend.url, len(data))
    chunk = conf["ChunkSizeKB"] * 1024
    await send_all(client, data[: 2 * PART + 3 * MiB], chunk, conf["SendAhead"])
    await parts_in_store(ceph, bucket, f"up/{ticket}", 2)
    await daemon.kill(process)
    shutil.rmtree(tmp_path / "spool-0")  # its machine is gone
    client, conf = await resumed_on(b, ticket, len(data))
    assert conf["FilePos"] == 2 * PART
    await complete_upload(client, data[2 * PART :], chunk, conf["SendAhead"])
    post = await backend.posts.get()
    assert_object_handover(post, ceph, bucket, ticket, data)
    assert found == [data]  # one handover, of the whole object
    assert backend.posts.pending == []
    assert ceph.multipart_uploads(bucket) == []
    assert ceph.objects(bucket) == {}  # removeFileWhenFinished


@pytest_twisted.ensureDeferred
async def test_cluster_an_upload_let_go_goes_on_elsewhere_with_every_byte(
    ceph: Ceph, bucket: str, redis: Redis, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    """An instance that lets go of an upload (its client paused) leaves its bytes in the
    store (whole parts, and the rest as a tail) for the next one; its spool keeps none."""
    (_, _, a), (_, _, b) = await s3_instances(ceph, bucket, redis, tmp_path, stopper)
    data = os.urandom(3 * PART + 5)
    acked = PART + 2 * MiB + 3
    ticket, client, conf = await acked_upload(a, backend.url, len(data))
    chunk = conf["ChunkSizeKB"] * 1024
    await send_all(client, data[:acked], chunk, conf["SendAhead"])
    client.send("MsgPause", Pause=True)
    client.close()
    client, conf = await resumed_on(b, ticket, len(data))
    assert conf["FilePos"] == acked
    assert spool_holds(tmp_path / "spool-0") == 0
    await complete_upload(client, data[acked:], chunk, conf["SendAhead"])
    post = await backend.posts.get()
    assert_object_handover(post, ceph, bucket, ticket, data)
    assert ceph.multipart_uploads(bucket) == []
    assert ceph.objects(bucket) == {}  # nor the tail


@pytest_twisted.ensureDeferred
async def test_cluster_tus_through_a_round_robin_balancer(
    ceph: Ceph,
    bucket: str,
    redis: Redis,
    nginx: Nginx,
    tmp_path: Path,
    backend: Backend,
    stopper: list[Any],
) -> None:
    """tus-js-client's PATCHes go to either instance (nginx round robin, documented):
    each takes the upload up where the other left it."""
    started = await s3_instances(ceph, bucket, redis, tmp_path, stopper)
    await nginx.start([server.port for _, _, server in started])
    try:
        front = Server(manager=None, port=nginx.port, storage_dir=tmp_path)  # type: ignore[arg-type]
        api = Server(manager=None, port=nginx.backend_port, storage_dir=tmp_path)  # type: ignore[arg-type]
        data = os.urandom(2 * PART + 123)
        (tmp_path / "f.bin").write_bytes(data)
        ticket = await api.new_upload(backend.url, removeFileWhenFinished="false")
        client = tus_js(front, [{"file": tmp_path / "f.bin", "metadata": {"ticket": ticket}}],
                        chunkSize=2 * MiB, retryDelays=[100, 200, 400, 800, 1600])  # fmt: skip
        post = await backend.posts.get()
        events = await client.ended
        assert events[-1]["ok"], events
    finally:
        await nginx.stop()
    assert_object_handover(post, ceph, bucket, ticket, data)
    assert ceph.objects(bucket) == {f"up/{ticket}": len(data)}
    upstreams = {upstream for method, _, _, upstream in nginx.requests() if method == "PATCH"}
    assert len(upstreams) == 2  # both instances took PATCHes


def peak_rss(pid: int) -> int:
    """VmHWM: the most memory the process has held, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest_twisted.ensureDeferred
async def test_a_256_mib_single_patch_keeps_the_server_within_a_few_parts_of_memory(
    ceph: Ceph, bucket: str, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    """The body goes to the spool as it arrives and on to the store part by part (16 MiB,
    the default): the daemon's peak memory grows by less than three parts."""
    spool = tmp_path / "spool"
    _, process, server = await start_daemon(
        spool, tmp_path, stopper, "--chunk-size-kb", "512", "--send-ahead", "16",
        "--storage", f"s3://{bucket}/up/", "--s3-endpoint", ceph.endpoint, env=credentials(ceph),
    )  # fmt: skip
    size = 256 * MiB
    digest = hashlib.sha256()
    with (tmp_path / "big.bin").open("wb") as f:
        for _ in range(size // (4 * MiB)):
            block = os.urandom(4 * MiB)
            digest.update(block)
            f.write(block)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="true")
    before = peak_rss(process.pid)
    spooled: list[int] = []
    watch = LoopingCall(lambda: spooled.append(spool_holds(spool)))
    watch.start(0.05)
    client = tus_js(server, [{"file": tmp_path / "big.bin", "metadata": {"ticket": ticket}}],
                    chunkSize=None, timeout=300)  # fmt: skip
    post = await backend.posts.get()
    watch.stop()
    events = await client.ended
    assert events[-1]["ok"], events
    assert [e["event"] for e in events].count("chunk") == 1  # one PATCH
    assert (post["size"], post["sha256"]) == (str(size), digest.hexdigest())
    grown = peak_rss(process.pid) - before
    assert grown < 3 * 16 * MiB, f"peak RSS grew by {grown / MiB:.0f} MiB"
    # and the spool's disk within a few parts: they go while the body still arrives
    assert len(spooled) > 10 and max(spooled) <= 7 * 16 * MiB, max(spooled) / MiB


@pytest_twisted.ensureDeferred
async def test_the_store_away_mid_upload_stalls_then_tells_the_client_and_loses_nothing(
    ceph: Ceph, bucket: str, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    """RGW killed mid-upload: acknowledgements go on while the spool has room (a few
    parts), then writes wait for the store, then after WebsocketConnectionTimeoutS the
    client hears error 25 (and resumes later). Every byte acknowledged is in the object."""
    spool = tmp_path / "spool"
    _, _, server = await s3_daemon(ceph, bucket, spool, tmp_path, stopper, "--ws-timeout", "3")
    data = os.urandom(8 * PART + 1)
    ticket, client, conf = await acked_upload(server, backend.url, len(data))
    chunk, window = conf["ChunkSizeKB"] * 1024, conf["SendAhead"]
    await send_all(client, data[:PART], chunk, window)
    await parts_in_store(ceph, bucket, f"up/{ticket}", 1)
    ceph.stop_rgw()
    try:
        acked, sent, error = PART, PART, None
        while error is None:
            while sent - acked < window * chunk and sent < len(data):
                client.send_chunk(data[sent : sent + chunk])
                sent += len(data[sent : sent + chunk])
            message = await client.next()
            if message["MsgType"] == "MsgChunkAck":
                acked += message["MsgData"]["ChunkSize"]
            else:
                error = message["MsgData"]
        assert error["ErrorCode"] == ErrorCode.STORE_UNAVAILABLE, error
        assert 4 * PART <= acked < len(data)  # the spool took a few parts meanwhile
        assert spool_holds(spool) < 6 * PART
    finally:
        ceph.start_rgw()
    client, conf = await upload_request(server, ticket, len(data))
    assert conf["FilePos"] == acked  # nothing acknowledged lost
    await complete_upload(client, data[acked:], chunk, conf["SendAhead"])
    post = await backend.posts.get()
    assert_object_handover(post, ceph, bucket, ticket, data)
    assert ceph.multipart_uploads(bucket) == []


OURS = "the object store is unavailable; resume later: nothing acknowledged is lost"


@pytest_twisted.ensureDeferred
async def test_a_store_that_refuses_writes_is_told_to_clients_in_our_words_only(
    ceph: Ceph, bucket: str, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    """A bucket policy denies writes (AccessDenied): once the spool holds what it may, the
    next write waits for the store, then its client hears 503 over tus, error 25 over the
    WebSocket, in our own words; the store's text goes to the log only. Once writes are
    allowed again, the upload goes on."""
    spool = tmp_path / "spool"
    daemon, _, server = await s3_daemon(ceph, bucket, spool, tmp_path, stopper, "--ws-timeout", "3")
    deny = {"Effect": "Deny", "Principal": "*", "Action": ["s3:PutObject"],
            "Resource": [f"arn:aws:s3:::{bucket}/*"]}  # fmt: skip
    policy = json.dumps({"Version": "2012-10-17", "Statement": [deny]})
    ceph.client().put_bucket_policy(Bucket=bucket, Policy=policy)
    data = os.urandom(8 * PART + 1)
    held = spool_module.SPOOL_PARTS * PART  # what the spool takes while the store refuses
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    url = f"{server.base}/tus/{ticket}"
    assert (await treq.post(f"{server.base}/tus/", headers=creation(ticket, len(data)))).code == 201
    try:
        taken = await patch(url, data[:held], 0, {})
        assert taken.code == 204, await taken.text()
        more = data[held : held + 256 * 1024]  # a chunk (LARGE): read whole, not paused
        refused = await patch(url, more, held, {})
        assert (refused.code, await refused.text()) == (503, OURS)  # not "AccessDenied: ..."
        client, conf = await upload_request(server, ticket, len(data))
        assert conf["FilePos"] == held
        client.send("MsgAck", Ack=True)
        client.send_chunk(more)
        error = await client.expect_error(ErrorCode.STORE_UNAVAILABLE)
        assert error["Msg"] == OURS
    finally:
        ceph.client().delete_bucket_policy(Bucket=bucket)
    assert b"AccessDenied" in daemon.output  # the operator reads why
    client, conf = await upload_request(server, ticket, len(data))
    assert conf["FilePos"] == held
    await complete_upload(client, data[held:], conf["ChunkSizeKB"] * 1024, conf["SendAhead"])
    assert_object_handover(await backend.posts.get(), ceph, bucket, ticket, data)


async def in_redis_handovers(redis: Redis, ticket: str) -> None:
    """Until Redis lists the upload among the handovers an instance may leave behind."""
    for _attempt in range(300):
        found = await threads.deferToThread(
            subprocess.run,
            ["redis-cli", "-p", str(redis.port), "SISMEMBER", "incoming:handovers", ticket],
            capture_output=True,
            text=True,
        )
        if found.stdout.strip() == "1":
            return
        await deferLater(reactor, 0.1, lambda: None)
    pytest.fail("the handover never reached Redis")


@pytest_twisted.ensureDeferred
async def test_cluster_a_handover_whose_end_died_with_its_spool_takes_bytes_again(
    ceph: Ceph, bucket: str, redis: Redis, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    """Every byte is in A's spool and its handover began, but the store was away: A dies
    before the object is made, its spool with it. B's janitor takes the handover up, finds
    the file not whole in the store, and the upload takes bytes again from where the store's
    parts end; the backend hears of it once, whole."""
    (daemon_a, process_a, a), (daemon_b, _, b) = await s3_instances(
        ceph, bucket, redis, tmp_path, stopper
    )
    data = os.urandom(3 * PART + 10)
    ticket, client, conf = await acked_upload(a, backend.url, len(data))
    chunk = conf["ChunkSizeKB"] * 1024
    await send_all(client, data[: 2 * PART], chunk, conf["SendAhead"])
    await parts_in_store(ceph, bucket, f"up/{ticket}", 2)
    ceph.stop_rgw()
    try:
        await send_all(client, data[2 * PART :], chunk, conf["SendAhead"])  # durable in A's spool
        began = daemon_a.logged(rb"upload %s complete" % ticket.encode())  # the handover
        await began.addTimeout(30, reactor)
        await in_redis_handovers(redis, ticket)  # A's record says so: its janitor's work
        await daemon_a.kill(process_a)
        shutil.rmtree(tmp_path / "spool-0")
    finally:
        ceph.start_rgw()
    again = daemon_b.logged(rb"upload %s: only 10485760 of its" % ticket.encode())
    await again.addTimeout(30, reactor)  # its janitor took the handover up
    client, conf = await resumed_on(b, ticket, len(data))
    assert conf["FilePos"] == 2 * PART
    await complete_upload(client, data[2 * PART :], chunk, conf["SendAhead"])
    post = await backend.posts.get()
    assert_object_handover(post, ceph, bucket, ticket, data)
    assert backend.posts.pending == []
    assert ceph.multipart_uploads(bucket) == []


@pytest_twisted.ensureDeferred
async def test_a_tus_body_that_fails_its_checksum_sends_nothing_to_the_store(
    ceph: Ceph, bucket: str, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    """Bytes whose checksum is still to come do not stand: none goes to the store, and the
    voided ones never reach the object."""
    _, _, server = await s3_daemon(ceph, bucket, tmp_path / "spool", tmp_path, stopper)
    data = os.urandom(2 * PART + 1)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    url = f"{server.base}/tus/{ticket}"
    created = await treq.post(f"{server.base}/tus/", headers=creation(ticket, len(data)))
    assert created.code == 201
    checksum = "sha1 " + base64.b64encode(hashlib.sha1(data).digest()).decode()
    garbage = os.urandom(len(data))
    refused = await patch(url, garbage, 0, {"Upload-Checksum": checksum})
    assert refused.code == 460, await refused.text()
    assert stored_parts(ceph, bucket, f"up/{ticket}") == 0
    accepted = await patch(url, data, 0, {"Upload-Checksum": checksum})
    assert accepted.code == 204, await accepted.text()
    post = await backend.posts.get()
    assert_object_handover(post, ceph, bucket, ticket, data)
    assert ceph.read(bucket, f"up/{ticket}") == data


def creation(ticket: str, length: int) -> dict[str, str]:
    encoded = base64.b64encode(ticket.encode()).decode()
    return {**TUS, "Upload-Length": str(length), "Upload-Metadata": f"ticket {encoded}"}


async def patch(url: str, body: bytes, offset: int, headers: dict[str, str]) -> Any:
    return await treq.request(
        "PATCH", url, data=body,
        headers={**TUS, "Content-Type": "application/offset+octet-stream",
                 "Upload-Offset": str(offset), **headers},
    )  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_tus_concatenation_is_refused_with_object_storage(
    ceph: Ceph, bucket: str, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    """A partial's spool file has holes where its parts went to the store: it cannot be
    copied into the ticket's file, so neither partials nor finals are taken."""
    _, _, server = await s3_daemon(ceph, bucket, tmp_path / "spool", tmp_path, stopper)
    options = await treq.request("OPTIONS", f"{server.base}/tus/", headers=TUS)
    assert "concatenation" not in options.headers.getRawHeaders("tus-extension")[0]
    ticket = await server.new_upload(backend.url)
    partial = await treq.post(
        f"{server.base}/tus/", headers={**creation(ticket, 10), "Upload-Concat": "partial"}
    )
    assert partial.code == 501, await partial.text()
    final = await treq.post(
        f"{server.base}/tus/",
        headers={**creation(ticket, 10), "Upload-Concat": f"final;{server.base}/tus/x"},
    )
    assert final.code == 501, await final.text()
    head = await treq.head(f"{server.base}/tus/{ticket}", headers=TUS)
    assert head.code == 404  # nothing was created for the ticket
