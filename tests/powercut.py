"""Power cuts for tests: a directory on `tests/powercut_fs.py`, cut and mounted again on
demand, always unmounted at the end (the ``powercut_dir`` fixture in conftest)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor

from .harness import Daemon

FILE_SYSTEM = Path(__file__).with_name("powercut_fs.py")
STOP_TIMEOUT = 10  # seconds for the file system to unmount and revert before SIGKILL


def unavailable() -> str | None:
    """Why power-cut tests cannot run here, if they cannot."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse: the power-cut file system needs FUSE"
    if os.geteuid() != 0:
        return "the power-cut file system mounts FUSE, which these tests do as root only"
    return None


def mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == os.path.realpath(path) for line in mounts)


class PowerCutDir:
    """A directory whose un-synced writes, creations, renames and unlinks a power cut loses.

    Work under `path` (the mount). `await power_cut()` loses everything not fsynced and mounts
    again on what survived; kill the processes writing here first (SIGKILL waits out their
    requests in flight, so none lands after the cut); files they or the test left open
    are cut off (ENOTCONN). `backing` is the directory underneath; after
    `power_cut(remount=False)` a program may also restart directly on it.
    """

    def __init__(self, base: Path) -> None:
        self.backing = base / "disk"
        self.path = base / "mnt"
        self.backing.mkdir(parents=True)
        self.path.mkdir()
        self.cuts: list[str] = []  # the file system's report of each cut
        self._daemon: Daemon | None = None
        self._process: Any = None

    async def mount(self) -> None:
        assert self._daemon is None, "already mounted"
        daemon = Daemon(ready=rb"powercut-fs mounted\n")
        command = [sys.executable, str(FILE_SYSTEM), str(self.backing), str(self.path)]
        self._process = reactor.spawnProcess(  # type: ignore[attr-defined]
            daemon, command[0], command, env=dict(os.environ)
        )
        self._daemon = daemon
        try:
            await daemon.listening
        except Exception:  # it exited before mounting: nothing to stop
            self._daemon = self._process = None
            raise

    async def power_cut(self, remount: bool = True) -> None:
        """Loses everything not fsynced (see `powercut_fs`), then mounts again."""
        daemon = await self._stop()
        report = daemon.output.decode(errors="replace")
        assert "powercut-fs cut: " in report, report
        self.cuts.append(report.rsplit("powercut-fs cut: ", 1)[1].strip())
        if remount:
            await self.mount()

    async def close(self) -> None:
        """Unmounts whatever state the test left, by SIGKILL and a lazy unmount if need be."""
        try:
            if self._daemon is not None:
                await self._stop()
        finally:
            if mounted(self.path):  # the file system died without unmounting
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=True)

    async def _stop(self) -> Daemon:
        daemon, process = self._daemon, self._process
        assert daemon is not None, "not mounted"
        self._daemon = self._process = None
        if process.pid is not None:
            process.signalProcess(signal.SIGTERM)

        def kill() -> None:
            if process.pid is not None:
                process.signalProcess(signal.SIGKILL)

        timeout = reactor.callLater(STOP_TIMEOUT, kill)  # type: ignore[attr-defined]
        status = await daemon.ended
        if timeout.active():
            timeout.cancel()
        assert status == (0, None), daemon.output.decode(errors="replace")
        return daemon
