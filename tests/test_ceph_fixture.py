"""The throwaway Ceph of `tests/ceph.py` is a real S3 store: what the object-storage
tests will rely on (bytes kept, multipart uploads completed, aborted and listed,
radosgw restarted without losing data) holds against it."""

from __future__ import annotations

import os
from pathlib import Path

import botocore.exceptions
import pytest

from .ceph import Ceph, missing_binaries

MiB = 1 << 20
PART = 5 * MiB  # S3's smallest part but the last; RGW enforces it as AWS does


def test_an_object_put_is_read_back_byte_for_byte(ceph: Ceph, bucket: str) -> None:
    data = os.urandom(3 * MiB + 17)
    ceph.client().put_object(Bucket=bucket, Key="dir/file.bin", Body=data)
    assert ceph.objects(bucket) == {"dir/file.bin": len(data)}
    assert ceph.read(bucket, "dir/file.bin") == data


def test_a_multipart_upload_completes_with_its_parts_bytes_in_order(
    ceph: Ceph, bucket: str
) -> None:
    s3 = ceph.client()
    parts = [os.urandom(PART), os.urandom(PART), os.urandom(MiB + 3)]
    upload = s3.create_multipart_upload(Bucket=bucket, Key="big")["UploadId"]
    assert ceph.multipart_uploads(bucket) == [("big", upload)]
    etags = [
        s3.upload_part(Bucket=bucket, Key="big", UploadId=upload, PartNumber=n, Body=body)["ETag"]
        for n, body in enumerate(parts, 1)
    ]
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key="big",
        UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]},
    )
    assert ceph.read(bucket, "big") == b"".join(parts)
    assert ceph.objects(bucket) == {"big": sum(map(len, parts))}
    assert ceph.multipart_uploads(bucket) == []


def test_an_aborted_multipart_upload_leaves_nothing(ceph: Ceph, bucket: str) -> None:
    s3 = ceph.client()
    upload = s3.create_multipart_upload(Bucket=bucket, Key="gone")["UploadId"]
    s3.upload_part(Bucket=bucket, Key="gone", UploadId=upload, PartNumber=1, Body=b"x" * PART)
    s3.abort_multipart_upload(Bucket=bucket, Key="gone", UploadId=upload)
    assert ceph.multipart_uploads(bucket) == []
    assert ceph.objects(bucket) == {}
    with pytest.raises(botocore.exceptions.ClientError) as error:
        s3.list_parts(Bucket=bucket, Key="gone", UploadId=upload)
    # AWS says NoSuchUpload; RGW (16.2) says NoSuchKey: clients must take either.
    assert error.value.response["Error"]["Code"] in ("NoSuchUpload", "NoSuchKey")


def test_uploads_in_progress_are_listed_until_finished(ceph: Ceph, bucket: str) -> None:
    s3 = ceph.client()
    first = s3.create_multipart_upload(Bucket=bucket, Key="a")["UploadId"]
    second = s3.create_multipart_upload(Bucket=bucket, Key="b")["UploadId"]
    assert sorted(ceph.multipart_uploads(bucket)) == [("a", first), ("b", second)]
    s3.abort_multipart_upload(Bucket=bucket, Key="a", UploadId=first)
    assert ceph.multipart_uploads(bucket) == [("b", second)]
    assert ceph.objects(bucket) == {}  # begun uploads are not objects


@pytest.mark.parametrize("graceful", [False, True], ids=["killed", "terminated"])
def test_objects_and_parts_outlive_a_radosgw_restart(
    ceph: Ceph, bucket: str, graceful: bool
) -> None:
    s3 = ceph.client()
    kept = os.urandom(MiB)
    s3.put_object(Bucket=bucket, Key="kept", Body=kept)
    first = os.urandom(PART)
    upload = s3.create_multipart_upload(Bucket=bucket, Key="resumed")["UploadId"]
    etag = s3.upload_part(Bucket=bucket, Key="resumed", UploadId=upload, PartNumber=1, Body=first)[
        "ETag"
    ]
    ceph.stop_rgw(graceful=graceful)
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        s3.head_object(Bucket=bucket, Key="kept")
    ceph.start_rgw()
    assert ceph.read(bucket, "kept") == kept
    # The upload goes on from the parts the store already holds.
    listed = s3.list_parts(Bucket=bucket, Key="resumed", UploadId=upload)["Parts"]
    assert [(p["PartNumber"], p["ETag"], p["Size"]) for p in listed] == [(1, etag, PART)]
    last = os.urandom(100)
    etag2 = s3.upload_part(Bucket=bucket, Key="resumed", UploadId=upload, PartNumber=2, Body=last)[
        "ETag"
    ]
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key="resumed",
        UploadId=upload,
        MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": etag}, {"PartNumber": 2, "ETag": etag2}]
        },
    )
    assert ceph.read(bucket, "resumed") == first + last


@pytest.mark.skipif(bool(missing_binaries()), reason="Ceph is not installed")
def test_stop_ends_every_process_it_started_and_removes_its_directory() -> None:
    cluster = Ceph()
    cluster.start()
    pids, directory = cluster.pids(), cluster.dir
    assert set(pids) == {"mon", "osd", "rgw"}
    assert (directory / "ceph.conf").is_file()
    cluster.stop()
    assert not directory.exists()
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists()  # reaped: gone, not a zombie


@pytest.mark.skipif(bool(missing_binaries()), reason="Ceph is not installed")
def test_s3_over_https_with_the_clusters_own_certificate() -> None:
    with Ceph(tls=True) as cluster:
        assert cluster.endpoint.startswith("https://127.0.0.1:")
        bucket = cluster.make_bucket()
        data = os.urandom(PART + 1)
        cluster.client().put_object(Bucket=bucket, Key="secret", Body=data)
        assert cluster.read(bucket, "secret") == data
