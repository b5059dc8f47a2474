"""`incoming.spool.Shipper`: spool files go to a real S3 store (Ceph RGW) part by part
while they grow, the spool gives back what the store has, writes wait when the store
falls behind, and a restart goes on from what the store and the spool hold."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.python.threadpool import ThreadPool

from incoming import spool
from incoming.objectstore import Location, ObjectStore, StoreError, StoreUnavailable
from incoming.spool import Shipper

from .ceph import Ceph

MiB = 1 << 20
PART = 5 * MiB


class Spool:
    """A spool directory and a store on the test's bucket; `shipper()` makes a Shipper on
    them (a second one is a restarted server)."""

    def __init__(self, directory: Path, store: ObjectStore) -> None:
        self.directory = directory
        self.store = store

    def path(self, upload_id: str) -> Path:
        return self.directory / f"{upload_id}.part"

    def shipper(self, part_size: int = PART, tails: bool = False) -> Shipper:
        return Shipper(self.store, reactor, self.path, deferToThread, part_size, tails)

    def write(self, upload_id: str, data: bytes, offset: int = 0) -> None:
        with open(self.path(upload_id), "ab") as f:
            os.pwrite(f.fileno(), data, offset)

    def allocated(self, upload_id: str) -> int:
        """Bytes of disk the spool file holds (holes do not count)."""
        return os.stat(self.path(upload_id)).st_blocks * 512


@pytest.fixture
def store(ceph: Ceph, bucket: str) -> Iterator[ObjectStore]:
    pool = ThreadPool(minthreads=1, maxthreads=4, name="test-s3")
    pool.start()
    client = ceph.client()
    yield ObjectStore(Location(bucket, "in/"), reactor, pool, client, ceph.endpoint)
    pool.stop()


@pytest.fixture
def spooled(tmp_path: Path, store: ObjectStore) -> Spool:
    return Spool(tmp_path, store)


async def settle(shipper: Shipper, upload_id: str) -> None:
    await shipper.settled(upload_id)


@pytest_twisted.ensureDeferred
async def test_whole_parts_that_stand_go_while_the_file_grows_and_leave_the_spool(
    spooled: Spool, ceph: Ceph, bucket: str
) -> None:
    shipper, data = spooled.shipper(), os.urandom(2 * PART + 100)
    spooled.write("u", data[: PART + 100])
    shipper.firm("u", PART + 100)
    await settle(shipper, "u")
    (key, upload), = ceph.multipart_uploads(bucket)  # fmt: skip
    assert key == "in/u"
    listed = ceph.client().list_parts(Bucket=bucket, Key=key, UploadId=upload)["Parts"]
    assert [p["Size"] for p in listed] == [PART]
    assert spooled.allocated("u") < MiB  # the part's bytes are given back
    assert spooled.path("u").stat().st_size == PART + 100  # its offsets stay
    spooled.write("u", data[PART + 100 :], PART + 100)
    shipper.firm("u", len(data))
    await shipper.complete("u", len(data))
    assert ceph.read(bucket, "in/u") == data
    assert ceph.multipart_uploads(bucket) == []


@pytest_twisted.ensureDeferred
async def test_bytes_that_do_not_stand_stay_in_the_spool(
    spooled: Spool, ceph: Ceph, bucket: str
) -> None:
    shipper = spooled.shipper()
    spooled.write("u", os.urandom(3 * PART))
    shipper.firm("u", PART - 1)
    assert shipper._shipments["u"].sending == {}
    assert ceph.multipart_uploads(bucket) == []
    assert spooled.allocated("u") >= 3 * PART


@pytest_twisted.ensureDeferred
async def test_a_small_upload_is_one_object_and_no_multipart_upload(
    spooled: Spool, ceph: Ceph, bucket: str
) -> None:
    shipper = spooled.shipper()
    data = os.urandom(PART)
    spooled.write("small", data)
    shipper.firm("small", len(data) - 1)
    await shipper.complete("small", len(data))
    assert ceph.read(bucket, "in/small") == data
    spooled.write("empty", b"")
    await shipper.complete("empty", 0)
    assert ceph.objects(bucket) == {"in/small": PART, "in/empty": 0}


@pytest_twisted.ensureDeferred
async def test_a_restart_sends_only_what_the_store_lacks(
    spooled: Spool, ceph: Ceph, bucket: str
) -> None:
    first = spooled.shipper()
    data = os.urandom(3 * PART + 7)
    spooled.write("r", data[: 2 * PART])
    first.firm("r", 2 * PART)
    await settle(first, "r")
    (_, upload), = ceph.multipart_uploads(bucket)  # fmt: skip
    sent = ceph.client().list_parts(Bucket=bucket, Key="in/r", UploadId=upload)["Parts"]
    # A restarted server, configured with another part size: the upload keeps its own.
    second = spooled.shipper(part_size=6 * MiB)
    spooled.write("r", data[2 * PART :], 2 * PART)
    second.firm("r", 3 * PART)
    await settle(second, "r")
    parts = ceph.client().list_parts(Bucket=bucket, Key="in/r", UploadId=upload)["Parts"]
    assert [(p["PartNumber"], p["ETag"], p["LastModified"]) for p in parts[:2]] == [
        (p["PartNumber"], p["ETag"], p["LastModified"]) for p in sent
    ]
    assert [p["Size"] for p in parts] == [PART] * 3
    await second.complete("r", len(data))
    assert ceph.read(bucket, "in/r") == data
    assert ceph.multipart_uploads(bucket) == []


@pytest_twisted.ensureDeferred
async def test_writes_wait_for_a_store_that_is_away_and_go_on_when_it_is_back(
    spooled: Spool, ceph: Ceph, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool, "RETRY_MAX", 0.5)
    shipper = spooled.shipper()
    limit = spool.SPOOL_PARTS * PART
    data = os.urandom(limit + PART)
    spooled.write("w", data)
    ceph.stop_rgw()
    try:
        shipper.firm("w", limit - 1)
        assert shipper.room("w").called  # less than SPOOL_PARTS parts wait
        shipper.firm("w", limit)
        room = shipper.room("w")
        assert not room.called
        await deferToThread(lambda: None)
        assert not room.called
    finally:
        ceph.start_rgw()
    await room  # parts went, room came
    await shipper.complete("w", len(data))
    assert ceph.read(bucket, "in/w") == data


@pytest_twisted.ensureDeferred
async def test_a_store_away_too_long_is_told_to_the_writer_and_then_at_once(
    spooled: Spool, ceph: Ceph, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipper = spooled.shipper()
    shipper.patience = 0.5
    spooled.write("w", os.urandom(spool.SPOOL_PARTS * PART))
    ceph.stop_rgw()
    try:
        shipper.firm("w", spool.SPOOL_PARTS * PART)
        with pytest.raises(StoreUnavailable, match="has not taken this upload's bytes"):
            await shipper.room("w")
        later = shipper.room("w")
        assert later.called  # failed at once: its client hears it without a wait
        with pytest.raises(StoreUnavailable):
            await later
    finally:
        ceph.start_rgw()
    await shipper.abort("w")


@pytest_twisted.ensureDeferred
async def test_abort_leaves_no_part_even_with_parts_on_their_way(
    spooled: Spool, ceph: Ceph, bucket: str
) -> None:
    shipper = spooled.shipper()
    spooled.write("a", os.urandom(3 * PART))
    shipper.firm("a", 3 * PART)
    await shipper.abort("a")
    assert ceph.multipart_uploads(bucket) == []
    assert ceph.objects(bucket) == {}


@pytest_twisted.ensureDeferred
async def test_parts_lost_by_the_store_fail_the_upload(
    spooled: Spool, ceph: Ceph, bucket: str
) -> None:
    shipper = spooled.shipper()
    spooled.write("l", os.urandom(3 * PART))
    shipper.firm("l", PART)
    await settle(shipper, "l")
    for key, upload in ceph.multipart_uploads(bucket):  # a lifecycle rule, say
        ceph.client().abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
    shipper.firm("l", 2 * PART)
    await settle(shipper, "l")
    failure: Any = None
    try:
        await shipper.room("l")
    except StoreError as e:
        failure = e
    assert failure is not None and "lost" in str(failure)
    with pytest.raises(StoreError):
        await shipper.complete("l", 3 * PART)
    assert ceph.objects(bucket) == {}


@pytest_twisted.ensureDeferred
async def test_an_upload_handed_off_goes_on_from_another_spool(
    tmp_path: Path, store: ObjectStore, ceph: Ceph, bucket: str
) -> None:
    """Cluster mode: instance A lets go of the upload (its whole parts in the store, the
    rest as the tail object), instance B with a spool of its own takes it up there."""
    a, b = Spool(tmp_path / "a", store), Spool(tmp_path / "b", store)
    for spool_ in (a, b):
        spool_.directory.mkdir()
    data = os.urandom(3 * PART + 99)
    first = a.shipper(tails=True)
    a.write("m", data[: 2 * PART + 1000])
    await first.hand_off("m", 2 * PART + 1000)
    assert ceph.objects(bucket) == {"in/m.tail": 1000}
    a.path("m").unlink()
    second = b.shipper(tails=True)
    assert await second.take_up("m") == 2 * PART + 1000
    assert b.path("m").read_bytes()[2 * PART :] == data[2 * PART : 2 * PART + 1000]
    b.write("m", data[2 * PART + 1000 :], 2 * PART + 1000)
    second.firm("m", len(data))
    await second.complete("m", len(data))
    assert ceph.read(bucket, "in/m") == data
    assert ceph.objects(bucket) == {"in/m": len(data)}  # the tail went too
    assert ceph.multipart_uploads(bucket) == []


@pytest_twisted.ensureDeferred
async def test_bytes_only_in_a_lost_spool_are_sent_again(
    tmp_path: Path, store: ObjectStore, ceph: Ceph, bucket: str
) -> None:
    """Instance A dies with bytes in its spool that the store lacks: B's offset is where
    the store's parts end. A's spool, back after a restart, still counts where it has them."""
    a, b = Spool(tmp_path / "a", store), Spool(tmp_path / "b", store)
    for spool_ in (a, b):
        spool_.directory.mkdir()
    data = os.urandom(3 * PART)
    first = a.shipper(tails=True)
    a.write("k", data[: 2 * PART + 5])
    first.firm("k", PART)
    await first.settled("k")  # part 1 in the store; then A is killed
    assert await b.shipper(tails=True).take_up("k") == PART
    assert b.path("k").stat().st_size == PART  # all hole: the store has it
    assert b.allocated("k") == 0
    restarted = a.shipper(tails=True)
    assert await restarted.take_up("k") == 2 * PART + 5  # part 1 stored, the rest in A's spool
    a.write("k", data[2 * PART + 5 :], 2 * PART + 5)
    restarted.firm("k", len(data))
    await restarted.complete("k", len(data))
    assert ceph.read(bucket, "in/k") == data
    assert ceph.multipart_uploads(bucket) == []
