#!/usr/bin/env python3
"""What `incoming.backend.move_file` costs a backend, per GiB of upload.

One file (default 1 GiB) stands in StorageDir as the server leaves it (written and
fsynced); the backend takes it: renamed within the file system with the SHA-256
checked (`verify=True`, the default: one read of the file), renamed trusting the
server's digest (`verify=False`: no read), copied (`copy=True`, for an app that may
only read StorageDir: one read and one write, fsynced), and copied from another file
system (/dev/shm, a tmpfs, when it is one). Each: wall seconds and MB/s (median, min
and max of several runs), after os.sync() and with the file's pages dropped from the
page cache (posix_fadvise DONTNEED), so reads come from the disk where they would.

    python bench/move_file_bench.py [--size-mib 1024] [--runs 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from incoming.backend import Handover, move_file  # noqa: E402

TICKET = "0b4d3f52-5a55-4a8e-9f5e-1b2c3d4e5f60"


def stored_file(storage: Path, size: int) -> Handover:
    """`StorageDir/<ticket>`, written and fsynced, out of the page cache; its handover."""
    path = storage / TICKET
    digest = hashlib.sha256()
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(size >> 20):
            f.write(block)
            digest.update(block)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    os.sync()
    return Handover(TICKET, str(path), "video.mp4", "", False, "", size, digest.hexdigest())


def measure(storage: Path, target: Path, size: int, runs: int, **options: bool) -> list[float]:
    seconds = []
    for _ in range(runs):
        handover = stored_file(storage, size)
        started = time.perf_counter()
        stored = move_file(handover, target, **options)
        seconds.append(time.perf_counter() - started)
        assert stored.sha256 == handover.sha256 and stored.size == size
        stored.path.unlink()
        Path(handover.filename).unlink(missing_ok=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="on the disk to measure")
    args = parser.parse_args()
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        storage, target = Path(work) / "storage", Path(work) / "files"
        storage.mkdir()
        cases: list[tuple[str, Path, dict[str, bool]]] = [
            ("rename, SHA-256 checked", storage, {}),
            ("rename, verify=False", storage, {"verify": False}),
            ("copy=True", storage, {"copy": True}),
        ]
        shm = Path("/dev/shm")
        if shm.is_dir() and shm.stat().st_dev != storage.stat().st_dev:
            cases.append(("from a tmpfs (copy)", Path(tempfile.mkdtemp(dir=shm)), {}))
        print(f"move_file of {args.size_mib} MiB, {args.runs} runs: median (min-max)")
        for label, source_dir, options in cases:
            seconds = measure(source_dir, target, size, args.runs, **options)
            rates = [size / s / 1e6 for s in seconds]
            print(
                f"  {label:26} {statistics.median(seconds):7.3f} s "
                f"({min(seconds):.3f}-{max(seconds):.3f})  "
                f"{statistics.median(rates):8.0f} MB/s ({min(rates):.0f}-{max(rates):.0f})"
            )
            if source_dir.parent == shm:
                source_dir.rmdir()


if __name__ == "__main__":
    main()
