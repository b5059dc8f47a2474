"""Upload files on disk. Every disk call runs in a thread pool, in order per upload.

A file is `<StorageDir>/<ticket>.part` while bytes arrive and `<StorageDir>/<ticket>`
once complete and fsynced; `<StorageDir>/<ticket>.json` holds the upload's state,
replaced atomically, so a restarted server carries on. Names come from the
server's own ticket ids only. State files hold backend secrets: they are 0600,
data files 0640, and a storage directory the server creates is 0750 (0770 and the
group's with `--group`, whose members move handed-over files away).

With `sync` on (the default; README: Durability), whatever a caller is told is
saved survives a power cut: state files, tickets and finished files are fsynced
(and their directory) before their Deferred fires, and `synced` tells when an
upload's bytes are. Its syncs are grouped: one fdatasync at a time per upload,
beside its writes (not queued behind them), each covering every write that
landed before it began; callers that ask meanwhile share the next one.

An upload's file stays open only while a connection writes it, and at most
MAX_OPEN_FILES at once: abandoned uploads must not use up the process's fds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import (
    Deferred,
    DeferredLock,
    ensureDeferred,
    gatherResults,
    succeed,
)
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .files import (
    DATA_MODE,
    DIRECTORY_MODE,
    Chunk,
    Digest,
    Pieces,
    Spliced,
    copy_range,
    fsync_dir,
    has_hole,
    hash_range,
    make_dirs,
    pwrite_all,
    replace_file,
    share_directory,
)
from .journal import TicketJournal

T = TypeVar("T")
Record = dict[str, object]
log = Logger()
MAX_OPEN_FILES = 256
HASH_MARKS = 8  # copies of an upload's SHA-256 kept where its last writes began
FREE_SPACE_AGE = 5.0  # seconds a measure of the free space is used
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})  # a full disk or quota: the upload waits


def no_space(error: BaseException) -> bool:
    """Whether a storage error means a full disk (or quota), which freeing space cures."""
    return isinstance(error, OSError) and error.errno in NO_SPACE


@dataclass(frozen=True)
class Completed:
    """A file made final: its name for the handover (a path, or `s3://BUCKET/KEY`), the
    SHA-256 of its bytes (None: not computed), and fields the handover adds."""

    filename: str
    sha256: str | None
    fields: Mapping[str, str] = field(default_factory=dict)


class Vanished(Exception):
    """The complete file is not there any more: the backend took it (after answering a
    handover whose answer a crash kept us from saving)."""


@dataclass
class _Hashing:
    """An upload's SHA-256 so far: it covers the file's first `upto` bytes. It also keeps
    copies of itself where the last few writes began, so that voiding a request's bytes
    (a tus checksum that failed) does not mean hashing the whole file again."""

    digest: Any
    upto: int = 0
    marks: dict[int, Any] = field(default_factory=dict)  # offset -> the digest there

    def mark(self) -> None:
        self.marks[self.upto] = self.digest.copy()
        while len(self.marks) > HASH_MARKS:
            del self.marks[min(self.marks)]

    def cut(self, size: int) -> bool:
        """Go back to covering the first `size` bytes; False if no mark is there."""
        if size not in self.marks:
            return False
        self.digest, self.upto = self.marks[size], size
        self.marks = {at: d for at, d in self.marks.items() if at < size}
        return True


@dataclass
class _Durable:
    """How much of an upload's file is known durable, and its syncs (reactor thread)."""

    durable: int = 0  # bytes fdatasynced, by this process
    written: int = 0  # bytes known written: by writes that landed, or as a caller says
    running: bool = False  # a sync is under way
    waiting: list[tuple[int, Deferred[None]]] = field(default_factory=list)  # (upto, d)
    era: int = 0  # a cut makes what a sync under way found void
    named: bool = False  # its file's directory entry is durable


