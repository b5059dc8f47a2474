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
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from twisted.logger import Logger

from .files import DATA_MODE, punch_hole
from .objectstore import Gone, ObjectStore, Part, StoreError, StoreUnavailable

log = Logger()
PARTS_IN_FLIGHT = 2  # per upload: a part is read from disk while another is on the wire
SPOOL_PARTS = 4  # parts' worth of bytes that could go but have not, before writes wait
RETRY_FIRST, RETRY_MAX = 0.5, 30.0  # seconds between attempts to reach the store
PATIENCE = 30.0  # seconds a write waits for the store before its client hears of it
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
    trouble: str = ""  # why the store has not taken a part, while it has not
    stalled: bool = False  # a write waited PATIENCE for room: the next fail at once
    failed: StoreError | None = None  # the store lost the upload's parts: it cannot go on
    ended: bool = False  # completed or aborted: nothing more is sent

    @property
    def shipped(self) -> int:
        """Bytes from the start that the store holds, part after part."""
        n = 1
        while n in self.parts:
            n += 1
        return (n - 1) * self.part_size

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
    ) -> None:
        self.store = store
        self.clock = clock
        self.part_size = part_size
        self.tails = tails  # cluster mode: uploads move between instances (`hand_off`)
        self._path_of = path_of  # an upload's spool file
        self._on_disk = on_disk  # runs a call in a disk thread
        self._shipments: dict[str, _Shipment] = {}

    def key(self, upload_id: str) -> str:
        return self.store.location.key(upload_id)

    def _give_back(self, path: Path, offset: int, size: int) -> Deferred[None]:
        return self._on_disk(give_back, path, offset, size)

    def _shipment(self, upload_id: str) -> _Shipment:
        s = self._shipments.get(upload_id)
        if s is None:
            s = _Shipment(self.key(upload_id), self._path_of(upload_id), self.part_size)
            self._shipments[upload_id] = s
        return s

    # While bytes arrive

    def firm(self, upload_id: str, upto: int) -> None:
        """The upload's first `upto` bytes stand (durable in the spool, and nothing voids
        them any more): every whole part of them goes to the store."""
        s = self._shipment(upload_id)
        s.firm = max(s.firm, upto)
        self._ship(s)

    def room(self, upload_id: str) -> Deferred[None]:
        """Fires once the upload's next write may go into the spool: at once, unless
        SPOOL_PARTS parts' worth of its bytes wait for the store. Fails (StoreUnavailable)
        after PATIENCE seconds without room, and at once after that until there is room
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

        def timed_out(failure: Any) -> Any:
            if failure.check(TimeoutError, CancelledError):
                s.stalled = True
                raise self._unavailable(s)
            return failure

        return d.addTimeout(PATIENCE, self.clock).addErrback(timed_out)

    def _unavailable(self, s: _Shipment) -> StoreUnavailable:
        return StoreUnavailable(
            f"the object store has not taken this upload's bytes for {PATIENCE:g} s"
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
            for part in list(s.parts.values()):
                await self._give_back(s.path, (part.number - 1) * s.part_size, part.size)
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
                except OSError as e:  # the spool cannot give the bytes: nothing can
                    self._lost(s, f"the spool cannot give part {number}: {e}")
                    return
                except StoreError as e:
                    self._trouble(s, f"part {number}: {e}")
                    await deferLater(self.clock, delay, lambda: None)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
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
            for part in list(s.parts.values()):
                await self._give_back(s.path, (part.number - 1) * s.part_size, part.size)
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
        s = self._shipment(upload_id)
        s.firm = size
        delay = RETRY_FIRST
        while True:
            try:
                await self._complete(s, size)
                if self.tails:
                    await self.store.delete(_tail(s.key))
                return
            except (Gone, OSError) as e:
                self._lost(s, f"cannot complete the object: {e}")
                raise StoreError(str(e)) from None
            except StoreError as e:
                if s.failed is not None:
                    raise s.failed from None
                self._trouble(s, f"completing: {e}")
                await deferLater(self.clock, delay, lambda: None)
                delay = min(delay * 2, RETRY_MAX)

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

    async def abort(self, upload_id: str) -> None:
        """End the upload in the store, leaving no part there: a part being sent may land
        after an abort, so it is aborted once they have all settled. Retried in the
        background while the store is away."""
        s = self._shipment(upload_id)
        s.ended = True
        self._wake(s)
        for d in list(s.sending.values()):
            with contextlib.suppress(Exception):
                await d
        await self._abort_all(s.key)

    async def _abort_all(self, key: str) -> None:
        delay, deadline = RETRY_FIRST, self.clock.seconds() + ABORT_PATIENCE
        while True:
            try:
                for upload in await self.store.uploads(key):
                    await self.store.abort(key, upload)
                if self.tails:
                    await self.store.delete(_tail(key))
                return
            except StoreError as e:
                if self.clock.seconds() + delay > deadline:
                    log.error("{key}: cannot abort its multipart uploads ({e}); they keep "
                              "their parts until aborted (an S3 lifecycle rule can)",
                              key=key, e=e)  # fmt: skip
                    return
                log.warn("{key}: cannot abort its multipart uploads yet: {e}", key=key, e=e)
                await deferLater(self.clock, delay, lambda: None)
                delay = min(delay * 2, RETRY_MAX)

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
