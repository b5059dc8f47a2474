"""Which instance acts on which upload, when several share one Redis (SPEC: Several
instances).

The manager (`manager`) performs what each upload's table asks for; in a cluster it
holds only the uploads this instance acts on, each under its lease. The
`Coordinator` decides which those are: it takes an upload up from Redis (`hold`),
lets it go (saved, lease released) once nothing here needs it, sends a request for
an upload held elsewhere to its holder (`command`), renews the leases, and runs the
janitor's rounds (expiry, handovers whose instance died). `cluster` is its Redis
client.
"""

from __future__ import annotations

import contextlib
from collections.abc import Coroutine, Iterator
from typing import Any, Protocol
from uuid import UUID

from twisted.internet.defer import Deferred, DeferredLock, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .cluster import Busy, Cluster, RequestFailed, Unavailable
from .errors import ErrorCode, UploadError
from .storage import Record, Storage
from .upload import Upload

log = Logger()
REGISTRY_CHECK_SECONDS = 1.0  # how often Redis is pinged (its answer or its silence)
SHUTDOWN_HAND_ON_SECONDS = 10.0  # for an upload's bytes to reach the store at a stop


class Holder(Protocol):
    """What the coordinator needs of the manager (`manager.UploadManager`): the uploads
    held here, their storage and clock, and requests applied to them."""

    storage: Storage
    clock: IReactorTime
    max_idle: float

    def get(self, upload_id: str) -> Upload | None: ...

    def __iter__(self) -> Iterator[Upload]: ...

    def adopt(self, upload: Upload, idle_delay: float) -> None:
        """Hold the upload here, its idle clock running."""

    def drop(self, upload_id: str) -> Upload | None:
        """Hold it here no more: its timers and retries stop."""

    async def save_if_changed(self, upload: Upload) -> None: ...

    async def serve(self, op: str, upload_id: str, args: list[Any]) -> None:
        """Apply a request (an input of the upload's table) here."""

    def spawn(self, work: Coroutine[Any, Any, Any]) -> Deferred[Any]:
        """Run background work (awaited at shutdown, its failure logged)."""


