#!/usr/bin/env python3
"""tus-js-client under Node against @tus/server (with @tus/file-store) and against ours.

The same client (`tests/tus_client.mjs`, tus-js-client reading files with
fs.createReadStream) uploads to each server on loopback, each server storing in
its own temporary directory: 1 x 256 MiB and 8 x 64 MiB at once, each with 8 MiB
chunks and with the whole file in one PATCH (chunkSize Infinity). For each: the
client's MB/s (from its first request to its last answer), the server process's
CPU seconds per GiB (utime + stime from /proc/PID/stat; for Node the `node`
process serving @tus/server, libuv's threads included) and its peak RSS (VmHWM),
as median, min and max of several runs. Each series has fresh server processes,
whose runs alternate (a drift of the machine's speed meets both alike), each run
after os.sync() (none pays for the dirty pages of another). Ours runs twice: as
deployed (SHA-256 of every file, for the handover) and with `--checksum none`,
which does the same work as @tus/server. Then ours on one 1 GiB upload in one
PATCH, for its peak RSS. The disk's write speed (with fsync) and
loopback TCP's are measured first, as the limits.

Ours answers the final PATCH after its backend (a thread here) answered the
handover, having fsynced and renamed the file (the fsync's writeback is counted in
its CPU time); @tus/server does neither (the kernel writes its pages back later, in
threads of its own).

    python bench/tus_bench.py [--runs 3] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upload_bench import (  # noqa: E402
    Daemon,
    disk_write_mb_s,
    http_post,
    loopback_mb_s,
    sha256_file,
    start_backend,
    summary,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
ROOT = Path(__file__).resolve().parent.parent
NODE = shutil.which("node") or "node"
CLIENT = ROOT / "tests" / "tus_client.mjs"
TUS_SERVER = ROOT / "bench" / "tus_server.mjs"
CHUNK = 8 * MiB


def cpu_seconds(pid: int) -> tuple[float, float]:
    """The process's user and system CPU seconds so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


class Ours:
    """`twistd -n incoming` (its default chunk size and send-ahead), tickets from its API."""

    name = "incoming"
    options: list[str] = []

    def __init__(self, backend_url: str) -> None:
        self.daemon = Daemon(self.options)
        self.backend_url = backend_url
        self.pid = self.daemon.process.pid
        self.storage = Path(self.daemon.dir.name)
        self.endpoint = f"http://127.0.0.1:{self.daemon.port}/incoming/tus/"

    def metadata(self, name: str) -> dict[str, str]:
        form = {"signalFinishURL": self.backend_url, "removeFileWhenFinished": "false"}
        ticket = http_post(self.daemon.port, "/incoming/backend/new_upload", form)
        return {"ticket": ticket, "filename": name}

    def stored(self, url: str) -> Path:
        return self.storage / url.rsplit("/", 1)[1]

    def stop(self) -> None:
        self.daemon.stop()


class OursWithoutDigest(Ours):
    """Ours with `--checksum none`: like @tus/server, no SHA-256 of the file."""

    name = "incoming --checksum none"
    options = ["--checksum", "none"]


