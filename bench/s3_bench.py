#!/usr/bin/env python3
"""Object storage: ours against @tus/server with @tus/s3-store, same client, same store.

A throwaway Ceph RGW of its own (tests/ceph.py: monitor, in-memory OSD, radosgw on a
free loopback port). The same client (`tests/tus_client.mjs`: tus-js-client under
Node) uploads 256 MiB in 8 MiB PATCHes to each server in turn, each storing into the
same RGW in 16 MiB parts:
- @tus/server + @tus/s3-store (`bench/tus_s3_server.mjs`): spools each part to a
  temporary file, sends it, and keeps an `.info` object per upload; no checksum of
  the file, nothing fsynced;
- ours (`twistd incoming --storage s3://...`): acknowledges bytes once fsynced in the
  spool, sends parts in the background (their SHA-256 signed, which the store checks),
  keeps the file's SHA-256 for the handover, completes the object before it;
- ours with `--checksum none`: the same without the file's SHA-256;
- ours to its local disk (no `--storage`): what the store costs.
Each server is a fresh process; their runs alternate (a drift of the machine's speed
meets all alike), each after os.sync(). For each: the client's MB/s (first request to
last answer), the server process's CPU seconds per GiB (utime + stime: for Node the
`node` process, libuv's threads included; for ours twistd, every thread), its peak
RSS (VmHWM), and RGW's CPU seconds per GiB (its three processes) beside. The first
run of each checks the object's bytes (SHA-256 read back).

Then the store across a delayed, rate-limited link (bench/linkem.py between the
servers and RGW; `--link-rtt-ms`, `--link-mbit`), and what reading an object back to
hash it costs ours (after a restart or on another instance, where the hash kept while
writing is lost): MB/s and CPU seconds per GiB.

    python bench/s3_bench.py [--runs 3] [--quick] [--node-modules DIR] [--json out.json]

`--node-modules` names a node_modules holding @tus/s3-store when the repository's does
not (yet): the server script is copied next to it for the run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from linkem import LinkProcess  # noqa: E402
from tus_bench import (  # noqa: E402
    CLIENT,
    NODE,
    cpu_seconds,
    peak_rss_mb,
    random_file,
    start_tus_node,
)
from upload_bench import Daemon, http_post, sha256_file, start_backend, summary  # noqa: E402

from tests.ceph import Ceph  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = ROOT / "bench" / "tus_s3_server.mjs"
CHUNK = 8 * MiB  # per PATCH
PART = 16 * MiB  # both servers' part size (ours: its default)


class Ours:
    """`twistd -n incoming --storage s3://BUCKET/ours/`, its defaults otherwise."""

    name = "incoming -> RGW"
    options: list[str] = []
    to_store = True

    def __init__(self, store: Store) -> None:
        self.store = store
        storage = ["--storage", f"s3://{store.bucket}/ours/", "--s3-endpoint", store.endpoint]
        self.daemon = Daemon([*(storage if self.to_store else []), *self.options])
        self.pid = self.daemon.process.pid
        self.endpoint = f"http://127.0.0.1:{self.daemon.port}/incoming/tus/"

    def metadata(self, name: str) -> dict[str, str]:
        form = {"signalFinishURL": self.store.backend_url, "removeFileWhenFinished": "false"}
        ticket = http_post(self.daemon.port, "/incoming/backend/new_upload", form)
        return {"ticket": ticket, "filename": name}

    def take(self, url: str, source: Path, verify: bool) -> None:
        """Check what was stored, and remove it."""
        ticket = url.rsplit("/", 1)[1]
        if not self.to_store:
            path = Path(self.daemon.dir.name) / ticket
            if path.stat().st_size != source.stat().st_size:
                raise RuntimeError(f"{self.name}: {path} has the wrong size")
            if verify and sha256_file(path) != sha256_file(source):
                raise RuntimeError(f"{self.name}: {path} differs from {source}")
            path.unlink()
            return
        self.store.take(f"ours/{ticket}", source, verify, self.name)

    def stop(self) -> None:
        self.daemon.stop()


class OursWithoutDigest(Ours):
    name = "incoming -> RGW, --checksum none"
    options = ["--checksum", "none"]


class OursToDisk(Ours):
    name = "incoming -> local disk"
    to_store = False


class TusS3:
    """`node bench/tus_s3_server.mjs`: @tus/server with @tus/s3-store on the bucket."""

    name = "@tus/server + @tus/s3-store"

    def __init__(self, store: Store) -> None:
        self.store = store
        self.process, self.endpoint = start_tus_node(
            [NODE, str(store.server_script), "0", store.endpoint, store.bucket, str(PART)]
        )
        self.pid = self.process.pid

    def metadata(self, name: str) -> dict[str, str]:
        return {"filename": name}

    def take(self, url: str, source: Path, verify: bool) -> None:
        key = url.rsplit("/", 1)[1]
        self.store.take(key, source, verify, self.name)
        self.store.ceph.client().delete_object(Bucket=self.store.bucket, Key=f"{key}.info")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=20)


Server = Ours | TusS3


class Store:
    """The RGW the servers write to (`endpoint`: directly, or through a link)."""

    def __init__(self, ceph: Ceph, endpoint: str, backend_url: str, server_script: Path) -> None:
        self.ceph = ceph
        self.bucket = ceph.make_bucket()
        self.endpoint = endpoint
        self.backend_url = backend_url
        self.server_script = server_script

    def take(self, key: str, source: Path, verify: bool, who: str) -> None:
        s3 = self.ceph.client()
        size = s3.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        if size != source.stat().st_size:
            raise RuntimeError(f"{who}: {key} has {size} bytes, not {source.stat().st_size}")
        if verify and object_sha256(self.ceph, self.bucket, key) != sha256_file(source):
            raise RuntimeError(f"{who}: {key} differs from {source}")
        s3.delete_object(Bucket=self.bucket, Key=key)
        if self.ceph.multipart_uploads(self.bucket):
            raise RuntimeError(f"{who}: multipart uploads left over")

    def rgw_cpu(self) -> float:
        return sum(process_cpu(pid) for pid in self.ceph.pids().values())


def object_sha256(ceph: Ceph, bucket: str, key: str) -> str:
    body = ceph.client().get_object(Bucket=bucket, Key=key)["Body"]
    digest = hashlib.sha256()
    while block := body.read(MiB):
        digest.update(block)
    return digest.hexdigest()


def process_cpu(pid: int) -> float:
    user, system = cpu_seconds(pid)
    return user + system


def upload(server: Server, store: Store, source: Path, verify: bool) -> dict[str, float]:
    """tus-js-client uploads `source` in 8 MiB PATCHes; the figures of the run."""
    uploads = [{"file": str(source), "metadata": server.metadata(source.name)}]
    options = {"endpoint": server.endpoint, "uploads": uploads, "chunkSize": CHUNK}
    os.sync()
    cpu, rgw = process_cpu(server.pid), store.rgw_cpu()
    run = subprocess.run(
        [NODE, str(CLIENT), json.dumps(options)], capture_output=True, check=True, cwd=ROOT
    )
    cpu, rgw = process_cpu(server.pid) - cpu, store.rgw_cpu() - rgw
    events = [json.loads(line) for line in run.stdout.splitlines()]
    end = events[-1]
    if end["event"] != "end" or not end["ok"]:
        raise RuntimeError(f"{server.name}: {events}")
    [success] = [e for e in events if e["event"] == "success"]
    server.take(success["url"], source, verify)
    gib = source.stat().st_size / GiB
    return {
        "MB/s": source.stat().st_size / (end["ms"] / 1000) / 1e6,
        "cpu_s_per_GiB": cpu / gib,
        "rgw_cpu_s_per_GiB": rgw / gib,
    }


def series(
    kinds: list[type[Ours] | type[TusS3]], store: Store, source: Path, runs: int
) -> dict[str, dict[str, Any]]:
    servers = [kind(store) for kind in kinds]
    found: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
    try:
        for run in range(runs):
            for server in servers:
                found[server.name].append(upload(server, store, source, verify=run == 0))
        return {
            server.name: {
                **{k: summary([r[k] for r in found[server.name]]) for k in found[server.name][0]},
                "peak_rss_MB": peak_rss_mb(server.pid),
            }
            for server in servers
        }
    finally:
        for server in servers:
            server.stop()


def read_back(ceph: Ceph, bucket: str, source: Path, endpoint: str) -> dict[str, float]:
    """What ours pays to hash an object it did not see whole: `ObjectStore.sha256`."""
    from twisted.internet import reactor
    from twisted.python.threadpool import ThreadPool

    from incoming.objectstore import Location, ObjectStore, make_client

    ceph.client().upload_file(str(source), bucket, "read-back")
    store = ObjectStore(Location(bucket), reactor, ThreadPool(), make_client(endpoint), endpoint)
    usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    digest, size = store._sha256("read-back")
    elapsed, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime
    if digest != sha256_file(source):
        raise RuntimeError("read back: wrong SHA-256")
    ceph.client().delete_object(Bucket=bucket, Key="read-back")
    return {"MB/s": size / elapsed / 1e6, "cpu_s_per_GiB": cpu / (size / GiB)}


def measure(args: argparse.Namespace, server_script: Path) -> dict[str, Any]:
    backend, backend_url = start_backend()
    size = 256 * MiB // (8 if args.quick else 1)
    results: dict[str, Any] = {"size_MiB": size // MiB, "runs": args.runs}
    kinds: list[type[Ours] | type[TusS3]] = [TusS3, Ours, OursWithoutDigest, OursToDisk]
    with tempfile.TemporaryDirectory(prefix="s3-bench-") as scratch, Ceph() as ceph:
        os.environ.update(AWS_ACCESS_KEY_ID=ceph.access_key, AWS_SECRET_ACCESS_KEY=ceph.secret_key)
        source = random_file(Path(scratch) / "file.bin", size)
        store = Store(ceph, ceph.endpoint, backend_url, server_script)
        results["loopback"] = series(kinds, store, source, args.runs)
        if args.link_rtt_ms > 0:
            link = LinkProcess([("127.0.0.1", ceph.rgw_port)], args.link_rtt_ms, args.link_mbit)
            try:
                linked = Store(
                    ceph, f"http://127.0.0.1:{link.ports[0]}", backend_url, server_script
                )
                results["link"] = series(kinds[:2], linked, source, args.runs)
            finally:
                link.stop()
        results["read_back"] = read_back(ceph, store.bucket, source, ceph.endpoint)
    backend.shutdown()
    return results


def print_table(results: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"tus-js-client under Node, {results['size_MiB']} MiB in 8 MiB PATCHes, 16 MiB parts,")
    print(f"one Ceph RGW (in-memory OSD); median (min-max) of {results['runs']} runs")
    header = f"{'server':<40}{'MB/s':>18}{'CPU s/GiB':>20}{'peak RSS MB':>13}{'RGW CPU s/GiB':>15}"
    places = [("loopback", "the store on loopback")]
    if "link" in results:
        places.append(
            ("link", f"the store across {args.link_rtt_ms:g} ms, {args.link_mbit:g} Mbit/s")
        )
    for place, title in places:
        print(f"\n{title}\n{header}")
        for name, value in results[place].items():
            print(f"{name:<40}{_spread(value['MB/s'], 0):>18}"
                  f"{_spread(value['cpu_s_per_GiB'], 2):>20}{value['peak_rss_MB']:>13.0f}"
                  f"{value['rgw_cpu_s_per_GiB']['median']:>15.2f}")  # fmt: skip
        theirs = results[place]["@tus/server + @tus/s3-store"]
        ours = results[place]["incoming -> RGW"]
        ratio = ours["MB/s"]["median"] / theirs["MB/s"]["median"]
        cpu = ours["cpu_s_per_GiB"]["median"] / theirs["cpu_s_per_GiB"]["median"]
        print(f"ours (SHA-256 included) / theirs: MB/s x{ratio:.2f} (goal >= 1.2), "
              f"CPU per GiB x{cpu:.2f} (goal <= 1)")  # fmt: skip
    back = results["read_back"]
    print(f"\nreading an object back to hash it: {back['MB/s']:.0f} MB/s, "
          f"{back['cpu_s_per_GiB']:.2f} CPU s/GiB")  # fmt: skip


def _spread(figures: dict[str, float], digits: int) -> str:
    median, low, high = (f"{figures[k]:.{digits}f}" for k in ("median", "min", "max"))
    return f"{median} ({low}-{high})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="32 MiB, one run, no link")
    parser.add_argument("--link-rtt-ms", type=float, default=20.0, help="0: no link run")
    parser.add_argument("--link-mbit", type=float, default=1000.0)
    parser.add_argument("--node-modules", type=Path, default=ROOT / "node_modules")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.link_rtt_ms = 1, 0.0
    if not (args.node_modules / "@tus" / "s3-store").is_dir():
        raise SystemExit(f"@tus/s3-store is not in {args.node_modules}: npm ci, or --node-modules")
    started = time.perf_counter()
    script = args.node_modules.resolve().parent / f".s3-bench-{os.getpid()}.mjs"
    shutil.copyfile(SERVER_SCRIPT, script)  # beside the node_modules it imports from
    try:
        results = measure(args, script)
    finally:
        script.unlink()
    print_table(results, args)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
