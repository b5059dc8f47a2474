"""The spool: an upload's bytes on local disk on their way to the object store.

An upload's spool file (`<StorageDir>/<ticket>.part`, written as disk mode writes its
files) keeps the upload's offsets: byte N of the upload is byte N of the file. Once
the bytes of a whole part stand (durable, and no connection can void them any more),
the part goes to the store in the background, while the upload goes on; once the
store has it, its range of the file is given back to the file system (a hole), so
the spool holds a few parts per upload at most. Writes wait while an upload's bytes
that could go have not gone yet past `SPOOL_PARTS` parts: back-pressure on the
client when the store is slower than the client, or away.

Part n holds the upload's bytes from (n - 1) x part size on: what the store holds and
what the spool still holds say, after any restart, where every byte is. Nothing about
the store is saved with the upload's state: its multipart upload is found by its key
(PREFIX + ticket), its part size from its first part.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredLock,
    TimeoutError,
    ensureDeferred,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from .files import DATA_MODE, Chunk, Digest, punch_hole
from .objectstore import (
    MAX_PART_SIZE,
    MAX_PARTS,
    Gone,
    MiB,
    ObjectStore,
    Part,
    StoreError,
    StoreUnavailable,
)
from .storage import Completed, DiskStorage, Saved, Vanished, checked_id

T = TypeVar("T")

log = Logger()
PARTS_IN_FLIGHT = 2  # per upload: a part is read from disk while another is on the wire
SPOOL_PARTS = 4  # parts' worth of bytes that could go but have not, before writes wait
RETRY_FIRST, RETRY_MAX = 0.5, 30.0  # seconds between attempts to reach the store
PATIENCE = 58.0  # seconds a write waits for the store before its client hears of it
ABORT_PATIENCE = 3600.0  # seconds aborts are retried before the log names what is left


@dataclass
class _Shipment:
    """One upload's way to the store (reactor thread)."""

    key: str
    path: Path
    part_size: int
    firm: int = 0  # bytes that stand: whole parts of them may go
    parts: dict[int, Part] = field(default_factory=dict)  # in the store, by number
    sending: dict[int, Deferred[None]] = field(default_factory=dict)
    next: int = 1  # the lowest part number not yet sent nor being sent
    multipart: str | None = None  # the store's id of the upload, once known or begun
    learnt: bool = False  # the store was asked what it holds (a restart may find parts)
    lock: DeferredLock = field(default_factory=DeferredLock)  # learning, beginning, ending
    waiting: list[Deferred[None]] = field(default_factory=list)  # writes waiting for room
    pauses: list[Deferred[None]] = field(default_factory=list)  # retries waiting their turn
    trouble: str = ""  # why the store has not taken a part, while it has not
    stalled: bool = False  # a write waited `patience` for room: the next fail at once
    failed: StoreError | None = None  # the store lost the upload's parts: it cannot go on
    ended: bool = False  # completed or aborted: nothing more is sent
    run: int = 0  # parts 1 to `run` are in the store (parts are added, never removed)

    @property
    def shipped(self) -> int:
        """Bytes from the start that the store holds, part after part (asked at every
        write: the run found so far is kept)."""
        while self.run + 1 in self.parts:
            self.run += 1
        return self.run * self.part_size

    def room(self) -> bool:
        return self.firm - self.shipped < SPOOL_PARTS * self.part_size