class Coordinator:
    """The cluster side of an `UploadManager`: leases, take-up, let-go, the janitor."""

    def __init__(self, manager: Holder, cluster: Cluster) -> None:
        self.manager = manager
        self.cluster = cluster
        self.reachable = True  # Redis answered the last PING
        self._loading: dict[str, DeferredLock] = {}  # uploads being taken up from Redis
        self._unsent: set[str] = set()  # saved to disk, not yet to Redis (it was away)
        self._rounds: list[LoopingCall] = []
        cluster.serve = manager.serve

    # Tickets and uploads

    async def create(self, upload: Upload) -> None:
        """A state file in the shared directory (no journal: instances share it), and
        the record in Redis; nobody holds the new upload yet."""
        storage = self.manager.storage
        await storage.save_state(upload.id, upload.to_record())
        storage.forget(upload.id)  # no bookkeeping here for an upload not held here
        try:
            await _registry(self.cluster.create(upload.to_record(), upload.idle_deadline))
        except UploadError:  # Redis is away: the backend gets 503, and no ticket stays
            await storage.discard(upload.id)
            storage.forget(upload.id)
            raise

    async def find(self, upload_id: str) -> Upload | None:
        """A copy of an upload not held here, read from Redis, to look at."""
        record = await self._record(upload_id)
        if record is None:
            return None
        upload = Upload.from_record(record, 0)  # an upload past receiving shows its length
        if upload.receiving:
            stored, _ = await self.manager.storage.stored(upload_id)
            self.manager.storage.forget(upload_id)
            upload = Upload.from_record(record, stored)
        return upload

    async def hold(self, upload_id: str) -> Upload:
        """The upload taken up from Redis under its lease, or UploadError (unknown; held
        by another instance; Redis away)."""
        # One caller at a time takes it up; those waiting meanwhile find it held, or try
        # in turn and get their own refusal. (A Deferred awaited by several callers would
        # give its result to the first only: the others got None.)
        lock = self._loading.setdefault(upload_id, DeferredLock())
        await lock.acquire()
        try:
            return self.manager.get(upload_id) or await self._take_up(upload_id)
        finally:
            lock.release()
            if not lock.locked and self._loading.get(upload_id) is lock:
                del self._loading[upload_id]

    async def _take_up(self, upload_id: str) -> Upload:
        try:
            await _registry(self.cluster.acquire(upload_id))
        except Busy:
            raise UploadError(
                ErrorCode.ALREADY_CONNECTED, "another instance is serving this upload"
            ) from None
        record = await self._record(upload_id)
        if record is None:
            await _registry(self.cluster.release(upload_id))
            raise UploadError(ErrorCode.UNKNOWN_TICKET, "unknown upload ticket")
        stored, _ = await self.manager.storage.take_up(upload_id)
        upload = Upload.from_record(record, stored)
        self.manager.adopt(upload, upload.idle_deadline - self.manager.clock.seconds())
        return upload

    async def _record(self, upload_id: str) -> Record | None:
        """The record in Redis, or else in the shared directory (Redis lost it: it is
        put back). Instances with directories of their own (object storage) have none to
        look in: theirs may hold an older record."""
        try:
            UUID(upload_id)
        except ValueError:
            return None
        record: Record | None = await _registry(self.cluster.read(upload_id))
        if record is None and self.manager.storage.shared:
            record = await self.manager.storage.read_state(upload_id)
            if record is not None:
                upload = Upload.from_record(record, 0)
                await _registry(
                    self.cluster.save(record, upload.idle_deadline, upload.with_backend)
                )
        return record

    async def command(self, upload_id: str, op: str, args: list[Any]) -> None:
        """Apply a request where the upload is held: here, or at its holder."""
        for _attempt in range(2):
            if self.manager.get(upload_id) is None:
                holder = await _registry(self.cluster.holder(upload_id))
                if holder is not None and holder != self.cluster.instance:
                    try:
                        await self.cluster.request(holder, op, upload_id, args)
                    except RequestFailed as e:
                        raise UploadError(ErrorCode(e.code), e.message) from None
                    except Unavailable:
                        raise UploadError(
                            ErrorCode.REGISTRY_UNAVAILABLE, "the instance serving it is away"
                        ) from None
                    return
            try:
                await self.manager.serve(op, upload_id, args)
                return
            except UploadError as e:  # taken by another instance meanwhile: ask it
                if e.code is not ErrorCode.ALREADY_CONNECTED:
                    raise
        raise UploadError(ErrorCode.ALREADY_CONNECTED, "another instance is serving this upload")

    async def send(self, upload: Upload) -> None:
        """The upload's record to Redis (when it is away, again with the next renewal)."""
        try:
            await self.cluster.save(upload.to_record(), upload.idle_deadline, upload.with_backend)
            self._unsent.discard(upload.id)
        except Unavailable:
            self._unsent.add(upload.id)

    async def forget(self, upload_id: str) -> None:
        """The upload is gone: from Redis too."""
        self._unsent.discard(upload_id)
        with contextlib.suppress(Unavailable):  # the janitor finds it again
            await self.cluster.forget(upload_id)
            await self.cluster.release(upload_id)

    async def let_go(self, upload: Upload) -> None:
        """Once nothing here needs the upload (no connection, no writes, no handover):
        save it and release its lease, for any instance to take it up."""
        manager = self.manager
        await manager.storage.drain(upload.id)
        if manager.get(upload.id) is not upload or not idle(upload):
            return
        await manager.save_if_changed(upload)
        await self.send(upload)  # Redis has the latest before the lease goes
        try:  # and its bytes are where other instances find them (object storage)
            if upload.receiving:
                await manager.storage.let_go(upload.id, upload.stored)
        except OSError as e:
            log.error("upload {id}: cannot hand its bytes on: {e}", id=upload.id, e=e)
            return  # it stays here
        still = manager.get(upload.id) is upload and idle(upload)
        if upload.id in self._unsent or not still:
            return  # Redis is away (the next renewal tries again), or it is in use again
        manager.drop(upload.id)
        manager.storage.leave(upload.id)
        with contextlib.suppress(Unavailable):  # it lapses by itself
            await self.cluster.release(upload.id)

    # The rounds: leases, the janitor, Redis's health

    def start(self) -> None:
        self.cluster.start()
        period = self.cluster.lease_ms / 3000
        for work, every in (
            (self._renew, period),
            (self._janitor_round, period),
            (self._check_registry, REGISTRY_CHECK_SECONDS),
        ):
            call = LoopingCall(lambda work=work: self.manager.spawn(work()))
            call.clock = self.manager.clock
            call.start(every, now=False)
            self._rounds.append(call)

    def stop_rounds(self) -> None:
        for call in self._rounds:
            if call.running:
                call.stop()

    async def leave(self) -> None:
        """At shutdown: Redis gets the latest of every upload held here, whose leases are
        released, for other instances to carry on at once."""
        for upload in self.manager:
            await self._hand_on(upload)
            with contextlib.suppress(Unavailable):
                await self.send(upload)
                await self.cluster.release(upload.id)
        await self.cluster.stop()

    async def _hand_on(self, upload: Upload) -> None:
        """At a stop: the upload's bytes where other instances find them, if that can be
        done soon (object storage); else they wait in this spool for its restart."""
        if not upload.receiving:
            return
        try:
            let_go = self.manager.storage.let_go(upload.id, upload.stored)
            await let_go.addTimeout(SHUTDOWN_HAND_ON_SECONDS, self.manager.clock)
        except (OSError, TimeoutError) as e:
            log.warn("upload {id}: its bytes stay in this spool: {e}", id=upload.id, e=e)

    async def _check_registry(self) -> None:
        """Whether Redis answers, whatever this instance holds (for /incoming/health)."""
        reachable = await self.cluster.reachable()
        if reachable != self.reachable:
            if reachable:
                log.info("Redis is back")
            else:
                log.warn("Redis is unavailable; uploads being written carry on")
        self.reachable = reachable

    async def _renew(self) -> None:
        """Renew the leases of the uploads held here, with their idle deadlines, and send
        Redis what it missed while it was away; drop uploads another instance took."""
        deadlines = {upload.id: upload.idle_deadline for upload in self.manager}
        try:
            lost = await self.cluster.renew(list(deadlines), deadlines)
            for upload_id in list(self._unsent):
                upload = self.manager.get(upload_id)
                if upload is not None:
                    await self.send(upload)
        except Unavailable:
            return
        for upload_id in lost:
            upload = self.manager.drop(upload_id)
            self._unsent.discard(upload_id)
            if upload is not None:
                log.error("upload {id}: another instance took it over", id=upload_id)
                if upload.transport is not None:
                    upload.transport.going_away()
        for upload in self.manager:
            if idle(upload):  # one that Redis's absence kept here
                self.manager.spawn(self.let_go(upload))

    async def _janitor_round(self) -> None:
        """One instance at a time: expire idle uploads nobody holds, and take up
        handovers (or waits for finish_upload) whose instance died."""
        try:
            if not await self.cluster.janitor():
                return
            if not await self.cluster.populated():
                await self._repopulate()
            now = self.manager.clock.seconds()
            for upload_id in await self.cluster.due(now):
                await self._janitor_duty(self._janitor_expire(upload_id, now), upload_id)
            for upload_id in await self.cluster.handovers():
                if (
                    self.manager.get(upload_id) is None
                    and await self.cluster.holder(upload_id) is None
                ):
                    await self._janitor_duty(self._janitor_take_up(upload_id), upload_id)
        except Unavailable:
            return

    async def _janitor_duty(self, work: Coroutine[Any, Any, None], upload_id: str) -> None:
        """One upload's work: a record it cannot read must not stop the others'."""
        try:
            await work
        except Unavailable:
            raise
        except Exception:
            log.failure("janitor: upload {id} skipped", id=upload_id)

    async def _repopulate(self) -> None:
        """Redis is new, or lost its data: put back the records of the shared directory
        (the tickets' state files), then say it holds them."""
        if not self.manager.storage.shared:  # each instance's directory holds records of
            await self.cluster.mark_populated()  # its own, older ones too: none is put back
            log.error("Redis lost its records: uploads under way are lost (object storage "
                      "keeps no shared directory to rebuild them from)")  # fmt: skip
            return
        saved = await self.manager.storage.saved()
        for found in saved:
            upload = Upload.from_record(found.record, found.stored)
            await self.cluster.save(found.record, upload.idle_deadline, upload.with_backend)
        await self.cluster.mark_populated()
        log.info("Redis holds the records of {n} uploads of the shared directory", n=len(saved))

    async def _janitor_expire(self, upload_id: str, now: float) -> None:
        if self.manager.get(upload_id) is not None:
            return  # its own idle timer runs here
        try:
            upload = await self.hold(upload_id)
        except UploadError as e:
            if e.code is ErrorCode.UNKNOWN_TICKET:
                with contextlib.suppress(Unavailable):
                    await self.cluster.forget(upload_id)
            return  # held by another instance: its timer runs there
        if upload.idle_deadline <= now:
            upload.life.idle_timeout(self.manager.max_idle)
        self.manager.spawn(self.let_go(upload))  # (a later deadline: Redis had an old one)

    async def _janitor_take_up(self, upload_id: str) -> None:
        try:
            upload = await self.hold(upload_id)
        except UploadError:
            return
        _, present = await self.manager.storage.stored(upload_id)
        log.info("upload {id}: taking up its handover", id=upload_id)
        upload.life.restored(present)
        self.manager.spawn(self.let_go(upload))


async def _registry(call: Coroutine[Any, Any, Any]) -> Any:
    """A Redis call; Redis away is an UploadError the client hears."""
    try:
        return await call
    except Unavailable:
        raise UploadError(
            ErrorCode.REGISTRY_UNAVAILABLE, "the upload registry is unavailable; try again"
        ) from None


def idle(upload: Upload) -> bool:
    """Nothing of this instance's is needed: no connection, no write, no handover."""
    return upload.transport is None and not upload.pending and not upload.with_backend
