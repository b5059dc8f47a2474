"""Entry point for `twistd incoming` (named by the plugin), and the process's tuning."""

from __future__ import annotations

import contextlib
import ctypes
import gc
from typing import Any

from twisted.application.service import IService
from twisted.internet import reactor as global_reactor

from .config import Options
from .service import StartupError, make_service

__all__ = ["Options", "makeService", "tune_process"]
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def makeService(options: Options) -> IService:
    """The daemon, or an exit with one line saying why it cannot start."""
    try:
        service = make_service(options.config)
    except StartupError as e:
        raise SystemExit(f"incoming: {e}") from None
    tune_process(global_reactor)
    return service


def tune_process(reactor: Any) -> None:
    """Settings for the whole process, measured with `make bench` and `make bench-tus`.

    - Once started, keep the start-up objects (modules, restored uploads) out of the
      garbage collector's full passes, which otherwise cost a ticket ~20 % more CPU
      once 20,000 tickets are open.
    - Serve the socket reads and chunks (up to a few MiB each) from glibc's heap
      instead of fresh mmaps, and keep up to 64 MiB of freed heap: otherwise every
      read's pages are faulted in anew (about 100,000 faults per GiB uploaded),
      which cost ~0.35 CPU-seconds per GiB.
    """
    reactor.callWhenRunning(gc.freeze)
    with contextlib.suppress(OSError, AttributeError):  # not glibc: leave malloc alone
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024)
