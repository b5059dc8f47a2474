"""Runs the uploads: wires each upload's table (`upload`) to disk, backend and clock.

It performs the effects an upload's life asks for and reports their results back
as inputs; every decision about an upload's phase is the table's. Each change
is saved with the upload's state, and `restore` takes every upload up again
after a restart.

With a `Cluster` (several instances on one Redis) it holds only the uploads this
instance acts on, each under its lease: `hold` takes one up from Redis, and it is
let go (saved, lease released) once nothing here needs it. A request for an upload
held elsewhere goes to its holder (`command`).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Coroutine, Iterator
from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred, DeferredLock, TimeoutError, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from .cluster import Busy, Cluster, RequestFailed, Unavailable
from .errors import ErrorCode, UploadError, clipped
from .files import Chunk, Digest
from .handover import Answer, BackendAway, Handover, HandoverFailed, Retrier, Stopped
from .metrics import Metrics
from .objectstore import StoreUnavailable
from .storage import Record, Storage, Vanished, no_space
from .upload import (
    Cause,
    Event,
    Phase,
    Room,
    Transport,
    Upload,
    bring_to_life,
    new_ticket_id,
)

log = Logger()
# What another instance may ask the holder of an upload to do: the name of the input.
COMMANDS = frozenset({"cancel_by_backend", "finish_upload", "cancel_by_client", "declare"})
REGISTRY_CHECK_SECONDS = 1.0  # cluster: how often Redis is pinged (its answer or its silence)


class UploadManager:
    """Every upload the server knows, by ticket, and the I/O their tables ask for."""

    def __init__(
        self,
        storage: Storage,
        handover: Handover,
        clock: IReactorTime,
        metrics: Metrics,
        *,
        max_idle: float,
        confirm_timeout: float,
        max_upload: int | None = None,
        cluster: Cluster | None = None,
        min_free: int = 0,
        handover_timeout: float = 55.0,
        handover_retry: float = 86400.0,
    ) -> None:
        self.storage = storage
        self.handover = handover
        self.clock = clock
        self.metrics = metrics
        self.max_idle = max_idle
        self.confirm_timeout = confirm_timeout
        self.max_upload = max_upload
        self.min_free = min_free  # new tickets need this much free storage (a chunk)
        self.handover_timeout = handover_timeout
        self.retrier = Retrier(clock, handover_retry, metrics)  # for a backend that is away
        self._uploads: dict[str, Upload] = {}
        self._idle: dict[str, IDelayedCall] = {}
        self._confirm: dict[str, IDelayedCall] = {}
        self._late: dict[str, IDelayedCall] = {}  # HandoverTimeoutS after a handover began
        self._unsaved: set[str] = set()  # uploads changed since their state was last saved
        self.running: set[Deferred[Any]] = set()  # background work, for shutdown and tests
        metrics.count_uploads(self.phases)
        metrics.handovers_pending.set_function(
            lambda: sum(upload.handover_pending for upload in self._uploads.values())
        )
        self.cluster = cluster
        self._loading: dict[str, DeferredLock] = {}  # uploads being taken up from Redis
        self._answers: dict[str, list[Deferred[None]]] = {}  # waiting for a handover's answer
        self._unsent: set[str] = set()  # saved to disk, not yet to Redis (it was away)
        self._rounds: list[LoopingCall] = []
        self.registry_reachable = True  # cluster: Redis answered the last PING
        if cluster is not None:
            cluster.serve = self._serve

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> Deferred[Any]:
        d = ensureDeferred(work)
        self.running.add(d)

        def done(result: object) -> object:
            self.running.discard(d)
            return result

        d.addBoth(done)
        d.addErrback(lambda f: log.failure("background upload work failed", f))
        return d

    # Tickets

    async def create(self, signal_finish_url: str, backend_secret: str, remove: bool) -> Upload:
        """A new ticket, in the journal (durably) before anybody hears of it."""
        if self.storage.free_bytes() < self.min_free:
            raise UploadError(ErrorCode.STORAGE_FULL, "the storage is full; try again later")
        upload = Upload(new_ticket_id(), signal_finish_url, backend_secret, remove)
        if self.cluster is not None:
            return await self._create_shared(upload)
        bring_to_life(upload, self)
        self._uploads[upload.id] = upload
        self._arm_idle(upload, self.max_idle)
        try:
            await self.storage.record_ticket(upload.id, upload.to_record())
        except OSError:
            del self._uploads[upload.id]
            self._idle.pop(upload.id).cancel()
            raise
        self.metrics.tickets_created.inc()
        return upload

    async def _create_shared(self, upload: Upload) -> Upload:
        """Cluster: a state file in the shared directory (no journal: instances share it),
        and the record in Redis; nobody holds the new upload yet."""
        assert self.cluster is not None
        upload.idle_deadline = self.clock.seconds() + self.max_idle
        record = upload.to_record()
        await self.storage.save_state(upload.id, record)
        self.storage.forget(upload.id)  # no bookkeeping here for an upload not held here
        try:
            await self._registry(self.cluster.create(record, upload.idle_deadline))
        except UploadError:  # Redis is away: the backend gets 503, and no ticket stays
            await self.storage.discard(upload.id)
            self.storage.forget(upload.id)
            raise
        self.metrics.tickets_created.inc()
        return upload

    def get(self, upload_id: str) -> Upload | None:
        """An upload this process holds (one process: every upload)."""
        return self._uploads.get(upload_id)

    async def find(self, upload_id: str) -> Upload | None:
        """The upload, to look at: the one held here, or (cluster) a copy read from Redis."""
        upload = self._uploads.get(upload_id)
        if upload is not None or self.cluster is None:
            return upload
        record = await self._record(upload_id)
        if record is None:
            return None
        upload = Upload.from_record(record, 0)  # an upload past receiving shows its length
        if upload.receiving:
            stored, _ = await self.storage.stored(upload_id)
            self.storage.forget(upload_id)
            upload = Upload.from_record(record, stored)
        return upload

    async def answered(self, upload_id: str, within: float) -> Upload | None:
        """The upload once the backend answered its handover (if one runs), or as it stands
        after `within` seconds: a client asking where it stands learns the outcome."""
        deadline = self.clock.seconds() + within
        while True:
            upload = await self.find(upload_id)
            left = deadline - self.clock.seconds()
            if upload is None or not upload.awaiting_answer or left <= 0:
                return upload
            if upload_id in self._uploads:  # the handover runs here: wait for its answer
                answer: Deferred[None] = Deferred()
                self._answers.setdefault(upload_id, []).append(answer)
                with contextlib.suppress(TimeoutError):
                    await answer.addTimeout(left, self.clock)
            else:  # another instance hands it over: look again
                await deferLater(self.clock, min(left, 0.5), lambda: None)

    async def hold(self, upload_id: str) -> Upload:
        """The upload, to act on: held here (cluster: under its lease, taken up from
        Redis), or UploadError (unknown; held by another instance; Redis away)."""
        upload = self._uploads.get(upload_id)
        if upload is not None:
            return upload
        if self.cluster is None:
            raise UploadError(ErrorCode.UNKNOWN_TICKET, "unknown upload ticket")
        # One caller at a time takes it up; those waiting meanwhile find it held, or try
        # in turn and get their own refusal. (A Deferred awaited by several callers would
        # give its result to the first only: the others got None.)
        lock = self._loading.setdefault(upload_id, DeferredLock())
        await lock.acquire()
        try:
            return self._uploads.get(upload_id) or await self._take_up(upload_id)
        finally:
            lock.release()
            if not lock.locked and self._loading.get(upload_id) is lock:
                del self._loading[upload_id]

    async def _take_up(self, upload_id: str) -> Upload:
        assert self.cluster is not None
        try:
            await self._registry(self.cluster.acquire(upload_id))
        except Busy:
            raise UploadError(
                ErrorCode.ALREADY_CONNECTED, "another instance is serving this upload"
            ) from None
        record = await self._record(upload_id)
        if record is None:
            await self._registry(self.cluster.release(upload_id))
            raise UploadError(ErrorCode.UNKNOWN_TICKET, "unknown upload ticket")
        stored, _ = await self.storage.take_up(upload_id)
        upload = Upload.from_record(record, stored)
        bring_to_life(upload, self)
        self._uploads[upload_id] = upload
        self._arm_idle(upload, upload.idle_deadline - self.clock.seconds())
        return upload

    async def _record(self, upload_id: str) -> Record | None:
        """Cluster: the record in Redis, or else in the shared directory (Redis lost it:
        it is put back). Instances with directories of their own (object storage) have
        none to look in: theirs may hold an older record."""
        assert self.cluster is not None
        try:
            UUID(upload_id)
        except ValueError:
            return None
        record: Record | None = await self._registry(self.cluster.read(upload_id))
        if record is None and self.storage.shared:
            record = await self.storage.read_state(upload_id)
            if record is not None:
                upload = Upload.from_record(record, 0)
                await self._registry(
                    self.cluster.save(record, upload.idle_deadline, upload.with_backend)
                )
        return record

    async def _registry(self, call: Coroutine[Any, Any, Any]) -> Any:
        try:
            return await call
        except Unavailable:
            raise UploadError(
                ErrorCode.REGISTRY_UNAVAILABLE, "the upload registry is unavailable; try again"
            ) from None

    async def command(self, upload_id: str, op: str, *args: Any) -> None:
        """Apply a request (an input of the upload's table: `COMMANDS`) where the upload
        is held, and return once its disk work is done; raises its UploadError."""
        assert op in COMMANDS
        for _attempt in range(2):
            if self.cluster is not None and upload_id not in self._uploads:
                holder = await self._registry(self.cluster.holder(upload_id))
                if holder is not None and holder != self.cluster.instance:
                    try:
                        await self.cluster.request(holder, op, upload_id, list(args))
                    except RequestFailed as e:
                        raise UploadError(ErrorCode(e.code), e.message) from None
                    except Unavailable:
                        raise UploadError(
                            ErrorCode.REGISTRY_UNAVAILABLE, "the instance serving it is away"
                        ) from None
                    return
            try:
                await self._serve(op, upload_id, list(args))
                return
            except UploadError as e:  # taken by another instance meanwhile: ask it
                if e.code is not ErrorCode.ALREADY_CONNECTED or self.cluster is None:
                    raise
        raise UploadError(ErrorCode.ALREADY_CONNECTED, "another instance is serving this upload")

    async def _serve(self, op: str, upload_id: str, args: list[Any]) -> None:
        """Apply a request here (for `command`, or from another instance)."""
        if op not in COMMANDS:
            raise UploadError(ErrorCode.UNEXPECTED_MESSAGE, f"no such request {op!r}")
        upload = await self.hold(upload_id)
        try:
            if op == "declare":
                metadata = str(args[2]) if len(args) > 2 else ""  # older instances send none
                upload.life.declare(int(args[0]), str(args[1]), self.room(), metadata)
            else:
                getattr(upload.life, op)(*args)
        finally:
            await self.storage.drain(upload.id)
            self._let_go_soon(upload)

    def lookup(self, upload_id: str) -> Upload:
        upload = self._uploads.get(upload_id)
        if upload is None:
            raise UploadError(ErrorCode.UNKNOWN_TICKET, "unknown upload ticket")
        return upload

    def __iter__(self) -> Iterator[Upload]:
        return iter(list(self._uploads.values()))

    def __len__(self) -> int:
        return len(self._uploads)

    def phases(self) -> Counter[Phase]:
        return Counter(upload.phase for upload in self._uploads.values())

    def restore(self) -> None:
        """Take up every upload saved by an earlier run (at start-up). Uploads with work
        at stake get a line each; the others are counted."""
        now = self.clock.seconds()
        found: Counter[str] = Counter()
        for saved in self.storage.load():
            try:
                upload = Upload.from_record(saved.record, saved.stored)
            except (KeyError, ValueError, TypeError) as e:
                log.error("ignoring saved upload {r!r}: {e}", r=saved.record.get("id"), e=e)
                continue
            bring_to_life(upload, self)
            self._uploads[upload.id] = upload
            if saved.modified is not None:
                # State is saved at connects, not at every chunk: the file shows activity.
                upload.idle_deadline = max(upload.idle_deadline, saved.modified + self.max_idle)
            self._arm_idle(upload, upload.idle_deadline - now)
            found[_restored(upload)] += 1
            if upload.receiving and upload.length is not None:
                log.info(
                    "upload {id} restored: {n} of {length} bytes stored",
                    id=upload.id,
                    n=upload.stored,
                    length=upload.length,
                )
            elif upload.with_backend:
                log.info("upload {id} restored: {what}", id=upload.id, what=_restored(upload))
            upload.life.restored(saved.present)
        log.info(
            "restored {n} uploads: {counts}",
            n=sum(found.values()),
            counts=", ".join(f"{count} {what}" for what, count in sorted(found.items())) or "none",
        )

    # Connections (for transports)

    async def connect(self, upload_id: str, transport: Transport, length: int, name: str) -> Upload:
        """Attach a connection to its upload, or raise UploadError."""
        upload = await self.hold(upload_id)
        try:
            upload.life.connect(transport, length, name, self.room())
        except UploadError:
            self._let_go_soon(upload)
            raise
        return upload

    def room(self) -> Room:
        """How large a new upload may be, now."""
        return Room(self.storage.free_bytes(), self.max_upload)

    async def resume_position(self, upload: Upload) -> int:
        """Bytes stored durably, once every write still in flight (an earlier connection's)
        landed and was synced (a restart syncs what an earlier process wrote); raises
        UploadError if the storage fails meanwhile."""
        await self.storage.drain(upload.id)
        if upload.receiving:
            try:
                await self.storage.synced(upload.id, upload.stored)
            except OSError as e:
                raise _waits(e) or UploadError(ErrorCode.STORAGE_FAILED, "storage failed") from None
        return upload.offset

    async def settled(self, upload: Upload) -> None:
        """Fires once the disk work the upload's last input asked for has been done."""
        await self.storage.drain(upload.id)

    # Effects (upload.Effects)

    def write(self, upload: Upload, offset: int, data: Chunk, digests: tuple[Digest, ...]) -> None:
        """Write, then wait for the bytes to be durable (the storage groups the syncs).
        Results for writes queued before the file was cut (a new `era`) are dropped."""
        if self._abandoned(upload):
            return
        self.metrics.bytes_received.inc(len(data))
        arrived, era, end = self.clock.seconds(), upload.era, offset + len(data)

        def written(_: None) -> None:
            if upload.era == era:
                self.metrics.chunk_write_seconds.observe(self.clock.seconds() - arrived)
                upload.life.written()
                self.storage.synced(upload.id, end).addCallbacks(durable, failed)

        def durable(_: None) -> None:
            if upload.era == era:
                upload.life.synced(end)

        def failed(failure: Any) -> None:
            if upload.era != era:
                return
            waits = _waits(failure.value)
            if waits is not None:
                upload.life.storage_unavailable(waits)
            else:
                upload.life.storage_failed(f"cannot write: {failure.value}")

        self.storage.write(upload.id, offset, data, digests).addCallbacks(written, failed)

    def stands(self, upload: Upload) -> None:
        if self._abandoned(upload):
            return
        self.storage.firm(upload.id, upload.firm, upload.length)

    def touch(self, upload: Upload) -> None:
        if self._abandoned(upload):
            return
        self._arm_idle(upload, self.max_idle)
        self._unsaved.add(upload.id)

    def save(self, upload: Upload, durable: bool = False) -> Deferred[None]:
        """Save, logging a failure; later disk work for this upload queues behind it.
        Cluster: in Redis too (when it is away, again with the next renewal)."""
        if self._abandoned(upload):
            return succeed(None)
        if not upload.awaiting_answer:  # each phase is saved: those waiting for it hear
            for answer in self._answers.pop(upload.id, []):
                answer.callback(None)
        if not upload.handing_over:
            self._handover_over(upload.id)
        self._unsaved.discard(upload.id)
        if self.cluster is not None:
            self._spawn(self._send(upload))

        def failed(failure: Any) -> None:
            log.error("upload {id}: cannot save state: {e}", id=upload.id, e=failure.value)

        d = self.storage.save_state(upload.id, upload.to_record(), durable)
        return d.addErrback(failed)

    async def _send(self, upload: Upload) -> None:
        assert self.cluster is not None
        try:
            await self.cluster.save(upload.to_record(), upload.idle_deadline, upload.with_backend)
            self._unsent.discard(upload.id)
        except Unavailable:
            self._unsent.add(upload.id)

    def release(self, upload: Upload) -> None:
        if self._abandoned(upload):
            return
        self.storage.release(upload.id)
        self._let_go_soon(upload)

    def hand_over(self, upload: Upload) -> None:
        if self._abandoned(upload):
            return
        self._spawn(self._hand_over(upload))

    async def _hand_over(self, upload: Upload) -> None:
        try:
            completed = await self.storage.complete(upload.id)
        except Vanished:  # the backend took it: it answered; we died before saving that
            upload.life.answered_done(upload.result)
            return
        except OSError as e:
            upload.life.storage_failed(f"cannot complete the file: {e}")
            return
        upload.sha256 = completed.sha256
        if upload.handover_began is None:  # (an older version's record)
            upload.handover_began = self.clock.seconds()
        began = upload.handover_began
        self._arm_late(upload, began)

        def post() -> Coroutine[Any, Any, Answer]:
            return self.handover.hand_over(
                upload, completed.filename, completed.sha256, completed.fields
            )

        def go_on() -> bool:
            if self._abandoned(upload):
                return False
            upload.life.handover_retrying()
            return upload.handing_over

        try:
            answer = await self.retrier.run(upload.id, "handover", post, began, go_on)
        except Stopped:
            return
        except (HandoverFailed, BackendAway) as e:
            self.metrics.handover_failures.inc()
            upload.life.handover_failed(str(e))
            return
        self.metrics.handover_seconds.observe(self.clock.seconds() - began)
        if answer.kind == "done":
            upload.life.answered_done(answer.result)
        else:
            upload.life.answered_wait()

    def _arm_late(self, upload: Upload, began: float) -> None:
        """`handover_late` HandoverTimeoutS after the handover's first attempt."""
        earlier = self._late.pop(upload.id, None)
        if earlier is not None and earlier.active():
            earlier.cancel()
        delay = max(began + self.handover_timeout - self.clock.seconds(), 0)
        self._late[upload.id] = self.clock.callLater(delay, upload.life.handover_late)

    def _handover_over(self, upload_id: str) -> None:
        """The upload is no longer being handed over (here): no more attempts or timer."""
        timer = self._late.pop(upload_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        self.retrier.stop(upload_id, "handover")

    def finalize(self, upload: Upload) -> None:
        if self._abandoned(upload):
            return
        self._spawn(self._finalize(upload))

    async def _finalize(self, upload: Upload) -> None:
        await self.save(upload, durable=True)
        if upload.remove_file_when_finished:
            await self._remove_file(upload)
        upload.life.finalized()
        self._let_go_soon(upload)

    def discard_file(self, upload: Upload) -> None:
        if self._abandoned(upload):
            return
        self._spawn(self._discard_file(upload))

    async def _discard_file(self, upload: Upload) -> None:
        await self._remove_file(upload)
        notice = upload.notice
        if notice is not None:

            def post() -> Coroutine[Any, Any, None]:
                return self.handover.notify_cancelled(upload, notice)

            def go_on() -> bool:
                return not self._abandoned(upload)

            began = upload.notice_began or self.clock.seconds()
            try:
                await self.retrier.run(upload.id, "cancel notice", post, began, go_on)
            except Stopped:
                return
            except BackendAway as e:
                log.warn(
                    "upload {id}: backend not told of the cancellation: {e}", id=upload.id, e=e
                )
            upload.life.notified()
        self._let_go_soon(upload)

    async def _remove_file(self, upload: Upload) -> None:
        try:
            await self.storage.remove(upload.id)
        except OSError as e:
            log.error("upload {id}: cannot remove file: {e}", id=upload.id, e=e)

    def arm_confirm(self, upload: Upload) -> None:
        if self._abandoned(upload):
            return
        now = self.clock.seconds()
        if upload.confirm_deadline is None:
            upload.confirm_deadline = now + self.confirm_timeout
        delay = max(upload.confirm_deadline - now, 0)
        self._confirm[upload.id] = self.clock.callLater(
            delay, upload.life.confirm_timeout, self.confirm_timeout
        )

    def disarm_confirm(self, upload: Upload) -> None:
        if self._abandoned(upload):
            return
        upload.confirm_deadline = None
        timer = self._confirm.pop(upload.id, None)
        if timer is not None and timer.active():
            timer.cancel()

    def truncate(self, upload: Upload, size: int) -> None:
        if self._abandoned(upload):
            return
        self.storage.truncate(upload.id, size).addErrback(
            lambda f: log.error("upload {id}: cannot truncate: {e}", id=upload.id, e=f.value)
        )

    def forget(self, upload: Upload) -> None:
        if self._abandoned(upload):
            return
        self._uploads.pop(upload.id, None)
        self._unsaved.discard(upload.id)
        self._unsent.discard(upload.id)
        self._spawn(self._forget(upload))

    async def _forget(self, upload: Upload) -> None:
        await self.storage.discard(upload.id)
        self.storage.forget(upload.id)
        if self.cluster is not None:
            with contextlib.suppress(Unavailable):  # the janitor finds it again
                await self.cluster.forget(upload.id)
                await self.cluster.release(upload.id)
        log.info("upload {id} forgotten", id=upload.id)

    def happened(
        self, upload: Upload, event: Event, detail: str = "", cause: Cause | None = None
    ) -> None:
        """A line in the log and the metrics for it; the start of an upload, and of its
        handover, are noted in it (clock times, saved with it: durations count from there)."""
        if self._abandoned(upload):
            return
        now, via, metrics = self.clock.seconds(), upload.via or "none", self.metrics
        if event is Event.STARTED:
            upload.started_at = now
            metrics.uploads_started.labels(via).inc()
            log.info(
                "upload {id} started over {via}: {name!r}, {length} bytes",
                id=upload.id,
                via=via,
                name=clipped(upload.browser_name),
                length=upload.length,
            )
        elif event in (Event.PAUSED, Event.INTERRUPTED, Event.RESUMED):
            log.info(
                "upload {id} {event} at {n} of {length} bytes{over}",
                id=upload.id,
                event=event.value,
                n=upload.received,
                length=upload.length,
                over=f" over {via}" if event is Event.RESUMED else "",
            )
        elif event is Event.COMPLETE:
            upload.handover_began = now  # saved with the phase: a restart keeps the budget
            took = None if upload.started_at is None else max(now - upload.started_at, 0.0)
            if took is not None:
                metrics.upload_seconds.observe(took)
            log.info(
                "upload {id} complete: {n} bytes stored{took}",
                id=upload.id,
                n=upload.stored,
                took="" if took is None else f" in {took:.1f} s",
            )
        elif event is Event.PENDING:
            log.info(
                "upload {id}: no answer from the backend within {t:g} s; the client is told "
                "the file is stored and will be handed over",
                id=upload.id,
                t=self.handover_timeout,
            )
        elif event is Event.HANDED_OVER:
            log.info("upload {id} handed over; the backend will call finish_upload", id=upload.id)
        elif event is Event.FINISHED:
            metrics.uploads_finished.labels(via).inc()
            metrics.upload_bytes.observe(upload.length or 0)
            log.info("upload {id} {how}", id=upload.id, how=detail)
        else:
            assert event is Event.CANCELLED and cause is not None
            if upload.notice is not None:
                upload.notice_began = now  # saved with the phase: a restart keeps the budget
            metrics.uploads_cancelled.labels(cause.value, via).inc()
            say = {
                Cause.STORAGE_FAILED: log.error,
                Cause.HANDOVER_FAILED: log.warn,
                Cause.CONFIRM_TIMEOUT: log.warn,
            }
            say.get(cause, log.info)(
                "upload {id} {what} ({cause}){detail}",
                id=upload.id,
                what="expired" if cause is Cause.IDLE else "cancelled",
                cause=cause.value,
                detail=f": {clipped(detail)}" if detail else "",
            )

    # Cluster: letting go of uploads, renewing leases, the janitor

    def _abandoned(self, upload: Upload) -> bool:
        """Cluster: an upload no longer held here (taken over by another instance, whose
        lease it is now) is inert: no write, save, timer or handover of ours touches it."""
        return self.cluster is not None and self._uploads.get(upload.id) is not upload

    def _let_go_soon(self, upload: Upload) -> None:
        if self.cluster is not None:
            self._spawn(self._let_go(upload))

    async def _let_go(self, upload: Upload) -> None:
        """Once nothing here needs the upload (no connection, no writes, no handover):
        save it and release its lease, for any instance to take it up."""
        assert self.cluster is not None
        await self.storage.drain(upload.id)
        if self._uploads.get(upload.id) is not upload or not _idle(upload):
            return
        if upload.id in self._unsaved:
            await self.save(upload)
        await self._send(upload)  # Redis has the latest before the lease goes
        try:  # and its bytes are where other instances find them (object storage)
            if upload.receiving:
                await self.storage.let_go(upload.id, upload.stored)
        except OSError as e:
            log.error("upload {id}: cannot hand its bytes on: {e}", id=upload.id, e=e)
            return  # it stays here
        still = self._uploads.get(upload.id) is upload and _idle(upload)
        if upload.id in self._unsent or not still:
            return  # Redis is away (the next renewal tries again), or it is in use again
        del self._uploads[upload.id]
        for timers in (self._idle, self._confirm):
            timer = timers.pop(upload.id, None)
            if timer is not None and timer.active():
                timer.cancel()
        self.storage.leave(upload.id)
        with contextlib.suppress(Unavailable):  # it lapses by itself
            await self.cluster.release(upload.id)

    def start(self) -> None:
        """Take up saved uploads (one process), or start renewing leases (cluster)."""
        if self.cluster is None:
            self.restore()
            return
        self.cluster.start()
        period = self.cluster.lease_ms / 3000
        for work, every in (
            (self._renew, period),
            (self._janitor_round, period),
            (self._check_registry, REGISTRY_CHECK_SECONDS),
        ):
            call = LoopingCall(lambda work=work: self._spawn(work()))
            call.clock = self.clock
            call.start(every, now=False)
            self._rounds.append(call)

    async def _hand_on(self, upload: Upload) -> None:
        """At a stop: the upload's bytes where other instances find them, if that can be
        done soon (object storage); else they wait in this spool for its restart."""
        if not upload.receiving:
            return
        try:
            let_go = self.storage.let_go(upload.id, upload.stored)
            await let_go.addTimeout(SHUTDOWN_HAND_ON_SECONDS, self.clock)
        except (OSError, TimeoutError) as e:
            log.warn("upload {id}: its bytes stay in this spool: {e}", id=upload.id, e=e)

    async def _check_registry(self) -> None:
        """Whether Redis answers, whatever this instance holds (for /incoming/health)."""
        assert self.cluster is not None
        reachable = await self.cluster.reachable()
        if reachable != self.registry_reachable:
            if reachable:
                log.info("Redis is back")
            else:
                log.warn("Redis is unavailable; uploads being written carry on")
        self.registry_reachable = reachable

    async def _renew(self) -> None:
        """Renew the leases of the uploads held here, with their idle deadlines, and send
        Redis what it missed while it was away; drop uploads another instance took."""
        assert self.cluster is not None
        held = list(self._uploads.values())
        deadlines = {upload.id: upload.idle_deadline for upload in held}
        try:
            lost = await self.cluster.renew(list(deadlines), deadlines)
            for upload_id in list(self._unsent):
                upload = self._uploads.get(upload_id)
                if upload is not None:
                    await self._send(upload)
        except Unavailable:
            return
        for upload_id in lost:
            upload = self._uploads.pop(upload_id, None)
            if upload is not None:
                log.error("upload {id}: another instance took it over", id=upload_id)
                self._handover_over(upload_id)
                self.retrier.stop(upload_id, "cancel notice")
                for timers in (self._idle, self._confirm):
                    timer = timers.pop(upload_id, None)
                    if timer is not None and timer.active():
                        timer.cancel()
                self._unsaved.discard(upload_id)
                self._unsent.discard(upload_id)
                if upload.transport is not None:
                    upload.transport.going_away()
        for upload in list(self._uploads.values()):
            if _idle(upload):  # one that Redis's absence kept here
                self._let_go_soon(upload)

    async def _janitor_round(self) -> None:
        """One instance at a time: expire idle uploads nobody holds, and take up
        handovers (or waits for finish_upload) whose instance died."""
        assert self.cluster is not None
        try:
            if not await self.cluster.janitor():
                return
            if not await self.cluster.populated():
                await self._repopulate()
            now = self.clock.seconds()
            for upload_id in await self.cluster.due(now):
                await self._janitor_duty(self._janitor_expire(upload_id, now), upload_id)
            for upload_id in await self.cluster.handovers():
                if upload_id not in self._uploads and await self.cluster.holder(upload_id) is None:
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
        assert self.cluster is not None
        if not self.storage.shared:  # each instance's directory holds records of its own,
            await self.cluster.mark_populated()  # older ones too: none is put back
            log.error("Redis lost its records: uploads under way are lost (object storage "
                      "keeps no shared directory to rebuild them from)")  # fmt: skip
            return
        saved = await self.storage.saved()
        for found in saved:
            upload = Upload.from_record(found.record, found.stored)
            await self.cluster.save(found.record, upload.idle_deadline, upload.with_backend)
        await self.cluster.mark_populated()
        log.info("Redis holds the records of {n} uploads of the shared directory", n=len(saved))

    async def _janitor_expire(self, upload_id: str, now: float) -> None:
        if upload_id in self._uploads:
            return  # its own idle timer runs here
        try:
            upload = await self.hold(upload_id)
        except UploadError as e:
            if e.code is ErrorCode.UNKNOWN_TICKET:
                with contextlib.suppress(Unavailable):
                    await self.cluster.forget(upload_id)  # type: ignore[union-attr]
            return  # held by another instance: its timer runs there
        if upload.idle_deadline > now:
            self._let_go_soon(upload)  # Redis had an old deadline
            return
        upload.life.idle_timeout(self.max_idle)
        self._let_go_soon(upload)

    async def _janitor_take_up(self, upload_id: str) -> None:
        try:
            upload = await self.hold(upload_id)
        except UploadError:
            return
        stored, present = await self.storage.stored(upload_id)
        log.info("upload {id}: taking up its handover", id=upload_id)
        upload.life.restored(present)
        self._let_go_soon(upload)

    # The idle clock

    def _arm_idle(self, upload: Upload, delay: float) -> None:
        delay = max(delay, 0)
        upload.idle_deadline = self.clock.seconds() + delay
        timer = self._idle.get(upload.id)
        if timer is not None and timer.active():
            timer.reset(delay)
        else:
            self._idle[upload.id] = self.clock.callLater(delay, self._idle_timeout, upload)

    def _idle_timeout(self, upload: Upload) -> None:
        del self._idle[upload.id]
        upload.life.idle_timeout(self.max_idle)

    async def shutdown(self) -> None:
        """Stop timers, send clients away and let queued disk work land.

        Only what changed since it was saved is saved again (never-used tickets are
        in the journal); `restore` carries on from there at the next start. Cluster:
        the leases are released, for other instances to carry on at once.
        """
        for call in self._rounds:
            if call.running:
                call.stop()
        self.retrier.stop_all()  # handovers and notices are posted again at the next start
        for timer in [*self._idle.values(), *self._confirm.values(), *self._late.values()]:
            if timer.active():
                timer.cancel()
        self._idle.clear()
        self._confirm.clear()
        self._late.clear()
        for upload in self:
            if upload.transport is not None:
                upload.transport.going_away()
        await self.storage.drain_all()
        await self.storage.drain_all()  # and what the landed writes queued (a voided body)
        for upload_id in list(self._unsaved):
            changed = self._uploads.get(upload_id)
            if changed is not None:
                await self.save(changed)
        if self.cluster is not None:
            for upload in list(self._uploads.values()):
                await self._hand_on(upload)
                with contextlib.suppress(Unavailable):
                    await self._send(upload)
                    await self.cluster.release(upload.id)
            await self.cluster.stop()


SHUTDOWN_HAND_ON_SECONDS = 10.0  # for an upload's bytes to reach the store at a stop


def _waits(error: BaseException) -> UploadError | None:
    """A storage error that the upload waits out (nothing acknowledged is lost; the client
    resumes later), as its client hears it; None for others."""
    if no_space(error):
        message = "the server's storage is full; resume later: nothing acknowledged is lost"
        return UploadError(ErrorCode.STORAGE_FULL, message)
    if isinstance(error, StoreUnavailable):
        message = "the object store is unavailable; resume later: nothing acknowledged is lost"
        return UploadError(ErrorCode.STORE_UNAVAILABLE, message)
    return None


def _restored(upload: Upload) -> str:
    """What a restart found an upload doing, for the log."""
    if upload.receiving:
        return "receiving" if upload.length is not None else "tickets not used yet"
    if upload.handing_over:
        return "being handed over again"
    if upload.notice is not None:
        return "cancelled, the backend to be told"
    if upload.with_backend:
        return "waiting for the backend's finish_upload"
    return str(upload.phase.value)


def _idle(upload: Upload) -> bool:
    """Nothing of this instance's is needed: no connection, no write, no handover."""
    return upload.transport is None and not upload.pending and not upload.with_backend
