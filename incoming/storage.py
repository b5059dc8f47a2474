"""Upload files on disk. Every disk call runs in a thread pool, in order per upload.

A file is `<StorageDir>/<ticket>.part` while bytes arrive and `<StorageDir>/<ticket>`
once complete and fsynced; `<StorageDir>/<ticket>.json` holds the upload's state,
replaced atomically, so a restarted server carries on. Names come from the
server's own ticket ids only.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from .journal import TicketJournal

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview
Record = dict[str, object]
log = Logger()


@dataclass(frozen=True)
class Saved:
    """An upload as a restart finds it."""

    record: Record
    stored: int  # bytes in its file
    present: bool  # whether it has a file at all
    modified: float | None  # when its file was last written


class Storage:
    """Writes, completes and removes upload files under one directory."""

    def __init__(self, root: Path, reactor: IReactorFromThreads, pool: ThreadPool) -> None:
        self.root = root.absolute()
        self._reactor = reactor
        self._pool = pool
        self._locks: dict[str, DeferredLock] = {}
        self._fds: dict[str, int] = {}  # touched only by the thread running that upload's call
        self.journal = TicketJournal(self.root / "tickets.journal", reactor, pool)

    def prepare(self) -> None:
        """Create the storage directory (at start-up, before the reactor runs)."""
        self.root.mkdir(parents=True, exist_ok=True)

    def part_path(self, upload_id: str) -> Path:
        return self.root / f"{_checked(upload_id)}.part"

    def final_path(self, upload_id: str) -> Path:
        return self.root / _checked(upload_id)

    def state_path(self, upload_id: str) -> Path:
        return self.root / f"{_checked(upload_id)}.json"

    def load(self) -> list[Saved]:
        """Every saved upload with what its file says (at start-up, before the reactor)."""
        for stray in self.root.glob("*.json.tmp"):
            stray.unlink(missing_ok=True)
        records = self.journal.load()
        for path in sorted(self.root.glob("*.json")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                upload_id = str(record["id"])
                if path != self.state_path(upload_id):
                    raise ValueError("file name does not match its id")
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("ignoring unreadable upload state {path}: {e}", path=path, e=e)
                continue
            records[upload_id] = record
            self.journal.superseded(upload_id)
        found = []
        for upload_id, record in records.items():
            try:
                _checked(upload_id)
            except ValueError:
                log.error("ignoring a record with a bad id {id!r}", id=upload_id)
                continue
            part, final = self.part_path(upload_id), self.final_path(upload_id)
            on_disk = part if part.exists() else final
            stat = on_disk.stat() if on_disk.exists() else None
            found.append(
                Saved(record, stat.st_size if stat else 0, stat is not None, stat and stat.st_mtime)
            )
        return found

    def _run(self, upload_id: str, call: Callable[..., T], *args: object) -> Deferred[T]:
        """Run `call(*args)` in the pool after every earlier call for this upload."""
        lock = self._locks.setdefault(upload_id, DeferredLock())
        return lock.run(deferToThreadPool, self._reactor, self._pool, call, *args)

    def write(self, upload_id: str, offset: int, data: Buffer) -> Deferred[None]:
        return self._run(upload_id, self._write, upload_id, offset, data)

    def drain(self, upload_id: str) -> Deferred[None]:
        """Fires once every call queued so far for this upload has finished."""
        return self._run(upload_id, _nothing)

    def complete(self, upload_id: str) -> Deferred[Path]:
        """Make the file durable and give it its final name; returns that path."""
        return self._run(upload_id, self._complete, upload_id)

    def remove(self, upload_id: str) -> Deferred[None]:
        """Delete the upload's file, partial or complete, after queued writes."""
        return self._run(upload_id, self._remove, upload_id)

    def record_ticket(self, upload_id: str, record: Record) -> Deferred[None]:
        """Save a new ticket's first record (in the journal; see `journal`)."""
        return self.journal.append(upload_id, record)

    def save_state(self, upload_id: str, record: Record, sync: bool = False) -> Deferred[None]:
        """Replace the upload's state record atomically; `sync` also makes it durable."""
        d = self._run(upload_id, self._save_state, upload_id, record, sync)

        def saved(_: None) -> None:
            self.journal.superseded(upload_id)

        return d.addCallback(saved)

    async def discard(self, upload_id: str) -> None:
        """Delete everything stored for an upload that is being forgotten."""
        await self.journal.forget(upload_id)  # first: a crash must not bring back the ticket
        await self._run(upload_id, self._discard, upload_id)

    def forget(self, upload_id: str) -> None:
        """Drop bookkeeping for an upload that will see no more calls."""
        lock = self._locks.get(upload_id)
        if lock is not None and not lock.locked and not lock.waiting:
            del self._locks[upload_id]

    def free_bytes(self) -> int:
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize

    # The methods below run in pool threads.

    def _fd(self, upload_id: str) -> int:
        fd = self._fds.get(upload_id)
        if fd is None:
            fd = os.open(self.part_path(upload_id), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._fds[upload_id] = fd
        return fd

    def _close(self, upload_id: str) -> None:
        fd = self._fds.pop(upload_id, None)
        if fd is not None:
            os.close(fd)

    def _write(self, upload_id: str, offset: int, data: Buffer) -> None:
        fd = self._fd(upload_id)
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(fd, view, offset)
            offset += written
            view = view[written:]

    def _complete(self, upload_id: str) -> Path:
        final = self.final_path(upload_id)
        if final.exists() and not self.part_path(upload_id).exists():
            return final  # completed before a restart
        fd = self._fd(upload_id)  # a zero-byte upload had no write that opened it
        try:
            os.fsync(fd)
        finally:
            self._close(upload_id)
        os.replace(self.part_path(upload_id), final)
        _fsync_dir(self.root)
        return final

    def _remove(self, upload_id: str) -> None:
        self._close(upload_id)
        for path in (self.part_path(upload_id), self.final_path(upload_id)):
            path.unlink(missing_ok=True)

    def _save_state(self, upload_id: str, record: Record, sync: bool) -> None:
        path = self.state_path(upload_id)
        temporary = path.with_name(path.name + ".tmp")
        data = json.dumps(record).encode("utf-8")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        if sync:
            _fsync_dir(self.root)

    def _discard(self, upload_id: str) -> None:
        self._remove(upload_id)
        self.state_path(upload_id).unlink(missing_ok=True)


def _nothing() -> None:
    return None


def _checked(upload_id: str) -> str:
    """Refuse anything but a canonical UUID as a file name."""
    if str(uuid.UUID(upload_id)) != upload_id:
        raise ValueError(f"not a canonical ticket id: {upload_id!r}")
    return upload_id


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
