"""An S3-compatible object store (AWS, Ceph RGW, MinIO) through boto3, off the reactor.

Every call runs in a thread pool of its own (the S3 calls wait on the network, the
disk threads must not wait behind them) and returns a Deferred. boto3 (botocore) was
chosen over the MinIO SDK by measurement (bench/s3_client_bench.py): a public
multipart API, part bodies streamed from a file range (the MinIO SDK wants bytes in
memory), less CPU over HTTPS, and its Config for retries, timeouts and the pool.

Each part's SHA-256 is in its signature (SigV4's x-amz-content-sha256), which S3 stores
check (XAmzContentSHA256Mismatch: AWS, Ceph RGW, MinIO): the part's integrity check.
It replaces Content-MD5, also checked, by measurement: with the SHA extensions of
today's CPUs, SHA-256 costs 0.7 CPU-s/GiB here, MD5 1.7. Checksum trailers
(botocore's default since 1.36) are off: Ceph RGW 16 refuses them over HTTPS, and
ignores x-amz-checksum-* headers anyway.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from .files import DATA_MODE, has_hole, pwrite_all

T = TypeVar("T")
MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's smallest part, but for the last
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_PARTS = 10_000  # in one multipart upload: an object is at most this many parts
MAX_OBJECT_SIZE = 5 * 1024**4  # S3's largest object
READ_BLOCK = MiB  # what reading an object back reads at a time
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0  # an answer, once a request is sent (a part's body included)
ATTEMPTS = 2  # botocore's own (a dropped keep-alive connection); outages are the caller's
# Codes that say the store is busy or away, not that the request is wrong.
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}
)
_GONE_CODES = frozenset({"NoSuchUpload", "NoSuchKey", "404"})
# S3's rules for bucket names (the common subset: no dots, so no TLS name trouble)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class StoreError(OSError):
    """A store call failed; the message says why, for the log. (An OSError: to the
    uploads, the store is storage that failed.)"""


class StoreUnavailable(StoreError):
    """The store did not answer, or answered that it is busy: worth trying again later."""


class Gone(StoreError):
    """The object, or the multipart upload, does not exist (any more)."""


@dataclass(frozen=True)
class Location:
    """Where finished files go: `s3://BUCKET/PREFIX`; a file's key is PREFIX + its ticket."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> Location:
        """Raises ValueError with the reason."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"{url!r} is not an s3://BUCKET/PREFIX URL")
        if parts.query or parts.fragment:
            raise ValueError(f"{url!r}: no ?query or #fragment in an s3:// URL")
        if not _BUCKET.match(parts.netloc) or ".." in parts.netloc:
            raise ValueError(f"{parts.netloc!r} is not a valid S3 bucket name")
        return cls(parts.netloc, parts.path.lstrip("/"))

    def key(self, name: str) -> str:
        return self.prefix + name

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def __str__(self) -> str:
        return self.url(self.prefix)


@dataclass(frozen=True)
class Part:
    """A part of a multipart upload, as the store lists it."""

    number: int
    size: int
    etag: str


@dataclass(frozen=True)
class StoredObject:
    """An object's size and user metadata (`x-amz-meta-*`)."""

    size: int
    metadata: dict[str, str]


