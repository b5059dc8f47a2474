#!/usr/bin/env python3
"""Cluster mode against one process: tickets per second and one WebSocket upload.

In the same run, alternately, starts `twistd -n incoming` as one process (state in its
storage directory) and in cluster mode (`--redis`, with a redis-server of its own on a
free loopback port, its data in a temporary directory), each fresh with a temporary
storage directory, and measures
- ticket creations per second, over many concurrent keep-alive connections (the epoll
  client of upload_bench.py);
- one WebSocket upload (256 MiB): MB/s, and the server's CPU-seconds per GiB (utime +
  stime of the twistd process, from /proc), and Redis's;
and prints median, min and max of the runs. The upload path in cluster mode should be
at least 0.9 times as fast as one process (no Redis round trip per chunk).

    python bench/cluster_bench.py [--runs 3] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from upload_bench import (
    Daemon,
    MiB,
    free_port,
    start_backend,
    summary,
    ticket_rate,
    timed_uploads,
)

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
TARGET = 0.9  # cluster upload MB/s over one process's, at least


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RedisServer:
    """redis-server on a free loopback port, its data in a temporary directory: AOF,
    fsynced every second (Redis's advice for durability)."""

    def __init__(self) -> None:
        if not os.access(REDIS, os.X_OK):
            raise SystemExit(f"{REDIS} not found: install redis-server (make system-packages)")
        self.dir = tempfile.TemporaryDirectory(prefix="incoming-bench-redis-")
        self.port = free_port()
        self.process = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir.name,
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
             "--daemonize", "no", "--logfile", ""],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self._pong():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)
        self.dir.cleanup()


def one_run(
    mode: str, backend_url: str, args: argparse.Namespace, figures: dict[str, list[float]]
) -> None:
    """A fresh server (and Redis) of `mode`: the upload, then the tickets."""
    chunk = args.chunk_kb * 1024
    extra = ["--chunk-size-kb", str(args.chunk_kb), "--send-ahead", str(args.send_ahead)]
    redis = RedisServer() if mode == "cluster" else None
    daemon = Daemon([*extra, "--redis", redis.url] if redis else extra)
    try:

        def cpu() -> tuple[float, float]:
            return daemon.cpu_seconds(), redis.cpu_seconds() if redis else 0.0

        size = args.size_mib * MiB
        (server, store) = cpu()
        elapsed = timed_uploads(daemon, backend_url, [size], chunk)
        (server_after, store_after) = cpu()
        gib = size / (1024 * MiB)
        figures["upload MB/s"].append(size / elapsed / 1e6)
        figures["upload server CPU s/GiB"].append((server_after - server) / gib)
        if redis:
            figures["upload Redis CPU s/GiB"].append((store_after - store) / gib)

        (server, store) = cpu()
        figures["tickets/s"].append(ticket_rate(daemon, backend_url, args.tickets))
        (server_after, store_after) = cpu()
        figures["ticket server CPU ms"].append((server_after - server) / args.tickets * 1000)
        if redis:
            figures["ticket Redis CPU ms"].append((store_after - store) / args.tickets * 1000)
    finally:
        daemon.stop()
        if redis:
            redis.stop()


ROWS = (
    "tickets/s",
    "ticket server CPU ms",
    "ticket Redis CPU ms",
    "upload MB/s",
    "upload server CPU s/GiB",
    "upload Redis CPU s/GiB",
)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    backend, backend_url = start_backend()
    raw: dict[str, dict[str, list[float]]] = {
        mode: {row: [] for row in ROWS} for mode in ("single", "cluster")
    }
    try:
        for run in range(args.runs):
            for mode in ("single", "cluster"):
                one_run(mode, backend_url, args, raw[mode])
                print(f"run {run + 1}/{args.runs} {mode} done", file=sys.stderr)
    finally:
        backend.shutdown()
    results: dict[str, Any] = {
        "chunk_kb": args.chunk_kb,
        "send_ahead": args.send_ahead,
        "upload_MiB": args.size_mib,
        "tickets": args.tickets,
        "runs": args.runs,
    }
    for mode, rows in raw.items():
        results[mode] = {
            row: summary(values) | {"all": values} for row, values in rows.items() if values
        }
    single, cluster = results["single"]["upload MB/s"], results["cluster"]["upload MB/s"]
    results["upload_ratio"] = cluster["median"] / single["median"]
    return results


def print_table(results: dict[str, Any]) -> None:
    print(
        f"chunk {results['chunk_kb']} KiB, send-ahead {results['send_ahead']}, "
        f"one {results['upload_MiB']} MiB WebSocket upload and {results['tickets']} tickets "
        f"per run; median, min, max of {results['runs']} runs"
    )
    print(f"{'figure':<26}{'single':>24}{'cluster (--redis)':>27}{'cluster/single':>16}")
    for row in ROWS:
        single, cluster = results["single"].get(row), results["cluster"].get(row)
        if cluster is None:
            continue

        def cells(figures: dict[str, float] | None) -> str:
            if figures is None:
                return f"{'-':>24}"
            digits = 0 if figures["median"] >= 100 else 2
            return "".join(f"{figures[k]:>8.{digits}f}" for k in ("median", "min", "max"))

        ratio = f"{cluster['median'] / single['median']:>16.2f}" if single else ""
        print(f"{row:<26}{cells(single)}   {cells(cluster)}{ratio}")
    ratio = results["upload_ratio"]
    verdict = "met" if ratio >= TARGET else "MISSED"
    print(f"upload MB/s, cluster/single: {ratio:.2f} (target >= {TARGET}: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk-kb", type=int, default=512)
    parser.add_argument("--send-ahead", type=int, default=4)
    parser.add_argument("--size-mib", type=int, default=256, help="the upload's size [256]")
    parser.add_argument("--tickets", type=int, default=5000, help="tickets per run [5000]")
    parser.add_argument("--quick", action="store_true", help="64 MiB and 1000 tickets, 1 run")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.tickets, args.runs = 64, 1000, 1
    results = measure(args)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
