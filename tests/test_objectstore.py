"""`incoming.objectstore` against a real S3 store (the throwaway Ceph RGW of tests/ceph.py):
multipart uploads from file ranges, resume from the parts listed, aborts that leave
nothing, small objects, reading back, and a store that is away."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from incoming.files import punch_hole
from incoming.objectstore import (
    Gone,
    Location,
    ObjectStore,
    Part,
    StoreError,
    StoreUnavailable,
    make_client,
)

from .ceph import Ceph

MiB = 1 << 20
PART = 5 * MiB  # S3's smallest part but the last


@pytest.fixture
def store(ceph: Ceph, bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ObjectStore]:
    """A store on the test's bucket, with credentials found the standard way (here: the
    environment) and no region given (one is made up for a named endpoint)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ceph.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ceph.secret_key)
    for name in ("AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    pool = ThreadPool(minthreads=1, maxthreads=4, name="test-s3")
    pool.start()
    client = make_client(ceph.endpoint, connections=4)
    yield ObjectStore(Location(bucket, "up/"), reactor, pool, client, ceph.endpoint)
    pool.stop()


@pytest.fixture
def spool(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(2 * PART + 12345)
    path = tmp_path / "spool"
    path.write_bytes(data)
    return path, data


def test_a_location_is_a_bucket_and_a_key_prefix() -> None:
    assert Location.parse("s3://my-bucket/some/prefix-") == Location("my-bucket", "some/prefix-")
    assert Location.parse("s3://my-bucket") == Location("my-bucket", "")
    assert Location.parse("s3://b.x1//lead") == Location("b.x1", "lead")
    location = Location("b1b", "in/")
    assert (location.key("T"), location.url("in/T"), str(location)) == (
        "in/T",
        "s3://b1b/in/T",
        "s3://b1b/in/",
    )
    for bad in ("http://b/x", "s3:///x", "s3://B/x", "s3://a/x#f", "s3://ab", "s3://a..b/"):
        with pytest.raises(ValueError):
            Location.parse(bad)


@pytest_twisted.ensureDeferred
async def test_parts_sent_from_file_ranges_make_the_object(
    store: ObjectStore, ceph: Ceph, bucket: str, spool: tuple[Path, bytes]
) -> None:
    path, data = spool
    key = store.location.key("whole")
    upload = await store.begin(key)
    assert await store.uploads(key) == [upload]
    ranges = [(0, PART), (PART, PART), (2 * PART, len(data) - 2 * PART)]
    sent = [
        await store.upload_part(key, upload, n, path, offset, size)
        for n, (offset, size) in enumerate(ranges, 1)
    ]
    assert [(p.number, p.size) for p in sent] == [(1, PART), (2, PART), (3, 12345)]
    assert [p.etag for p in sent] == [
        f'"{hashlib.md5(data[o : o + s]).hexdigest()}"' for o, s in ranges
    ]
    assert await store.parts(key, upload) == sent  # what a resume finds
    await store.complete(key, upload, sent)
    assert ceph.read(bucket, key) == data
    assert ceph.multipart_uploads(bucket) == []
    assert await store.uploads(key) == []
    assert await store.sha256(key) == (hashlib.sha256(data).hexdigest(), len(data))


@pytest_twisted.ensureDeferred
async def test_a_part_sent_again_replaces_the_first(
    store: ObjectStore, ceph: Ceph, bucket: str, spool: tuple[Path, bytes]
) -> None:
    path, data = spool
    key = store.location.key("again")
    upload = await store.begin(key)
    await store.upload_part(key, upload, 1, path, PART, PART)  # the wrong bytes first
    first = await store.upload_part(key, upload, 1, path, 0, PART)
    last = await store.upload_part(key, upload, 2, path, PART, 10)
    assert await store.parts(key, upload) == [first, last]
    await store.complete(key, upload, [first, last])
    assert ceph.read(bucket, key) == data[: PART + 10]


@pytest_twisted.ensureDeferred
async def test_a_spool_range_without_data_sends_nothing(
    store: ObjectStore, spool: tuple[Path, bytes]
) -> None:
    """A range past the file's end, or over a hole (bytes given back once sent), would
    read as zeros: it is never sent."""
    path, data = spool
    key = store.location.key("short")
    upload = await store.begin(key)
    with pytest.raises(OSError, match="no data"):
        await store.upload_part(key, upload, 1, path, 2 * PART, PART)
    with open(path, "r+b") as f:
        punch_hole(f.fileno(), PART, PART)
    assert path.read_bytes() == data[:PART] + bytes(PART) + data[2 * PART :]
    with pytest.raises(OSError, match="no data"):
        await store.upload_part(key, upload, 1, path, PART // 2, PART)
    with pytest.raises(OSError, match="no data"):
        await store.put(key, path, 0, 2 * PART)
    assert await store.parts(key, upload) == []
    await store.upload_part(key, upload, 1, path, 0, PART)  # data on both sides of it
    await store.upload_part(key, upload, 2, path, 2 * PART, len(data) - 2 * PART)
    await store.abort(key, upload)


@pytest_twisted.ensureDeferred
async def test_an_aborted_upload_leaves_no_part_and_aborting_again_is_no_error(
    store: ObjectStore, ceph: Ceph, bucket: str, spool: tuple[Path, bytes]
) -> None:
    path, _ = spool
    key = store.location.key("gone")
    upload = await store.begin(key)
    other = await store.begin(key + "-other")  # a key that begins with the same text
    await store.upload_part(key, upload, 1, path, 0, PART)
    assert await store.uploads(key) == [upload]
    await store.abort(key, upload)
    await store.abort(key, upload)
    assert await store.parts(key, upload) is None
    assert ceph.multipart_uploads(bucket) == [(key + "-other", other)]
    with pytest.raises(Gone):
        await store.upload_part(key, upload, 2, path, 0, PART)
    await store.abort(key + "-other", other)
    assert ceph.objects(bucket) == {}


@pytest_twisted.ensureDeferred
async def test_small_objects_put_read_and_deleted(
    store: ObjectStore, ceph: Ceph, bucket: str, spool: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, data = spool
    key = store.location.key("tail")
    assert await store.head(key) is None
    await store.put(key, path, 100, 3000, {"offset": "100"})
    found = await store.head(key)
    assert found is not None and (found.size, found.metadata) == (3000, {"offset": "100"})
    target = tmp_path / "target"
    assert await store.fetch(key, target, 7) == 3000
    assert target.read_bytes() == b"\0" * 7 + data[100:3100]
    await store.delete(key)
    await store.delete(key)
    assert await store.head(key) is None
    assert await store.fetch(key, target, 0) is None
    assert ceph.objects(bucket) == {}


@pytest_twisted.ensureDeferred
async def test_a_store_that_is_away_is_told_from_a_refusal(
    store: ObjectStore, ceph: Ceph, spool: tuple[Path, bytes]
) -> None:
    path, _ = spool
    key = store.location.key("away")
    upload = await store.begin(key)
    ceph.stop_rgw()
    try:
        with pytest.raises(StoreUnavailable):
            await store.upload_part(key, upload, 1, path, 0, PART)
        with pytest.raises(StoreUnavailable):
            store.check()
    finally:
        ceph.start_rgw()
    part = await store.upload_part(key, upload, 1, path, 0, PART)  # the upload goes on
    assert await store.parts(key, upload) == [Part(1, PART, part.etag)]
    await store.abort(key, upload)


def test_the_start_up_check_names_a_missing_bucket(store: ObjectStore, ceph: Ceph) -> None:
    store.check()
    missing = make_client(ceph.endpoint)
    with pytest.raises(StoreError) as error:
        ObjectStore(Location("no-such-bucket"), reactor, ThreadPool(), missing).check()
    assert not isinstance(error.value, StoreUnavailable)
    assert "404" in str(error.value)


@pytest_twisted.ensureDeferred
async def test_each_part_carries_its_signed_sha256_which_the_store_checks(
    store: ObjectStore, spool: tuple[Path, bytes]
) -> None:
    """The part's integrity check: its SHA-256 in the signature (x-amz-content-sha256),
    not UNSIGNED-PAYLOAD, so that bytes changed on the way are refused."""
    path, data = spool
    sent: list[str] = []

    def seen(request: Any, **_: Any) -> None:
        sent.append(request.headers["X-Amz-Content-SHA256"].decode())

    store._s3.meta.events.register("before-send.s3.UploadPart", seen)
    key = store.location.key("signed")
    upload = await store.begin(key)
    await store.upload_part(key, upload, 1, path, PART, PART)
    assert sent == [hashlib.sha256(data[PART : 2 * PART]).hexdigest()]
    await store.abort(key, upload)