class FileRange(io.RawIOBase):
    """`size` bytes of an open file from `offset`, as a seekable stream: botocore sends
    it as a part's body a block at a time (never the whole part in memory), and seeks
    back to its start to send it again after a failed attempt."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self.fd, self.offset, self.size, self.position = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, min(self.size, base + offset))
        return self.position

    def read(self, n: int | None = -1) -> bytes:
        """At least READ_BLOCK bytes when there are (more than `n`: http.client asks for
        16 KiB at a time, and sends what it gets; a pread and a send per MiB cost a
        tenth of one per 16 KiB)."""
        left = self.size - self.position
        n = left if n is None or n < 0 else min(max(n, READ_BLOCK), left)
        data = os.pread(self.fd, n, self.offset + self.position) if n else b""
        if len(data) < n:
            raise OSError(f"spool file ends before {self.offset + self.size} bytes")
        self.position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.size - self.position)
        data = os.pread(self.fd, n, self.offset + self.position) if n > 0 else b""
        if len(data) < n:
            raise OSError(f"spool file ends before {self.offset + self.size} bytes")
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def file_range(fd: int, offset: int, size: int) -> FileRange:
    """A body for a request; OSError if the range is not all in the file (a hole, given
    back once sent, is never sent as data)."""
    if has_hole(fd, offset, size):
        raise OSError(f"the spool file has no data for bytes {offset} to {offset + size}")
    return FileRange(fd, offset, size)


def make_client(
    endpoint: str | None, region: str | None = None, connections: int = 10, verify: Any = None
) -> Any:
    """A boto3 S3 client: credentials and region the standard way (environment, AWS config
    files), path-style addressing when an endpoint is named (RGW and MinIO need it)."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    if endpoint is not None and region is None and session.region_name is None:
        region = "us-east-1"  # any name does for RGW and MinIO; SigV4 needs one
    return session.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        verify=verify,
        config=Config(
            s3={
                "addressing_style": "path" if endpoint is not None else "auto",
                "payload_signing_enabled": True,  # over HTTPS too: the parts' check (above)
            },
            retries={"mode": "standard", "total_max_attempts": ATTEMPTS},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            max_pool_connections=connections,
            tcp_keepalive=True,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


class ObjectStore:
    """The calls the server makes on one bucket: multipart uploads whose parts come from
    files on disk, small objects, deletions, and reading an object back to hash it."""

    def __init__(
        self,
        location: Location,
        reactor: IReactorFromThreads,
        pool: ThreadPool,
        client: Any,
        endpoint: str | None = None,
    ) -> None:
        self.location = location
        self.endpoint = endpoint  # for the handover's s3Endpoint: None for AWS itself
        self._reactor = reactor
        self._pool = pool
        self._s3 = client

    @property
    def bucket(self) -> str:
        return self.location.bucket

    def _call(self, work: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, _translated, work, *args)

    # Multipart uploads

    def begin(self, key: str) -> Deferred[str]:
        """A new multipart upload of `key`; its upload id."""
        return self._call(self._begin, key)

    def upload_part(
        self, key: str, upload_id: str, number: int, path: Path, offset: int, size: int
    ) -> Deferred[Part]:
        """Send `size` bytes of the file at `path` from `offset` as part `number` (again,
        if the store has one by that number: it is replaced)."""
        return self._call(self._upload_part, key, upload_id, number, path, offset, size)

    def parts(self, key: str, upload_id: str) -> Deferred[list[Part] | None]:
        """The parts the store holds, by number; None if there is no such upload."""
        return self._call(self._parts, key, upload_id)

    def complete(self, key: str, upload_id: str, parts: list[Part]) -> Deferred[None]:
        """Make the object of `parts` (in their order); the upload ends."""
        return self._call(self._complete, key, upload_id, parts)

    def abort(self, key: str, upload_id: str) -> Deferred[None]:
        """End the upload and drop its parts; an upload already gone is no error."""
        return self._call(self._abort, key, upload_id)

    def uploads(self, key: str) -> Deferred[list[str]]:
        """The ids of the multipart uploads of exactly `key` begun and not yet ended."""
        return self._call(self._uploads, key)

    # Objects

    def put(
        self, key: str, path: Path, offset: int, size: int, metadata: dict[str, str] | None = None
    ) -> Deferred[None]:
        """Store `size` bytes of the file at `path` from `offset` as the object `key`."""
        return self._call(self._put, key, path, offset, size, metadata or {})

    def head(self, key: str) -> Deferred[StoredObject | None]:
        """The object's size and metadata; None if there is none."""
        return self._call(self._head, key)

    def fetch(self, key: str, path: Path, offset: int) -> Deferred[int | None]:
        """Write the object's bytes into the file at `path` from `offset` (not synced);
        their count, or None if there is no such object."""
        return self._call(self._fetch, key, path, offset)

    def sha256(self, key: str) -> Deferred[tuple[str, int]]:
        """The SHA-256 (hex) and size of the object's bytes, read back from the store."""
        return self._call(self._sha256, key)

    def delete(self, key: str) -> Deferred[None]:
        """Delete the object; one already gone is no error."""
        return self._call(self._delete, key)

    def check(self) -> None:
        """Whether the bucket can be reached and used (at start-up, blocking): raises
        StoreError with the reason (StoreUnavailable if the store did not answer)."""
        _translated(self._s3.head_bucket, Bucket=self.bucket)

    # In the pool's threads:

    def _begin(self, key: str) -> str:
        return str(self._s3.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"])

    def _upload_part(
        self, key: str, upload_id: str, number: int, path: Path, offset: int, size: int
    ) -> Part:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            answer = self._s3.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=file_range(fd, offset, size),
                ContentLength=size,
            )
        finally:
            os.close(fd)
        return Part(number, size, str(answer["ETag"]))

    def _parts(self, key: str, upload_id: str) -> list[Part] | None:
        found: list[Part] = []
        pages = self._s3.get_paginator("list_parts")
        try:
            for page in pages.paginate(Bucket=self.bucket, Key=key, UploadId=upload_id):
                found += [
                    Part(int(p["PartNumber"]), int(p["Size"]), str(p["ETag"]))
                    for p in page.get("Parts", [])
                ]
        except Exception as e:
            if _gone(e):  # AWS says NoSuchUpload, RGW 16 NoSuchKey
                return None
            raise
        return sorted(found, key=lambda p: p.number)

    def _complete(self, key: str, upload_id: str, parts: list[Part]) -> None:
        listed = [{"PartNumber": p.number, "ETag": p.etag} for p in parts]
        self._s3.complete_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": listed}
        )

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as e:
            if not _gone(e):
                raise

    def _uploads(self, key: str) -> list[str]:
        pages = self._s3.get_paginator("list_multipart_uploads")
        return [
            str(u["UploadId"])
            for page in pages.paginate(Bucket=self.bucket, Prefix=key)
            for u in page.get("Uploads", [])
            if u["Key"] == key
        ]

    def _put(self, key: str, path: Path, offset: int, size: int, metadata: dict[str, str]) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=file_range(fd, offset, size),
                ContentLength=size,
                Metadata=metadata,
            )
        finally:
            os.close(fd)

    def _head(self, key: str) -> StoredObject | None:
        try:
            answer = self._s3.head_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            if _gone(e):
                return None
            raise
        return StoredObject(int(answer["ContentLength"]), dict(answer.get("Metadata", {})))

    def _fetch(self, key: str, path: Path, offset: int) -> int | None:
        try:
            body = self._s3.get_object(Bucket=self.bucket, Key=key)["Body"]
        except Exception as e:
            if _gone(e):
                return None
            raise
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, DATA_MODE)
        written = 0
        try:
            while block := body.read(READ_BLOCK):
                pwrite_all(fd, block, offset + written)
                written += len(block)
        finally:
            os.close(fd)
            body.close()
        return written

    def _sha256(self, key: str) -> tuple[str, int]:
        body = self._s3.get_object(Bucket=self.bucket, Key=key)["Body"]
        digest, size = hashlib.sha256(), 0
        try:
            while block := body.read(READ_BLOCK):
                digest.update(block)
                size += len(block)
        finally:
            body.close()
        return digest.hexdigest(), size

    def _delete(self, key: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=key)  # S3: no error if none


def _translated(work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a boto3 call; its failures as StoreUnavailable (try again later) or StoreError."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return work(*args, **kwargs)
    except ClientError as e:
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        message = f"{code or status}: {error.get('Message', '') or e}"
        if _gone(e):
            raise Gone(message) from None
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            raise StoreUnavailable(message) from None
        raise StoreError(message) from None
    except BotoCoreError as e:  # no connection, a timeout, a broken answer
        raise StoreUnavailable(str(e)) from None


def _gone(error: Exception) -> bool:
    """Whether a ClientError says that the object or the upload does not exist."""
    from botocore.exceptions import ClientError

    return isinstance(error, ClientError) and str(error.response.get("Error", {}).get("Code")) in (
        _GONE_CODES
    )
