#!/usr/bin/env python3
"""S3 clients for finished files: boto3 (botocore) against the MinIO Python SDK.

Against a throwaway Ceph RGW of its own (tests/ceph.py: monitor, in-memory OSD, radosgw
on a free loopback port), does what the server will do with a finished file: a
multipart upload (256 MiB in 16 MiB parts), each part's body read from the file on
disk, the parts sent by a pool of 4 threads, then CompleteMultipartUpload; the stored
object is checked (size, multipart ETag) and deleted. Each run is a fresh process, so
its CPU seconds (user + system, all threads) and peak RSS are the client's alone.
Over HTTPS (as stores are reached; RGW with a self-signed certificate), then plain
HTTP, then HTTPS through a slow link (a proxy adding delay and a rate cap both ways).
The variants:
- boto3: the body an open file range (botocore streams it); no checksum header
  (`request_checksum_calculation="when_required"`: botocore's default since 1.36
  sends bodies aws-chunked with a CRC32 trailer over HTTPS, which RGW 16 refuses with
  MissingContentLength), so botocore signs the payload's SHA-256 instead;
- boto3 +md5: with Content-MD5 (every S3 store checks it: BadDigest); over HTTPS the
  payload is then left unsigned;
- boto3 bytes: the body read into memory first, as the MinIO SDK needs it;
- minio: the SDK's multipart calls (`_upload_part` & co, private API); it computes the
  MD5 itself over HTTPS, the SHA-256 over HTTP;
- minio +md5: Content-MD5 given (over HTTPS the same work as `minio`).
Also: import time (import + first client, fresh processes) and install size (the
package and what it brings in).

    python bench/s3_client_bench.py [--runs 3] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import io
import json
import os
import queue
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.ceph import Ceph

ROOT = Path(__file__).resolve().parent.parent

MiB = 1 << 20
GiB = 1 << 30
VARIANTS: dict[str, dict[str, Any]] = {
    "boto3": {"client": "boto3", "body": "file"},
    "boto3 +md5": {"client": "boto3", "body": "file", "md5": True},
    "boto3 bytes": {"client": "boto3", "body": "bytes"},
    "minio": {"client": "minio", "body": "bytes"},
    "minio +md5": {"client": "minio", "body": "bytes", "md5": True},
}
LINK_VARIANTS = ("boto3 +md5", "minio")
Upload = Callable[[], None]


# The worker: one upload in a process of its own.
class FileRange(io.RawIOBase):
    """`size` bytes of an open file from `offset`, as a seekable stream (no fileno: a
    client must not take the whole file's length for the part's)."""

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
        left = self.size - self.position
        n = left if n is None or n < 0 else min(n, left)
        data = os.pread(self.fd, n, self.offset + self.position) if n else b""
        self.position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def content_md5(fd: int, offset: int, size: int) -> str:
    digest = hashlib.md5()
    for start in range(offset, offset + size, MiB):
        digest.update(os.pread(fd, min(MiB, offset + size - start), start))
    return base64.b64encode(digest.digest()).decode()


def boto3_uploader(spec: dict[str, Any], fd: int, ranges: list[tuple[int, int]]) -> Upload:
    """A client made; the upload to run."""
    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3",
        endpoint_url=spec["endpoint"],
        aws_access_key_id=spec["access_key"],
        aws_secret_access_key=spec["secret_key"],
        region_name=spec["region"],
        verify=spec["ca_file"],
        config=Config(
            s3={"addressing_style": "path"},
            max_pool_connections=spec["threads"],
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=10,
            read_timeout=120,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    bucket, key = spec["bucket"], spec["key"]

    def part(upload: str, number: int, offset: int, size: int) -> str:
        body = FileRange(fd, offset, size) if spec["body"] == "file" else os.pread(fd, size, offset)
        extra = {"ContentMD5": content_md5(fd, offset, size)} if spec.get("md5") else {}
        answer = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=number,
                                Body=body, ContentLength=size, **extra)  # fmt: skip
        return str(answer["ETag"])

    def run() -> None:
        upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        etags = in_threads(functools.partial(part, upload), ranges, spec["threads"])
        parts = [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]
        s3.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
        )

    return run


def minio_uploader(spec: dict[str, Any], fd: int, ranges: list[tuple[int, int]]) -> Upload:
    from minio import Minio
    from minio.datatypes import Part

    if spec["ca_file"]:
        os.environ["SSL_CERT_FILE"] = spec["ca_file"]  # the SDK's own pool trusts it
    secure, host = spec["endpoint"].split("://")
    client = Minio(host, access_key=spec["access_key"], secret_key=spec["secret_key"],
                   region=spec["region"], secure=secure == "https")  # fmt: skip
    bucket, key = spec["bucket"], spec["key"]

    def part(upload: str, number: int, offset: int, size: int) -> str:
        headers = {"Content-MD5": content_md5(fd, offset, size)} if spec.get("md5") else None
        data = os.pread(fd, size, offset)  # the SDK takes bytes only
        return str(client._upload_part(bucket, key, data, headers, upload, number))

    def run() -> None:
        upload = client._create_multipart_upload(bucket, key, {})
        etags = in_threads(functools.partial(part, upload), ranges, spec["threads"])
        parts = [Part(n, e) for n, e in enumerate(etags, 1)]
        client._complete_multipart_upload(bucket, key, upload, parts)

    return run


def in_threads(part: Callable[..., str], ranges: list[tuple[int, int]], threads: int) -> list[str]:
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(part, n, *r) for n, r in enumerate(ranges, 1)]
        return [f.result() for f in futures]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def memory_mb(field: str, pid: int | str = "self") -> float:
    """VmRSS (now) or VmHWM (peak) of a process. (Not ru_maxrss: Linux carries it over
    fork and exec, from the parent.)"""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker(spec: dict[str, Any]) -> dict[str, float]:
    uploader = boto3_uploader if spec["client"] == "boto3" else minio_uploader
    size, part = spec["size"], spec["part"]
    ranges = [(offset, min(part, size - offset)) for offset in range(0, size, part)]
    fd = os.open(spec["source"], os.O_RDONLY)
    upload = uploader(spec, fd, ranges)
    rss_before, cpu, start = memory_mb("VmRSS"), cpu_seconds(), time.perf_counter()
    upload()
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return {
        "MB/s": size / elapsed / 1e6,
        "cpu_s_per_GiB": cpu / (size / GiB),
        "rss_before_MB": rss_before,
        "peak_rss_MB": memory_mb("VmHWM"),
    }


# The parent: the cluster, the source file, the runs, the table.
def run_worker(spec: dict[str, Any]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout))


def expected_etag(path: str, size: int, part: int) -> str:
    """S3's ETag of a multipart object: MD5 of the parts' MD5s, dash, part count."""
    digests = []
    with open(path, "rb") as f:
        for _ in range(0, size, part):
            digests.append(hashlib.md5(f.read(part)).digest())
    return f'"{hashlib.md5(b"".join(digests)).hexdigest()}-{len(digests)}"'


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def series(
    ceph: Ceph, bucket: str, source: str, names: list[str], args: argparse.Namespace,
    size: int, endpoint: str,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each variant `args.runs` times; figures per variant."""
    etag = expected_etag(source, size, args.part_mib * MiB)
    found: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for run in range(args.runs):
        for name in names:  # alternately, so that the machine's load falls on all alike
            key = f"bench-{run}-{name.replace(' ', '-')}"
            spec = {**VARIANTS[name], "endpoint": endpoint, "bucket": bucket, "key": key,
                    "access_key": ceph.access_key, "secret_key": ceph.secret_key,
                    "region": ceph.region, "source": source, "size": size,
                    "part": args.part_mib * MiB, "threads": args.threads,
                    "ca_file": ceph.ca_file}  # fmt: skip
            server_cpu = sum(process_cpu(p) for p in ceph.pids().values())
            figures = run_worker(spec)
            server_cpu = sum(process_cpu(p) for p in ceph.pids().values()) - server_cpu
            figures["server_cpu_s_per_GiB"] = server_cpu / (size / GiB)
            head = ceph.client().head_object(Bucket=bucket, Key=key)
            if (head["ContentLength"], head["ETag"]) != (size, etag):
                raise SystemExit(f"{name}: stored {head['ContentLength']} {head['ETag']}")
            ceph.client().delete_object(Bucket=bucket, Key=key)
            found[name].append(figures)
    if ceph.multipart_uploads(bucket):
        raise SystemExit("multipart uploads left over")
    return {
        name: {k: summary([r[k] for r in results]) for k in results[0]}
        for name, results in found.items()
    }


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def import_seconds(client: str, endpoint: str, times: int = 5) -> dict[str, dict[str, float]]:
    """Import, then the first client object, in fresh processes."""
    make = {
        "boto3": f"boto3.client('s3', endpoint_url='{endpoint}', region_name='us-east-1', "
        "aws_access_key_id='a', aws_secret_access_key='b')",
        "minio": f"minio.Minio('{endpoint.split('://')[1]}', 'a', 'b', region='us-east-1')",
    }[client]
    code = (
        f"import time; t0 = time.perf_counter(); import {client}; t1 = time.perf_counter(); "
        f"{make}; print(t1 - t0, time.perf_counter() - t1)"
    )
    found = []
    for _ in range(times):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        found.append([float(x) for x in out.stdout.split()])
    return {
        "import_s": summary([f[0] for f in found]),
        "first_client_s": summary([f[1] for f in found]),
    }