class DirectorySync:
    """fsyncs of one directory (new names, renames, removals made durable), grouped: one
    at a time, and a caller waits for the first that begins after it asked."""

    def __init__(
        self,
        path: Path,
        reactor: IReactorFromThreads,
        pool: ThreadPool,
        fsync: Callable[[Path], None] = fsync_dir,
    ) -> None:
        self.path = path
        self._reactor = reactor
        self._pool = pool
        self._fsync = fsync
        self._waiting: list[Deferred[None]] = []
        self._running = False

    def synced(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        self._next()
        return d

    def _next(self) -> None:
        if self._running or not self._waiting:
            return
        self._running = True
        covered, self._waiting = self._waiting, []
        work = deferToThreadPool(self._reactor, self._pool, self._fsync, self.path)

        def done(result: None | Failure) -> None:
            self._running = False
            for d in covered:
                d.errback(result) if isinstance(result, Failure) else d.callback(None)
            self._next()

        work.addBoth(done)


@dataclass(frozen=True)
class Saved:
    """An upload as a restart finds it."""

    record: Record
    stored: int  # bytes in its file
    present: bool  # whether it has a file at all
    modified: float | None  # when its partial file was last written (bytes still arriving)


class Storage(Protocol):
    """Upload files and saved state; every call for one upload runs after the earlier ones."""

    def load(self) -> list[Saved]: ...

    def saved(self) -> Deferred[list[Saved]]: ...

    def stored(self, upload_id: str) -> Deferred[tuple[int, bool]]: ...

    def read_state(self, upload_id: str) -> Deferred[Record | None]: ...

    def free_bytes(self) -> int: ...

    def record_ticket(self, upload_id: str, record: Record) -> Deferred[None]: ...

    def save_state(self, upload_id: str, record: Record) -> Deferred[None]: ...

    def write(
        self,
        upload_id: str,
        offset: int,
        data: Chunk,
        digests: tuple[Digest, ...] = (),
        hashed: bool = True,
    ) -> Deferred[None]: ...

    def synced(self, upload_id: str, upto: int) -> Deferred[None]: ...

    def firm(self, upload_id: str, upto: int, length: int | None) -> None: ...

    def truncate(self, upload_id: str, size: int) -> Deferred[None]: ...

    def release(self, upload_id: str) -> Deferred[None]: ...

    def drain(self, upload_id: str) -> Deferred[None]: ...

    def drain_all(self) -> Deferred[list[None]]: ...

    def complete(self, upload_id: str) -> Deferred[Completed]: ...

    def remove(self, upload_id: str) -> Deferred[None]: ...

    async def discard(self, upload_id: str) -> None: ...

    def forget(self, upload_id: str) -> None: ...

    # Cluster mode

    shared: bool  # whether other instances see its files and state files (a shared disk)
    splices: bool  # whether partial uploads can be copied into a ticket's file (tus concat)

    def take_up(self, upload_id: str) -> Deferred[tuple[int, bool]]: ...

    def let_go(self, upload_id: str, size: int) -> Deferred[None]: ...

    def leave(self, upload_id: str) -> None: ...


class DiskStorage:
    """Writes, completes and removes upload files under one directory."""

    shared = True  # cluster mode: every instance's StorageDir is the same (network) disk
    splices = True

    def __init__(
        self,
        root: Path,
        reactor: IReactorFromThreads,
        pool: ThreadPool,
        max_open_files: int = MAX_OPEN_FILES,
        sha256: bool = True,
        sync: bool = True,
        fdatasync: Callable[[int], None] = os.fdatasync,
        sync_pool: ThreadPool | None = None,
        group: int | None = None,
    ) -> None:
        self.root = root.absolute()
        self.group = group  # shares the directory with this group (`share_directory`)
        self.sync = sync  # make what callers are told is saved durable (fsync)
        self._fdatasync = fdatasync
        # fsyncs wait on the disk: in threads of their own, they leave the pool's threads
        # to writes (which would otherwise queue up, in memory, behind them).
        self._sync_pool = sync_pool or pool
        self._sha256 = sha256  # keep each upload's SHA-256 as its bytes are written
        self._hashing: dict[str, _Hashing] = {}  # touched only by that upload's calls
        self._durable: dict[str, _Durable] = {}  # reactor thread
        self._short: dict[str, int] = {}  # upload -> errno of a write that found no space
        self._free, self._free_measured = 0, 0.0
        self._reactor = reactor
        self._pool = pool
        self._locks: dict[str, DeferredLock] = {}
        self._fds: dict[str, int] = {}  # touched only by the thread running that upload's call
        self._open: OrderedDict[str, None] = OrderedDict()  # uploads that may hold an fd, LRU
        self._max_open_files = max_open_files
        self._directory = DirectorySync(self.root, reactor, self._sync_pool)
        self.journal = TicketJournal(
            self.root / "tickets.journal", reactor, pool, sync=sync, fdatasync=fdatasync
        )

    def prepare(self) -> None:
        """Create the storage directory, durably (at start-up, before the reactor runs)."""
        make_dirs(self.root, DIRECTORY_MODE, self.sync)
        if self.group is not None:
            share_directory(self.root, self.group)
        self._measure_free()

    def part_path(self, upload_id: str) -> Path:
        return self.root / f"{checked_id(upload_id)}.part"

    def final_path(self, upload_id: str) -> Path:
        return self.root / checked_id(upload_id)

    def state_path(self, upload_id: str) -> Path:
        return self.root / f"{checked_id(upload_id)}.json"

    def load(self, tidy: bool = True) -> list[Saved]:
        """Every saved upload with what its file says (at start-up, before the reactor:
        `tidy` also removes stray temporary files and compacts the journal)."""
        if tidy:
            for stray in self.root.glob("*.tmp"):  # a replacement cut short
                stray.unlink(missing_ok=True)
        records = self.journal.load(tidy)
        set_aside = False
        for path in sorted(self.root.glob("*.json")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                upload_id = str(record["id"])
                if path != self.state_path(upload_id):
                    raise ValueError("file name does not match its id")
            except (OSError, ValueError, KeyError, TypeError) as e:
                if tidy:
                    set_aside = self._set_aside(path, e) or set_aside
                continue
            records[upload_id] = record
            self.journal.superseded(upload_id)
        if set_aside and self.sync:
            fsync_dir(self.root)
        found = []
        for upload_id, record in records.items():
            try:
                checked_id(upload_id)
            except ValueError:
                log.error("ignoring a record with a bad id {id!r}", id=upload_id)
                continue
            part, final = self.part_path(upload_id), self.final_path(upload_id)
            partial = part.exists()
            on_disk = part if partial else final
            stat = on_disk.stat() if on_disk.exists() else None
            size = stat.st_size if stat else 0
            modified = stat.st_mtime if stat and partial else None
            found.append(Saved(record, size, stat is not None, modified))
        return found

    def _set_aside(self, path: Path, error: Exception) -> bool:
        """Rename an unreadable state file (written by a version that did not sync, or
        damaged) out of the way, for a person to look at; its data file stays."""
        when = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = path.with_name(f"{path.name}.unreadable-{when}")
        try:
            path.rename(aside)
        except OSError as e:
            log.error("unreadable upload state {path} ({e}) cannot be set aside: {why}",
                      path=path, e=error, why=e)  # fmt: skip
            return False
        log.error("unreadable upload state {path} ({e}) set aside as {aside}; its data "
                  "file, if any, is kept", path=path, e=error, aside=aside.name)  # fmt: skip
        return True

    def saved(self) -> Deferred[list[Saved]]:
        """Every upload saved in the directory, read in a thread while other instances
        may be writing it (so nothing is tidied)."""
        return deferToThreadPool(self._reactor, self._pool, self.load, False)

    def stored(self, upload_id: str) -> Deferred[tuple[int, bool]]:
        """The bytes in the upload's file (partial or complete), and whether it has one;
        after the writes queued for it."""
        return self._after_queued(upload_id, self._stored, upload_id)

    def read_state(self, upload_id: str) -> Deferred[Record | None]:
        """The upload's saved state (a cluster rebuilding Redis from the directory)."""
        return self._after_queued(upload_id, self._read_state, upload_id)

    def _after_queued(self, upload_id: str, call: Callable[..., T], *args: object) -> Deferred[T]:
        """Like `_run`, but an upload with nothing queued gets no bookkeeping for it (a
        stranger's look at an unknown ticket must leave nothing behind)."""
        if upload_id in self._locks:
            return self._run(upload_id, call, *args)
        return deferToThreadPool(self._reactor, self._pool, call, *args)

    def _run(self, upload_id: str, call: Callable[..., T], *args: object) -> Deferred[T]:
        """Run `call(*args)` in the pool after every earlier call for this upload."""
        lock = self._locks.setdefault(upload_id, DeferredLock())
        return lock.run(deferToThreadPool, self._reactor, self._pool, call, *args)

    def _run_named(self, upload_id: str, call: Callable[..., T], *args: object) -> Deferred[T]:
        """`_run` for a call that creates, renames or removes files: the directory is
        fsynced after it (grouped with other uploads'), before later calls run."""
        lock = self._locks.setdefault(upload_id, DeferredLock())
        return lock.run(self._then_directory, call, *args)

    def _then_directory(self, call: Callable[..., T], *args: object) -> Deferred[T]:
        if not self.sync:
            return deferToThreadPool(self._reactor, self._pool, call, *args)
        d = deferToThreadPool(self._reactor, self._sync_pool, call, *args)  # it fsyncs

        def durably(result: T) -> Deferred[T]:
            return self._directory.synced().addCallback(lambda _: result)

        return d.addCallback(durably)

    def write(
        self,
        upload_id: str,
        offset: int,
        data: Chunk,
        digests: tuple[Digest, ...] = (),
        hashed: bool = True,
    ) -> Deferred[None]:
        """Write `data` at `offset`, feeding `digests` with it in the same thread. Fires
        once written (not yet durable: see `synced`). After a write that found no space
        (`no_space`), the upload's later writes fail the same way until a `truncate`.
        `hashed=False`: the upload's own SHA-256 is not kept (a tus partial upload's, which
        nobody asks for: its ticket's file is hashed as the partials are copied in)."""
        self._opening(upload_id)
        d = self._queue_write(upload_id, offset, data, digests, hashed)
        state = self._durable.setdefault(upload_id, _Durable())

        def landed(_: None) -> None:
            state.written = offset + len(data)  # in order: writes land one after the other

        return d.addCallbacks(landed, self._full_or_not)

    def _queue_write(
        self, upload_id: str, offset: int, data: Chunk, digests: tuple[Digest, ...], hashed: bool
    ) -> Deferred[None]:
        return self._run(upload_id, self._write, upload_id, offset, data, digests, hashed)

    def _full_or_not(self, failure: Failure) -> Failure:
        """A write that found no space: no room for new uploads until a new measure
        (at the next look at the free space) says otherwise."""
        if failure.value is not None and no_space(failure.value):
            self._free, self._free_measured = 0, float("-inf")
        return failure

    def synced(self, upload_id: str, upto: int) -> Deferred[None]:
        """Fires once the upload's first `upto` bytes, already written, are durable.

        Grouped: one fdatasync at a time per upload, running beside its writes; each
        covers every write that landed before it began, so a caller waits for the
        first sync that begins after it asked. The first sync of a file also makes its
        name durable. Fails (OSError) if the sync does, or if the bytes were cut off
        before they were durable."""
        state = self._durable.setdefault(upload_id, _Durable())
        if not self.sync or upto <= state.durable:
            return succeed(None)
        state.written = max(state.written, upto)  # (a restart finds bytes written before)
        d: Deferred[None] = Deferred()
        state.waiting.append((upto, d))
        self._sync_next(upload_id, state)
        return d

    def _sync_next(self, upload_id: str, state: _Durable) -> None:
        if not state.running and state.waiting:
            state.running = True
            ensureDeferred(self._sync(upload_id, state))

    async def _sync(self, upload_id: str, state: _Durable) -> None:
        era, covered, state.waiting = state.era, state.waiting, []
        size = state.written  # every byte of writes that landed before it begins
        try:
            await deferToThreadPool(self._reactor, self._sync_pool, self._sync_file, upload_id)
            if not state.named:  # a new file: its name too
                await self._directory.synced()
        except Exception:
            failed: Failure | None = Failure()
        else:
            failed = None
            if era == state.era:
                state.durable = max(state.durable, size)
                state.named = True
        state.running = False
        later = [(upto, waiter) for upto, waiter in state.waiting if upto <= state.durable]
        state.waiting = [each for each in state.waiting if each not in later]
        for upto, waiter in covered:
            if failed is not None:
                waiter.errback(failed)
            elif upto <= state.durable:
                waiter.callback(None)
            else:
                waiter.errback(_cut_off(upload_id, upto))
        for _, waiter in later:  # asked meanwhile, for bytes this sync covered after all
            waiter.callback(None)
        self._sync_next(upload_id, state)

    def firm(self, upload_id: str, upto: int, length: int | None) -> None:
        """The upload's first `upto` bytes stand: nothing voids them any more (they are
        where they stay, here)."""

    def take_up(self, upload_id: str) -> Deferred[tuple[int, bool]]:
        """Cluster mode: `stored`, for the instance that takes the upload up to act on it."""
        return self.stored(upload_id)

    def let_go(self, upload_id: str, size: int) -> Deferred[None]:
        """Cluster mode: before the upload's lease goes, its `size` bytes are where another
        instance finds them (here: in the shared directory already)."""
        return succeed(None)

    def leave(self, upload_id: str) -> None:
        """Cluster mode: another instance may act on the upload from now on."""
        self.forget(upload_id)

    def truncate(self, upload_id: str, size: int) -> Deferred[None]:
        """Cut the partial file to `size` bytes, after queued writes (durably: bytes cut
        off must not come back). Callers waiting for bytes past `size` hear they are gone."""
        state = self._durable.setdefault(upload_id, _Durable())
        state.era += 1  # a sync under way may have seen the bytes cut off
        state.durable = min(state.durable, size)
        waiting, state.waiting = state.waiting, []
        for upto, waiter in waiting:
            if upto <= size:
                state.waiting.append((upto, waiter))
            else:
                waiter.errback(_cut_off(upload_id, upto))
        d = self._run(upload_id, self._truncate, upload_id, size)

        def cut(_: None) -> None:
            state.written = size
            if self.sync:  # the cut was fdatasynced: what is left is durable
                state.durable = size

        return d.addCallback(cut)

    def _opening(self, upload_id: str) -> None:
        """Note that the upload's file is open; close the least recent past the bound."""
        self._open[upload_id] = None
        self._open.move_to_end(upload_id)
        if len(self._open) > self._max_open_files:
            oldest, _ = self._open.popitem(last=False)
            self._run(oldest, self._close, oldest)  # after its queued writes

    def release(self, upload_id: str) -> Deferred[None]:
        """Close the upload's file once queued writes have landed (nobody is writing it)."""
        self._open.pop(upload_id, None)
        return self._run(upload_id, self._close, upload_id)

    def drain(self, upload_id: str) -> Deferred[None]:
        """Fires once every call queued so far for this upload has finished."""
        lock = self._locks.get(upload_id)
        if lock is None or not lock.locked:
            return succeed(None)
        return self._run(upload_id, _nothing)

    def drain_all(self) -> Deferred[list[None]]:
        """Fires once every call queued so far, for any upload, has finished."""
        return gatherResults(
            [self.drain(upload_id) for upload_id, lock in list(self._locks.items()) if lock.locked]
        )

    def complete(self, upload_id: str) -> Deferred[Completed]:
        """Make the file durable and give it its final name; its path and SHA-256."""
        self._open.pop(upload_id, None)
        return self._run_named(upload_id, self._complete, upload_id)

    def remove(self, upload_id: str) -> Deferred[None]:
        """Delete the upload's file, partial or complete, after queued writes."""
        self._open.pop(upload_id, None)
        return self._run_named(upload_id, self._remove, upload_id)

    def record_ticket(self, upload_id: str, record: Record) -> Deferred[None]:
        """Save a new ticket's first record (in the journal; see `journal`)."""
        return self.journal.append(upload_id, record).addErrback(self._full_or_not)

    def save_state(self, upload_id: str, record: Record) -> Deferred[None]:
        """Replace the upload's state record atomically, and durably if syncing is on
        (a state a client was answered on must survive)."""
        d = self._run_named(upload_id, self._save_state, upload_id, record)

        def saved(_: None) -> None:
            self.journal.superseded(upload_id)

        return d.addCallback(saved)

    async def discard(self, upload_id: str) -> None:
        """Delete the state of an upload that is being forgotten, and a partial file.

        A complete file is never touched: once handed over and kept
        (`removeFileWhenFinished=false`) it belongs to the backend.
        """
        self._open.pop(upload_id, None)
        await self.journal.forget(upload_id)  # first: a crash must not bring back the ticket
        await self._run_named(upload_id, self._discard, upload_id)

    def forget(self, upload_id: str) -> None:
        """Drop bookkeeping for an upload that will see no more calls."""
        lock = self._locks.get(upload_id)
        if lock is not None and not lock.locked and not lock.waiting:
            del self._locks[upload_id]
            self._hashing.pop(upload_id, None)  # no thread touches it: nothing is queued
            self._short.pop(upload_id, None)
            durable = self._durable.get(upload_id)
            if durable is not None and not durable.running and not durable.waiting:
                del self._durable[upload_id]

    def free_bytes(self) -> int:
        """The free space, as last measured: statvfs runs in a thread (on a network file
        system it can take a while), at most every FREE_SPACE_AGE seconds."""
        if self._reactor.seconds() - self._free_measured > FREE_SPACE_AGE:  # type: ignore[attr-defined]
            self._free_measured = self._reactor.seconds()  # type: ignore[attr-defined]
            deferToThreadPool(self._reactor, self._pool, self._measure_free).addErrback(
                lambda f: log.error("cannot measure the free space: {e}", e=f.value)
            )
        return self._free

    def _measure_free(self) -> None:
        stat = os.statvfs(self.root)
        self._free = stat.f_bavail * stat.f_frsize

    # The methods below run in pool threads.

    def _fd(self, upload_id: str) -> int:
        fd = self._fds.get(upload_id)
        if fd is None:
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC  # read too: to hash again
            fd = os.open(self.part_path(upload_id), flags, DATA_MODE)
            self._fds[upload_id] = fd
        return fd

    def _close(self, upload_id: str) -> None:
        fd = self._fds.pop(upload_id, None)
        if fd is not None:
            os.close(fd)

    def _write(
        self,
        upload_id: str,
        offset: int,
        data: Chunk,
        digests: tuple[Digest, ...],
        hashed: bool = True,
    ) -> None:
        short = self._short.get(upload_id)
        if short is not None:  # a hole must not open where an earlier write failed
            raise OSError(short, f"{os.strerror(short)} (an earlier write of this upload)")
        fd = self._fd(upload_id)
        hashing = self._hashed_up_to(upload_id, fd, offset) if self._sha256 and hashed else None
        if hashing is not None:
            hashing.mark()
            digests = (*digests, hashing.digest)
        try:
            if isinstance(data, Spliced):
                self._splice(fd, offset, data, digests)
            else:
                for part in data.parts if isinstance(data, Pieces) else [data]:
                    for digest in digests:
                        digest.update(part)
                pwrite_all(fd, data, offset)
        except OSError as e:
            self._undo_write(upload_id, fd, offset)
            if e.errno in NO_SPACE:
                self._short[upload_id] = e.errno
            raise
        if hashing is not None:
            hashing.upto += len(data)

    def _splice(self, fd: int, offset: int, data: Spliced, digests: tuple[Digest, ...]) -> None:
        """Copy bytes of a tus partial upload's file into this one (concatenation)."""
        source = os.open(self.part_path(data.source), os.O_RDONLY | os.O_CLOEXEC)
        try:
            copy_range(source, fd, data.offset, data.size, offset, digests)
        finally:
            os.close(source)

    def _undo_write(self, upload_id: str, fd: int, offset: int) -> None:
        """A write that failed (maybe part-way): the file and its hash end where it began."""
        with contextlib.suppress(OSError):
            os.ftruncate(fd, offset)
        hashing = self._hashing.get(upload_id)
        if hashing is not None and not hashing.cut(offset):
            del self._hashing[upload_id]

    def _sync_file(self, upload_id: str) -> None:
        """fdatasync the partial file, beside the upload's queued calls (through a
        descriptor of its own). No partial file: `_complete` synced it before renaming
        it, or it was removed, and then nobody counts on its bytes."""
        try:
            fd = os.open(self.part_path(upload_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            self._fdatasync(fd)
        finally:
            os.close(fd)

    def _hashed_up_to(self, upload_id: str, fd: int, offset: int) -> _Hashing | None:
        """The upload's hash covering exactly its first `offset` bytes: the one kept while
        writing, or (after a restart or a rewind) made anew from the bytes on disk; None
        where the file no longer holds them all (a spool gave back what the object store
        has: the hash is made from the object)."""
        hashing = self._hashing.get(upload_id)
        if hashing is None or hashing.upto != offset:
            if has_hole(fd, 0, offset):
                self._hashing.pop(upload_id, None)
                return None
            hashing = _Hashing(hashlib.sha256())
            hash_range(fd, 0, offset, (hashing.digest,))
            hashing.upto = offset
            self._hashing[upload_id] = hashing
        return hashing

    def _stored(self, upload_id: str) -> tuple[int, bool]:
        for path in (self.part_path(upload_id), self.final_path(upload_id)):
            with contextlib.suppress(FileNotFoundError):
                return path.stat().st_size, True
        return 0, False

    def _read_state(self, upload_id: str) -> Record | None:
        try:
            record: Record = json.loads(self.state_path(upload_id).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None
        return record if record.get("id") == upload_id else None

    def _truncate(self, upload_id: str, size: int) -> None:
        fd = self._fd(upload_id)
        os.ftruncate(fd, size)
        if self.sync:
            self._fdatasync(fd)
        self._short.pop(upload_id, None)
        hashing = self._hashing.get(upload_id)
        if hashing is not None and not hashing.cut(size):
            del self._hashing[upload_id]  # hashed again from the file at the next write

    def _complete(self, upload_id: str) -> Completed:
        final, part = self.final_path(upload_id), self.part_path(upload_id)
        if final.exists() and not part.exists():  # completed before a restart
            return Completed(str(final), self._digest_of(upload_id, final))
        fd = self._fd(upload_id)  # a zero-byte upload had no write that opened it
        try:
            if self.sync:
                self._fdatasync(fd)
            digest = self._digest_of(upload_id, part, fd)
        finally:
            self._close(upload_id)
        os.replace(part, final)  # made durable by `_run_named`
        return Completed(str(final), digest)

    def _digest_of(self, upload_id: str, path: Path, fd: int | None = None) -> str | None:
        """The SHA-256 of the whole file, continuing the one kept while writing (None: not
        computed, or the file no longer holds all its bytes)."""
        hashing = self._hashing.pop(upload_id, None)
        if not self._sha256:
            return None
        size = path.stat().st_size
        if hashing is not None and hashing.upto == size:
            return str(hashing.digest.hexdigest())
        opened = fd if fd is not None else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            hashed = self._hashed_up_to(upload_id, opened, size)
            return None if hashed is None else str(hashed.digest.hexdigest())
        finally:
            self._hashing.pop(upload_id, None)
            if fd is None:
                os.close(opened)

    def _remove(self, upload_id: str) -> None:
        self._close(upload_id)
        self._hashing.pop(upload_id, None)
        self._short.pop(upload_id, None)
        self.part_path(upload_id).unlink(missing_ok=True)  # durably: see `remove`
        self.final_path(upload_id).unlink(missing_ok=True)

    def _save_state(self, upload_id: str, record: Record) -> None:
        data = json.dumps(record).encode("utf-8")
        path = self.state_path(upload_id)  # its name made durable by `_run_named`
        replace_file(path, data, self.sync, fsync=self._fdatasync, fsync_directory=False)

    def _discard(self, upload_id: str) -> None:
        self._close(upload_id)
        self._hashing.pop(upload_id, None)
        self._short.pop(upload_id, None)
        self.part_path(upload_id).unlink(missing_ok=True)  # durably: see `discard`
        self.state_path(upload_id).unlink(missing_ok=True)


def _nothing() -> None:
    return None


def _cut_off(upload_id: str, upto: int) -> OSError:
    return OSError(errno.EIO, f"upload {upload_id}: bytes up to {upto} were cut off unsynced")


def checked_id(upload_id: str) -> str:
    """Refuse anything but a canonical UUID as a file name."""
    if str(uuid.UUID(upload_id)) != upload_id:
        raise ValueError(f"not a canonical ticket id: {upload_id!r}")
    return upload_id