def start_tus_node(command: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    """A Node tus server (bench/tus_*server.mjs) and its endpoint, once it listens."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # the AWS SDK's notice about Node 20's support
        cwd=ROOT,
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line.startswith("listening on "):
        process.kill()
        raise RuntimeError(f"@tus/server did not start: {line!r}")
    return process, f"http://127.0.0.1:{int(line.split()[-1])}/files"


class TusNode:
    """`node bench/tus_server.mjs`: @tus/server with a FileStore in a temporary directory."""

    name = "@tus/server"

    def __init__(self, backend_url: str) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="tus-node-bench-")
        self.storage = Path(self.dir.name)
        self.process, self.endpoint = start_tus_node([NODE, str(TUS_SERVER), "0", self.dir.name])
        self.pid = self.process.pid

    def metadata(self, name: str) -> dict[str, str]:
        return {"filename": name}

    def stored(self, url: str) -> Path:
        return self.storage / url.rsplit("/", 1)[1]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=20)
        self.dir.cleanup()


Server = Ours | TusNode


def upload(
    server: Server, files: list[Path], chunk: int | None, verify: bool = False
) -> tuple[float, float, float]:
    """tus-js-client uploads `files` at once; returns MB/s and the server's user and system
    CPU seconds per GiB. Afterwards (untimed) checks each stored file's size, or with
    `verify` its bytes, and deletes it."""
    uploads = [{"file": str(f), "metadata": server.metadata(f.name)} for f in files]
    options = {"endpoint": server.endpoint, "uploads": uploads, "chunkSize": chunk}
    os.sync()  # every run starts without the dirty pages of the one before
    user, system = cpu_seconds(server.pid)
    run = subprocess.run(
        [NODE, str(CLIENT), json.dumps(options)], capture_output=True, check=True, cwd=ROOT
    )
    user_after, system_after = cpu_seconds(server.pid)
    events = [json.loads(line) for line in run.stdout.splitlines()]
    end = events[-1]
    if end["event"] != "end" or not end["ok"]:
        raise RuntimeError(f"{server.name}: {events}")
    for event in events:
        if event["event"] == "success":
            stored, source = server.stored(event["url"]), files[event["upload"]]
            if stored.stat().st_size != source.stat().st_size:
                raise RuntimeError(f"{server.name}: {stored} has the wrong size")
            if verify and sha256_file(stored) != sha256_file(source):
                raise RuntimeError(f"{server.name}: {stored} differs from {source}")
            stored.unlink()
    total = sum(f.stat().st_size for f in files)
    gib = total / GiB
    return (
        total / (end["ms"] / 1000) / 1e6,
        (user_after - user) / gib,
        (system_after - system) / gib,
    )


def random_file(path: Path, size: int) -> Path:
    block = os.urandom(4 * MiB)
    with path.open("wb") as f:
        for _ in range(size // len(block)):
            f.write(block[:-1] + os.urandom(1))  # no two blocks alike
    return path


def series(
    kinds: Sequence[type[Ours] | type[TusNode]], backend_url: str, files: list[Path],
    chunk: int | None, runs: int,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Fresh servers, one of each kind, their runs taken in turn (so that a drift of
    the machine's speed meets all alike); figures by server name."""
    servers = [kind(backend_url) for kind in kinds]
    figures: dict[str, list[tuple[float, float, float]]] = {s.name: [] for s in servers}
    try:
        for run in range(runs):
            for server in servers:
                figures[server.name].append(upload(server, files, chunk, verify=run == 0))
        results = {}
        for server in servers:
            rates, users, systems = zip(*figures[server.name], strict=True)
            results[server.name] = {
                "MB/s": summary(list(rates)),
                "cpu_s_per_GiB": summary([u + s for u, s in zip(users, systems, strict=True)]),
                "sys_s_per_GiB": summary(list(systems)),
                "peak_rss_MB": peak_rss_mb(server.pid),
            }
        return results
    finally:
        for server in servers:
            server.stop()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    backend, backend_url = start_backend()
    scale = 16 if args.quick else 1
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tus-bench-files-") as scratch:
        limit = 256 * MiB // scale
        results["limits"] = {
            "disk write + fsync MB/s": disk_write_mb_s(scratch, limit),
            "loopback TCP MB/s": loopback_mb_s(limit),
        }
        big = random_file(Path(scratch) / "big.bin", 256 * MiB // scale)
        one64 = random_file(Path(scratch) / "part.bin", 64 * MiB // scale)
        cases = {f"1x{256 // scale}MiB": [big], f"8x{64 // scale}MiB": [one64] * 8}
        for case, files in cases.items():
            for chunk_name, chunk in (("8MiB chunks", CHUNK), ("one PATCH", None)):
                servers: list[type[Ours] | type[TusNode]] = [TusNode, Ours, OursWithoutDigest]
                for name, figures in series(servers, backend_url, files, chunk, args.runs).items():
                    results[f"{case}, {chunk_name}, {name}"] = figures
        big.unlink()
        one64.unlink()
        huge = random_file(Path(scratch) / "huge.bin", GiB // scale)
        ours = [Ours, OursWithoutDigest]
        for name, figures in series(ours, backend_url, [huge], None, 1).items():
            results[f"1x{1024 // scale}MiB, one PATCH, {name}"] = figures
    backend.shutdown()
    return results


def print_table(results: dict[str, Any], runs: int) -> None:
    print(f"tus-js-client under Node, loopback; median (min-max) of {runs} runs")
    for name, value in results["limits"].items():
        print(f"  {name}: {value:.0f}")
    print(f"{'case, server':<50}{'MB/s':>18}{'CPU s/GiB':>20}{'of it sys':>10}{'peak RSS MB':>13}")
    for name, value in results.items():
        if name == "limits":
            continue
        rate, cpu, system = value["MB/s"], value["cpu_s_per_GiB"], value["sys_s_per_GiB"]
        print(f"{name:<50}{_spread(rate, 0):>18}{_spread(cpu, 2):>20}"
              f"{system['median']:>10.2f}{value['peak_rss_MB']:>13.0f}")  # fmt: skip
    print()
    print("targets (like for like: --checksum none): ours >= 1.2x @tus/server's MB/s,")
    print("no more CPU s/GiB, <= 1.5 CPU s/GiB")
    for name, value in results.items():
        case, _, server = name.rpartition(", ")
        if not server.startswith("incoming"):
            continue
        theirs = results.get(f"{case}, @tus/server")
        cpu = value["cpu_s_per_GiB"]["median"]
        line = f"{name:<50}"
        if theirs is not None:
            ratio = value["MB/s"]["median"] / theirs["MB/s"]["median"]
            cpu_ratio = cpu / theirs["cpu_s_per_GiB"]["median"]
            line += f" MB/s x{ratio:.2f} {_mark(ratio >= 1.2):<7}"
            line += f" CPU x{cpu_ratio:.2f} {_mark(cpu_ratio <= 1):<7}"
        else:
            line += " " * 34
        line += f" {cpu:.2f} CPU s/GiB {_mark(cpu <= 1.5)}"
        print(line)


def _spread(figures: dict[str, float], digits: int) -> str:
    median, low, high = (f"{figures[k]:.{digits}f}" for k in ("median", "min", "max"))
    return f"{median} ({low}-{high})"


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="files 16 times smaller, one run")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.runs = 1
    started = time.perf_counter()
    results = measure(args)
    print_table(results, args.runs)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