def install_size(package: str) -> dict[str, Any]:
    """Bytes on disk of the distribution and of everything it requires (recursively)."""
    from packaging.requirements import Requirement

    seen: dict[str, int] = {}

    def walk(name: str) -> None:
        dist = metadata.distribution(name)
        key = dist.metadata["Name"].lower()
        if key in seen:
            return
        seen[key] = sum(f.size or _size(dist.locate_file(f)) for f in dist.files or [])
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                walk(requirement.name)

    walk(package)
    return {"own_MB": seen[package] / 1e6, "with_deps_MB": sum(seen.values()) / 1e6,
            "packages": sorted(seen)}  # fmt: skip


def _size(path: Any) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class SlowLink:
    """A TCP proxy on loopback to `port`: each direction delayed by `delay` seconds and
    capped at `rate` bytes per second, shared by all connections, with a buffer of
    about one bandwidth-delay product (then the sender waits, as on a real link)."""

    def __init__(self, port: int, delay: float, rate: float) -> None:
        self.target, self.delay, self.rate = port, delay, rate
        self.buffer = max(256 * 1024, int(rate * delay * 2))
        self.free_at = {"up": 0.0, "down": 0.0}
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(("127.0.0.1", self.target))
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pipe(client, server, "up")
            self._pipe(server, client, "down")

    def _pipe(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        line: queue.Queue[tuple[float, bytes]] = queue.Queue()
        room = threading.Semaphore(self.buffer // 65536)

        def receive() -> None:
            while True:
                room.acquire()
                try:
                    data = source.recv(65536)
                except OSError:
                    data = b""
                now = time.monotonic()
                with self.lock:
                    start = max(now, self.free_at[direction])
                    self.free_at[direction] = start + len(data) / self.rate
                    line.put((self.free_at[direction] + self.delay, data))
                if not data:
                    return

        def send() -> None:
            try:
                while True:
                    due, data = line.get()
                    time.sleep(max(0.0, due - time.monotonic()))
                    room.release()
                    if not data:
                        sink.shutdown(socket.SHUT_WR)
                        return
                    sink.sendall(data)
            except OSError:
                pass

        threading.Thread(target=receive, daemon=True).start()
        threading.Thread(target=send, daemon=True).start()


def cluster_memory(ceph: Ceph, field: str) -> dict[str, float]:
    return {name: memory_mb(field, pid) for name, pid in ceph.pids().items()}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))  # here, not in the workers: their memory is measured
    from tests.ceph import Ceph, missing_binaries

    if missing_binaries():
        raise SystemExit(f"Ceph is not installed (no {', '.join(missing_binaries())})")
    size = (64 if args.quick else args.size_mib) * MiB
    link_size = (32 if args.quick else args.link_size_mib) * MiB
    results: dict[str, Any] = {
        "size_MiB": size // MiB, "part_MiB": args.part_mib, "threads": args.threads,
        "link": f"{args.link_delay_ms:g} ms each way, {args.link_mbit:g} Mbit/s, "
                f"{link_size // MiB} MiB",
    }  # fmt: skip
    with tempfile.NamedTemporaryFile(prefix="incoming-bench-s3-") as source:
        for _ in range(0, max(size, link_size), 16 * MiB):
            source.write(os.urandom(16 * MiB))
        source.flush()
        for tls in (True, False):
            with Ceph(tls=tls) as ceph:
                if tls:
                    results["cluster idle MB"] = cluster_memory(ceph, "VmRSS")
                bucket = ceph.make_bucket()
                title = "HTTPS" if tls else "HTTP"
                results[title] = series(ceph, bucket, source.name, list(VARIANTS), args,
                                        size, ceph.endpoint)  # fmt: skip
                if not tls:
                    continue
                link = SlowLink(ceph.rgw_port, args.link_delay_ms / 1000, args.link_mbit * 1e6 / 8)
                results["HTTPS, slow link"] = series(
                    ceph,
                    bucket,
                    source.name,
                    list(LINK_VARIANTS),
                    args,
                    link_size,
                    f"https://127.0.0.1:{link.port}",
                )
                results["cluster peak MB"] = cluster_memory(ceph, "VmHWM")
                time.sleep(8)  # radosgw's garbage collection (every 5 s) frees deleted data
                results["cluster after gc MB"] = cluster_memory(ceph, "VmRSS")
                for client in ("boto3", "minio"):
                    results[f"{client} import"] = import_seconds(client, ceph.endpoint)
                    results[f"{client} install"] = install_size(client)
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"multipart upload of {results['size_MiB']} MiB in {results['part_MiB']} MiB parts, "
          f"{results['threads']} threads; medians (min-max) of the runs")  # fmt: skip
    header = f"{'client':<13}{'MB/s':>15}{'CPU s/GiB':>18}{'RSS before':>12}{'peak RSS':>10}"
    for title in ("HTTPS", "HTTP", "HTTPS, slow link"):
        print(f"\n{title}" + (f" ({results['link']})" if "slow" in title else ""))
        print(header + f"{'RGW+OSD CPU s/GiB':>19}")
        for name, f in results[title].items():
            print(f"{name:<13}{_spread(f['MB/s'], 0):>15}{_spread(f['cpu_s_per_GiB'], 2):>18}"
                  f"{f['rss_before_MB']['median']:>10.0f}MB{f['peak_rss_MB']['median']:>8.0f}MB"
                  f"{f['server_cpu_s_per_GiB']['median']:>19.2f}")  # fmt: skip
    print(f"\n{'client':<8}{'import s':>10}{'1st client s':>14}{'own MB':>9}{'+deps MB':>10}  "
          "packages")  # fmt: skip
    for client in ("boto3", "minio"):
        i, s = results[f"{client} import"], results[f"{client} install"]
        print(f"{client:<8}{i['import_s']['median']:>10.3f}{i['first_client_s']['median']:>14.3f}"
              f"{s['own_MB']:>9.1f}{s['with_deps_MB']:>10.1f}  "
              f"{' '.join(s['packages'])}")  # fmt: skip
    print()
    for moment in ("idle", "peak", "after gc"):
        rss = results[f"cluster {moment} MB"]
        print(f"cluster RSS, {moment}: " + ", ".join(f"{n} {v:.0f} MB" for n, v in rss.items()))


def _spread(figures: dict[str, float], digits: int) -> str:
    low, high = figures["min"], figures["max"]
    return f"{figures['median']:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--part-mib", type=int, default=16)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--link-delay-ms", type=float, default=20)
    parser.add_argument("--link-mbit", type=float, default=200)
    parser.add_argument("--link-size-mib", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="smaller files, for a smoke run")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    results = measure(args)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