class Shipper:
    """Sends uploads' spool files to the store part by part (see the module's text)."""

    def __init__(
        self,
        store: ObjectStore,
        clock: IReactorTime,
        path_of: Callable[[str], Path],
        on_disk: Callable[..., Deferred[Any]],
        part_size: int,
        tails: bool = False,
        patience: float = PATIENCE,
    ) -> None:
        self.store = store
        self.clock = clock
        self.part_size = part_size
        self.patience = patience  # the server uses WebsocketConnectionTimeoutS
        self.tails = tails  # cluster mode: uploads move between instances (`hand_off`)
        self._path_of = path_of  # an upload's spool file
        self._on_disk = on_disk  # runs a call in a disk thread
        self._shipments: dict[str, _Shipment] = {}
        self.cleaning: set[Deferred[None]] = set()  # aborts and deletions retried meanwhile

    def key(self, upload_id: str) -> str:
        return self.store.location.key(upload_id)

    async def _give_back_parts(self, s: _Shipment) -> None:
        """The spool's blocks of every part the store holds go back to the disk."""
        for part in list(s.parts.values()):
            await self._give_back(s.path, (part.number - 1) * s.part_size, part.size)

    def _give_back(self, path: Path, offset: int, size: int) -> Deferred[None]:
        return self._on_disk(give_back, path, offset, size)

    def _shipment(self, upload_id: str, length: int | None = None) -> _Shipment:
        s = self._shipments.get(upload_id)
        if s is None:
            s = _Shipment(self.key(upload_id), self._path_of(upload_id), self.part_size)
            self._shipments[upload_id] = s
        if length is not None and not s.parts and not s.sending and s.next == 1:
            s.part_size = part_size_for(length, self.part_size)
        return s

    # While bytes arrive

    def firm(self, upload_id: str, upto: int, length: int | None = None) -> None:
        """The upload's first `upto` bytes stand (durable in the spool, and nothing voids
        them any more): every whole part of them goes to the store. The upload's
        `length` sets its part size, the first time it is given."""
        s = self._shipment(upload_id, length)
        s.firm = max(s.firm, upto)
        self._ship(s)

    def room(self, upload_id: str) -> Deferred[None]:
        """Fires once the upload's next write may go into the spool: at once, unless
        SPOOL_PARTS parts' worth of its bytes wait for the store. Fails (StoreUnavailable)
        after `patience` seconds without room, and at once after that until there is room
        again; fails (StoreError) if the store lost the upload."""
        s = self._shipments.get(upload_id)
        if s is None:
            return succeed(None)
        if s.failed is not None:
            return fail(s.failed)
        if s.room():
            return succeed(None)
        if s.stalled:
            return fail(self._unavailable(s))
        d: Deferred[None] = Deferred()
        s.waiting.append(d)
        self._nudge(s)  # a part waiting to be tried again is tried now

        def timed_out(failure: Any) -> Any:
            if failure.check(TimeoutError, CancelledError):
                s.stalled = True
                raise self._unavailable(s)
            return failure

        return d.addTimeout(self.patience, self.clock).addErrback(timed_out)

    def _unavailable(self, s: _Shipment) -> StoreUnavailable:
        return StoreUnavailable(
            f"the object store has not taken this upload's bytes for {self.patience:g} s"
            + (f": {s.trouble}" if s.trouble else "")
        )

    def _wake(self, s: _Shipment) -> None:
        if s.failed is None and not s.ended and not s.room():
            return
        s.stalled = False
        waiting, s.waiting = s.waiting, []
        for d in waiting:
            if not d.called:
                d.errback(s.failed) if s.failed is not None else d.callback(None)

    def _ship(self, s: _Shipment) -> None:
        """Start sending the whole parts that stand, a few at a time (once the store
        said what it holds already: its part size counts)."""
        if not s.learnt:
            if not s.lock.locked and s.next * s.part_size <= s.firm:
                ensureDeferred(self._learn_then_ship(s)).addErrback(self._trouble_learning, s)
            return
        while (
            not s.ended
            and s.failed is None
            and len(s.sending) < PARTS_IN_FLIGHT
            and s.next * s.part_size <= s.firm
        ):
            number, s.next = s.next, s.next + 1
            if number not in s.parts:
                done = ensureDeferred(self._send(s, number, s.part_size))
                s.sending[number] = done
                done.addErrback(lambda f: log.failure("sending a part failed", f))

    async def _learn_then_ship(self, s: _Shipment) -> None:
        """After a restart: the parts the store has need not go again, and their bytes
        need not stay in the spool."""
        async with s.lock:
            await self._learn(s)
            await self._give_back_parts(s)
            self._ship(s)  # (before the lock goes: `settled` sees the parts on their way)

    def _trouble_learning(self, failure: Any, s: _Shipment) -> None:
        """The store did not say what it holds: try again after a while."""
        self._trouble(s, f"looking up its parts: {failure.value}")
        deferLater(self.clock, RETRY_FIRST, self._ship, s)

    async def _send(self, s: _Shipment, number: int, size: int) -> None:
        """Send one part until the store has it (retrying while it is away), then give its
        range of the spool back."""
        offset, delay = (number - 1) * s.part_size, RETRY_FIRST
        try:
            while not s.ended and s.failed is None:
                try:
                    upload = await self._multipart(s)
                    if number in s.parts:  # the store had it already (a restart)
                        break
                    part = await self.store.upload_part(s.key, upload, number, s.path, offset, size)
                except Gone as e:
                    self._lost(s, f"the store lost the upload's parts ({e})")
                    return
                except StoreError as e:
                    self._trouble(s, f"part {number}: {e}")
                    await self._pause(s, delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                except OSError as e:  # the spool cannot give the bytes: nothing can
                    self._lost(s, f"the spool cannot give part {number}: {e}")
                    return
                s.parts[number] = part
                if s.trouble:
                    log.info("{key}: the object store takes parts again", key=s.key)
                    s.trouble = ""
                break
            if number in s.parts and size == s.part_size:
                await self._give_back(s.path, offset, size)
        finally:
            s.sending.pop(number, None)
            self._wake(s)
            self._ship(s)

    async def _pause(self, s: _Shipment, delay: float) -> None:
        """Wait `delay` seconds before trying the store again, or less if nudged."""
        d: Deferred[None] = Deferred()
        s.pauses.append(d)
        call = self.clock.callLater(delay, _fire, d)
        try:
            await d
        finally:
            if call.active():
                call.cancel()
            if d in s.pauses:
                s.pauses.remove(d)

    def try_again(self, upload_id: str) -> None:
        """The upload's client heard that the store is away, and will be back: its next
        writes wait for room again (and meanwhile for the store)."""
        s = self._shipments.get(upload_id)
        if s is not None:
            s.stalled = False

    def _nudge(self, s: _Shipment) -> None:
        pauses, s.pauses = s.pauses, []
        for d in pauses:
            _fire(d)

    def _trouble(self, s: _Shipment, why: str) -> None:
        if not s.trouble:
            log.warn("{key}: the object store does not take parts: {why}; retrying", key=s.key,
                     why=why)  # fmt: skip
        s.trouble = why

    def _lost(self, s: _Shipment, why: str) -> None:
        log.error("{key}: {why}", key=s.key, why=why)
        s.failed = StoreError(why)
        self._wake(s)

    async def _multipart(self, s: _Shipment) -> str:
        """The store's id of the upload: found (a restart may find one, and its parts)
        or begun."""
        if s.multipart is not None:
            return s.multipart
        async with s.lock:
            if s.multipart is None:
                await self._learn(s)
            if s.multipart is None:
                s.multipart = await self.store.begin(s.key)
        return s.multipart

    async def _learn(self, s: _Shipment) -> None:
        """What the store holds of the upload: its multipart upload (the one with the
        most parts, if a crash left several: the others are aborted) and its parts."""
        if s.learnt:
            return
        best: tuple[str, list[Part]] | None = None
        for upload in await self.store.uploads(s.key):
            parts = await self.store.parts(s.key, upload) or []
            if best is None or len(parts) > len(best[1]):
                if best is not None:
                    await self.store.abort(s.key, best[0])
                best = (upload, parts)
            else:
                await self.store.abort(s.key, upload)
        s.learnt = True
        if best is None:
            return
        s.multipart, parts = best
        if parts:
            s.part_size = parts[0].size if parts[0].number == 1 else s.part_size
        for part in parts:  # all but a last one are of the part size; others are sent again
            if part.size == s.part_size:
                s.parts[part.number] = part

    # Moving between instances (cluster mode: each has its own spool)

    async def hand_off(self, upload_id: str, size: int) -> None:
        """Put the upload's `size` bytes where another instance finds them: its whole
        parts in the store, the rest (less than a part) as a small object of its own,
        the tail (`<key>.tail`, its offset in its metadata). Retries while the store is
        away; raises StoreError if the store lost the upload."""
        s = self._shipment(upload_id)
        self.firm(upload_id, size)
        delay = RETRY_FIRST
        while True:
            await self.settled(upload_id)
            if s.failed is not None:
                raise s.failed
            shipped = s.shipped
            if shipped + s.part_size <= size:  # a part's upload failed for now: again
                self._ship(s)
                continue
            if shipped == size:
                return
            try:
                metadata = {"offset": str(shipped)}
                await self.store.put(_tail(s.key), s.path, shipped, size - shipped, metadata)
                return
            except StoreError as e:
                self._trouble(s, f"its tail: {e}")
                await deferLater(self.clock, delay, lambda: None)
                delay = min(delay * 2, RETRY_MAX)

    async def look(self, upload_id: str) -> tuple[int, bool]:
        """Where the upload's bytes end in the store (its parts, then a tail), and whether
        it has anything there (an object too): for a look by an instance that does not
        hold it. Nothing changes."""
        key, extent, present = self.key(upload_id), 0, False
        for upload in await self.store.uploads(key):
            present = True
            parts = {p.number: p for p in await self.store.parts(key, upload) or []}
            if 1 in parts:
                n = 1
                while n in parts and parts[n].size == parts[1].size:
                    n += 1
                extent = max(extent, (n - 1) * parts[1].size)
        tail = await self.store.head(_tail(key)) if self.tails else None
        if tail is not None:
            start = int(tail.metadata.get("offset", -1))
            if 0 <= start <= extent < start + tail.size:
                extent = start + tail.size
        if not present and extent == 0:
            found = await self.store.head(key)
            present, extent = (True, found.size) if found is not None else (False, 0)
        return extent, present or extent > 0

    async def take_up(self, upload_id: str) -> int:
        """Where the upload's bytes end, from what is anywhere: the parts in the store
        from the first on, then (taking them into this spool) the tail another instance
        left, and the bytes this spool holds (a crash may have left some). The spool file
        is cut where they end; they all stand. Raises StoreError if the store cannot
        say (it is away: try again later)."""
        self._shipments.pop(upload_id, None)  # what the store holds may have changed
        s = self._shipment(upload_id)
        async with s.lock:
            await self._learn(s)
            await self._give_back_parts(s)
        extent = s.shipped
        tail = await self.store.head(_tail(s.key)) if self.tails else None
        while True:
            held = await self._on_disk(data_from, s.path, extent)
            if held > extent:
                extent = held
                continue
            if tail is None:
                break
            start = int(tail.metadata.get("offset", -1))
            if start < 0 or not start <= extent < start + tail.size:
                break
            fetched = await self.store.fetch(_tail(s.key), s.path, start)
            tail = None
            if fetched is not None:
                extent = max(extent, start + fetched)
        await self._on_disk(cut, s.path, extent)
        self.firm(upload_id, extent)
        return extent

    # The end

    async def complete(self, upload_id: str, size: int) -> None:
        """Make the object of the upload's `size` bytes: the parts not sent yet go, then
        the store puts them together (or a small upload goes in one request). Retries
        while the store is away; raises StoreError if it lost the upload."""
        s = self._shipment(upload_id, size)
        s.firm = size
        delay = RETRY_FIRST
        while True:
            try:
                await self._complete(s, size)
                if self.tails:
                    await self.store.delete(_tail(s.key))
                return
            except Gone as e:
                self._lost(s, f"cannot complete the object: {e}")
                raise StoreError(str(e)) from None
            except StoreError as e:
                if s.failed is not None:
                    raise s.failed from None
                self._trouble(s, f"completing: {e}")
                await deferLater(self.clock, delay, lambda: None)
                delay = min(delay * 2, RETRY_MAX)
            except OSError as e:  # the spool cannot give the bytes
                self._lost(s, f"cannot complete the object: {e}")
                raise StoreError(str(e)) from None

    async def _complete(self, s: _Shipment, size: int) -> None:
        self._ship(s)
        while s.sending:
            await gatherResults(list(s.sending.values()))
            self._ship(s)
        if s.failed is not None:
            raise s.failed
        async with s.lock:
            await self._learn(s)
            if (s.multipart is None and size <= s.part_size) or size == 0:  # one request
                if not await self._already(s, size):
                    await self.store.put(s.key, s.path, 0, size)
                if s.multipart is not None:
                    await self.store.abort(s.key, s.multipart)
                s.ended = True
                return
            upload = await self._multipart_locked(s, size)
            if upload is None:
                s.ended = True  # completed before a restart
                return
            full, last = divmod(size, s.part_size)
            for number in range(1, full + 1):  # any the loop above did not send (a restart)
                if number not in s.parts:
                    offset = (number - 1) * s.part_size
                    s.parts[number] = await self.store.upload_part(
                        s.key, upload, number, s.path, offset, s.part_size
                    )
            numbers = full + (1 if last else 0)
            if last:
                s.parts[numbers] = await self.store.upload_part(
                    s.key, upload, numbers, s.path, full * s.part_size, last
                )
            try:
                await self.store.complete(
                    s.key, upload, [s.parts[n] for n in range(1, numbers + 1)]
                )
            except Gone:  # an earlier attempt did it, and its answer was lost
                if not await self._already(s, size):
                    raise
            s.ended = True

    async def _multipart_locked(self, s: _Shipment, size: int) -> str | None:
        """`_multipart` for a caller holding the lock; None if the object is complete
        already (no upload in progress, and the object of that size is there)."""
        if s.multipart is None:
            if await self._already(s, size):
                return None
            s.multipart = await self.store.begin(s.key)
        return s.multipart

    async def _already(self, s: _Shipment, size: int) -> bool:
        found = await self.store.head(s.key)
        return found is not None and found.size == size

    async def abort(self, upload_id: str, delete: bool = False) -> None:
        """End the upload in the store, leaving no part there (`delete`: nor its object):
        a part being sent may land after an abort, so it is aborted once they have all
        settled. Returns after the first attempt; while the store is away, attempts go
        on in the background (`cleaning`)."""
        s = self._shipment(upload_id)
        s.ended = True
        self._wake(s)
        for d in list(s.sending.values()):
            with contextlib.suppress(Exception):
                await d
        try:
            await self._clean(s.key, delete)
        except StoreError as e:
            log.warn("{key}: cannot clear it from the object store yet: {e}", key=s.key, e=e)
            retrying = ensureDeferred(self._clean_later(s.key, delete))
            self.cleaning.add(retrying)
            retrying.addBoth(lambda _: self.cleaning.discard(retrying))
        self.forget(upload_id)

    async def _clean(self, key: str, delete: bool) -> None:
        for upload in await self.store.uploads(key):
            await self.store.abort(key, upload)
        if self.tails:
            await self.store.delete(_tail(key))
        if delete:
            await self.store.delete(key)

    async def _clean_later(self, key: str, delete: bool) -> None:
        delay, deadline = RETRY_FIRST, self.clock.seconds() + ABORT_PATIENCE
        while True:
            await deferLater(self.clock, delay, lambda: None)
            delay = min(delay * 2, RETRY_MAX)
            try:
                await self._clean(key, delete)
                log.info("{key}: cleared from the object store", key=key)
                return
            except StoreError as e:
                if self.clock.seconds() + delay > deadline:
                    log.error("{key}: cannot clear it from the object store ({e}); its "
                              "multipart uploads keep their parts until aborted (an S3 "
                              "lifecycle rule can)", key=key, e=e)  # fmt: skip
                    return

    def open_gates(self) -> None:
        """Let every write waiting for room go into the spool (the server is stopping:
        what they bring is kept there for its restart)."""
        for s in self._shipments.values():
            waiting, s.waiting = s.waiting, []
            for d in waiting:
                if not d.called:
                    d.callback(None)

    async def settled(self, upload_id: str) -> None:
        """Returns once no part of the upload is on its way (nor the store being asked
        what it holds)."""
        s = self._shipments.get(upload_id)
        while s is not None and (s.lock.locked or s.sending):
            async with s.lock:
                pass
            for d in list(s.sending.values()):
                with contextlib.suppress(Exception):
                    await d

    def forget(self, upload_id: str) -> None:
        """Drop the bookkeeping of an upload that sends nothing more."""
        s = self._shipments.get(upload_id)
        if s is not None and not s.sending and not s.waiting:
            del self._shipments[upload_id]


def _fire(d: Deferred[None]) -> None:
    if not d.called:
        d.callback(None)


def part_size_for(length: int | None, least: int) -> int:
    """The part size of an upload of `length` bytes: `least`, or more for the upload to
    fit in the store's MAX_PARTS parts (a whole number of MiB)."""
    if length is None:
        return least
    needed = -(-length // MAX_PARTS)
    return min(max(least, -(-needed // MiB) * MiB), MAX_PART_SIZE)


def _tail(key: str) -> str:
    return key + ".tail"


def data_from(path: Path, offset: int) -> int:
    """Where the bytes the spool file holds from `offset` on end (the first hole, or its
    end); `offset` if it holds none there, or has no file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return offset
    try:
        return max(offset, os.lseek(fd, offset, os.SEEK_HOLE))
    except OSError:  # at or past its end
        return offset
    finally:
        os.close(fd)


def cut(path: Path, size: int) -> None:
    """Make the spool file `size` bytes long (a new one is all hole: the store has them)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, DATA_MODE)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def give_back(path: Path, offset: int, size: int) -> None:
    """Free the spool's blocks of a range the store has (in a disk thread). A file system
    that cannot punch holes keeps them until the upload ends (logged once)."""
    global _cannot_punch
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        punch_hole(fd, offset, size)
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        if not _cannot_punch:
            _cannot_punch = True
            log.warn("the spool's file system cannot punch holes: a spool file keeps the "
                     "parts sent to the store until its upload ends")  # fmt: skip
    finally:
        os.close(fd)


_cannot_punch = False


UNBOUNDED = 1 << 62  # the free space an object store is taken to have


class SpoolStorage(DiskStorage):
    """Upload files that end as objects in a store: written into the spool (`root`) by
    DiskStorage's own rules (offsets, digests, grouped syncs, state files and the
    journal), sent on part by part by a `Shipper` as they grow, made one object before
    the handover. What is left of a complete upload in the spool is an empty file of its
    size under its final name: a restart knows the object was made.

    The SHA-256 is kept while the spool is written, in order, as on disk; after a
    restart, or on an instance that took the upload over, the spool no longer holds the
    bytes sent: the object is read back to hash it."""

    def __init__(
        self,
        root: Path,
        reactor: Any,
        pool: ThreadPool,
        store: ObjectStore,
        *,
        part_size: int,
        max_upload: int | None = None,
        cluster: bool = False,
        patience: float = PATIENCE,
        **disk: Any,
    ) -> None:
        super().__init__(root, reactor, pool, **disk)
        self.store = store
        self.cluster = cluster  # each instance has a spool of its own
        self.part_size = part_size
        # An upload whose length is not known yet (tus creation-defer-length) gets parts
        # sized for the largest upload allowed, else of the part size: its bound.
        self.unsized = max_upload
        self.max_unsized = MAX_PARTS * part_size_for(max_upload, part_size)
        self.shipper = Shipper(
            store,
            reactor,
            self.part_path,
            functools.partial(deferToThreadPool, reactor, pool),
            part_size,
            tails=cluster,
            patience=patience,
        )

    shared = False  # cluster mode: no instance sees another's spool
    splices = False  # a partial's spool file has holes where its parts went to the store

    def key(self, upload_id: str) -> str:
        return self.store.location.key(checked_id(upload_id))

    def _fields(self, key: str) -> dict[str, str]:
        fields = {"s3Bucket": self.store.bucket, "s3Key": key}
        if self.store.endpoint is not None:
            fields["s3Endpoint"] = self.store.endpoint
        return fields

    def free_bytes(self) -> int:
        """The store is taken to have room; the spool needs a few parts per upload."""
        free = super().free_bytes()
        return UNBOUNDED if free >= (SPOOL_PARTS + PARTS_IN_FLIGHT + 1) * self.part_size else free

    # Bytes arriving

    def load(self, tidy: bool = True) -> list[Saved]:
        """DiskStorage's, and (at start-up) the bytes found in spool files stand: they go on
        to the store."""
        found = super().load(tidy)
        for saved in found if tidy else ():
            upload_id, length = str(saved.record["id"]), saved.record.get("length")
            if saved.record.get("length_deferred"):  # its parts were sized before its length
                length = None
            if saved.record.get("phase") == "receiving" and self.part_path(upload_id).exists():
                self.firm(upload_id, saved.stored, length if isinstance(length, int) else None)
        return found

    def _queue_write(
        self, upload_id: str, offset: int, data: Chunk, digests: tuple[Digest, ...], hashed: bool
    ) -> Deferred[None]:
        """Writes wait (in their order) while the upload's bytes wait for the store."""
        lock = self._locks.setdefault(upload_id, DeferredLock())

        def write(_: None) -> Deferred[None]:
            return deferToThreadPool(
                self._reactor, self._pool, self._write, upload_id, offset, data, digests, hashed
            )

        return lock.run(lambda: self.shipper.room(upload_id).addCallback(write))

    def firm(self, upload_id: str, upto: int, length: int | None) -> None:
        """`length` None: not known yet (its part size is for the largest allowed)."""
        self.shipper.firm(upload_id, upto, self.unsized if length is None else length)

    def truncate(self, upload_id: str, size: int) -> Deferred[None]:
        """After the writes that waited for the store in vain were voided (or bytes that
        failed their check): the next connection's writes wait for it again."""
        return (
            super()
            .truncate(upload_id, size)
            .addCallback(lambda _: self.shipper.try_again(upload_id))
        )

    def drain_all(self) -> Deferred[list[None]]:
        self.shipper.open_gates()  # stopping: writes waiting for the store land in the spool
        return super().drain_all()

    # The end

    def complete(self, upload_id: str) -> Deferred[Completed]:
        """Make the object (after the upload's queued calls); its URL, its SHA-256 (kept
        while writing, or read back from the store), its bucket, key and endpoint.
        Raises Vanished if it was made before a restart and is gone since."""
        self._open.pop(upload_id, None)
        lock = self._locks.setdefault(upload_id, DeferredLock())
        return lock.run(lambda: ensureDeferred(self._complete_object(upload_id)))

    async def _complete_object(self, upload_id: str) -> Completed:
        key = self.key(upload_id)
        size, digest, made = await self._in_thread(self._spooled, upload_id)
        if made:
            found = await self.store.head(key)
            if found is None:
                raise Vanished(f"{self.store.location.url(key)} is gone")
        else:
            await self.shipper.complete(upload_id, size)
        if self._sha256 and digest is None:
            digest, read = await self.store.sha256(key)
            if read != size:
                raise StoreError(f"{key}: {read} bytes read back, not {size}")
        if not made:
            await self._in_thread(self._mark_made, upload_id, size)
            if self.sync:
                await self._directory.synced()
        self.shipper.forget(upload_id)
        return Completed(self.store.location.url(key), digest, self._fields(key))

    def _in_thread(self, call: Callable[..., T], *args: object) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, call, *args)

    def _spooled(self, upload_id: str) -> tuple[int, str | None, bool]:
        """The upload's size, its SHA-256 if the spool can say, and whether the object
        was made before (in a pool thread)."""
        size, made = self._made(upload_id)
        if made:
            self._hashing.pop(upload_id, None)
            return size, None, True
        fd = self._fd(upload_id)  # a zero-byte upload had no write that opened it
        try:
            size = os.fstat(fd).st_size
            return size, self._digest_of(upload_id, self.part_path(upload_id), fd), False
        finally:
            self._close(upload_id)

    def _mark_made(self, upload_id: str, size: int) -> None:
        """The spool file, its bytes given back, under its final name."""
        part = self.part_path(upload_id)
        os.truncate(part, 0)
        os.truncate(part, size)
        os.replace(part, self.final_path(upload_id))

    def remove(self, upload_id: str) -> Deferred[None]:
        """The spool file, the object or its parts (after queued writes). The store's part
        is retried in the background while the store is away."""
        d = super().remove(upload_id)
        return d.addCallback(lambda _: ensureDeferred(self.shipper.abort(upload_id, True)))

    def _discard(self, upload_id: str) -> None:
        """Also the empty file that stood for the object (the object stays)."""
        super()._discard(upload_id)
        self.final_path(upload_id).unlink(missing_ok=True)

    def forget(self, upload_id: str) -> None:
        super().forget(upload_id)
        self.shipper.forget(upload_id)

    # Cluster mode: spools of their own

    def stored(self, upload_id: str) -> Deferred[tuple[int, bool]]:
        """What any instance would find: the store's parts and tail (the spool of the
        instance holding the upload may hold more)."""
        if not self.cluster:
            return super().stored(upload_id)
        return ensureDeferred(self._looked(upload_id))

    async def _looked(self, upload_id: str) -> tuple[int, bool]:
        size, made = await self._in_thread(self._made, upload_id)
        if made:
            return size, True
        return await self.shipper.look(upload_id)

    def take_up(self, upload_id: str) -> Deferred[tuple[int, bool]]:
        """Where the upload's bytes end, from the store and this spool (the spool file is
        made to hold what the store does not)."""
        if not self.cluster:
            return super().stored(upload_id)
        lock = self._locks.setdefault(upload_id, DeferredLock())
        return lock.run(lambda: ensureDeferred(self._taken_up(upload_id)))

    async def _taken_up(self, upload_id: str) -> tuple[int, bool]:
        size, made = await self._in_thread(self._made, upload_id)
        if made:
            return size, True
        self._durable.pop(upload_id, None)  # what was known of an earlier stay here
        self._hashing.pop(upload_id, None)
        extent = await self.shipper.take_up(upload_id)
        if extent > 0:
            return extent, True
        found = await self.store.head(self.key(upload_id))  # made by an instance that died
        return (found.size, True) if found is not None else (0, False)

    def _made(self, upload_id: str) -> tuple[int, bool]:
        final, part = self.final_path(upload_id), self.part_path(upload_id)
        if final.exists() and not part.exists():
            return final.stat().st_size, True
        return 0, False

    def let_go(self, upload_id: str, size: int) -> Deferred[None]:
        """Its bytes where other instances find them: parts and a tail in the store."""
        if not self.cluster:
            return succeed(None)
        return ensureDeferred(self.shipper.hand_off(upload_id, size))

    def leave(self, upload_id: str) -> None:
        """The spool file goes (after queued calls: an instance that takes the upload up
        again, this one too, starts from the store)."""
        if self.cluster:
            self._run(upload_id, self._drop_spool, upload_id)
        self.forget(upload_id)

    def _drop_spool(self, upload_id: str) -> None:
        self._close(upload_id)
        self._hashing.pop(upload_id, None)
        self.part_path(upload_id).unlink(missing_ok=True)
