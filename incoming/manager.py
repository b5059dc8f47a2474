"""Runs the uploads: wires each upload's table (`upload`) to disk, backend and clock.

It performs the effects an upload's life asks for and reports their results back
as inputs; every decision about an upload's phase is the table's. Each change
is saved with the upload's state, and `restore` takes every upload up again
after a restart.

With a `Cluster` (several instances on one Redis) it holds only the uploads this
instance acts on, each under its lease; which those are is its `Coordinator`'s
business (`coordination`).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Coroutine, Iterator
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from .cluster import Cluster
from .coordination import Coordinator
from .errors import ErrorCode, UploadError, clipped
from .files import Chunk, Digest, Spliced
from .handover import Answer, BackendAway, Handover, HandoverFailed, Retrier, Stopped
from .metrics import Metrics
from .objectstore import StoreUnavailable
from .storage import Storage, Vanished, no_space
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
COMMANDS = frozenset(
    {"cancel_by_backend", "finish_upload", "cancel_by_client", "declare", "consumed"}
)


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
        max_unsized: int | None = None,
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
        self.max_unsized = max_unsized  # the storage's bound for an upload of unknown length
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
        self._answers: dict[str, list[Deferred[None]]] = {}  # waiting for a handover's answer
        self._unsaveable: set[str] = set()  # uploads whose last state save failed
        self.coordinator = None if cluster is None else Coordinator(self, cluster)

    @property
    def registry_reachable(self) -> bool:
        """Cluster: whether Redis answered the last PING (one process: no Redis, true)."""
        return self.coordinator is None or self.coordinator.reachable

    def spawn(self, work: Coroutine[Any, Any, Any]) -> Deferred[Any]:
        d = ensureDeferred(work)
        self.running.add(d)

        def done(result: object) -> object:
            self.running.discard(d)
            return result

        d.addBoth(done)
        d.addErrback(lambda f: log.failure("background upload work failed", f))
        return d

    # Tickets

    async def create(
        self, signal_finish_url: str, backend_secret: str, remove: bool, partial_of: str = ""
    ) -> Upload:
        """A new ticket (or a tus partial upload of ticket `partial_of`), in the journal
        (durably) before anybody hears of it."""
        if self.storage.free_bytes() < self.min_free:
            raise UploadError(ErrorCode.STORAGE_FULL, "the storage is full; try again later")
        upload = Upload(new_ticket_id(), signal_finish_url, backend_secret, remove)
        upload.partial_of = partial_of
        if self.coordinator is not None:
            upload.idle_deadline = self.clock.seconds() + self.max_idle
            await self.coordinator.create(upload)
        else:
            self.adopt(upload, self.max_idle)
            try:
                await self.storage.record_ticket(upload.id, upload.to_record())
            except OSError:
                self.drop(upload.id)
                raise
        self.metrics.tickets_created.inc()
        return upload

    def get(self, upload_id: str) -> Upload | None:
        """An upload this process holds (one process: every upload)."""
        return self._uploads.get(upload_id)

    async def find(self, upload_id: str) -> Upload | None:
        """The upload, to look at: the one held here, or (cluster) a copy read from Redis."""
        upload = self._uploads.get(upload_id)
        if upload is not None or self.coordinator is None:
            return upload
        return await self.coordinator.find(upload_id)

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
        if self.coordinator is None:
            raise UploadError(ErrorCode.UNKNOWN_TICKET, "unknown upload ticket")
        return await self.coordinator.hold(upload_id)

    async def command(self, upload_id: str, op: str, *args: Any) -> None:
        """Apply a request (an input of the upload's table: `COMMANDS`) where the upload
        is held, and return once its disk work is done; raises its UploadError."""
        assert op in COMMANDS
        if self.coordinator is None:
            await self.serve(op, upload_id, list(args))
        else:
            await self.coordinator.command(upload_id, op, list(args))

    async def serve(self, op: str, upload_id: str, args: list[Any]) -> None:
        """Apply a request here (for `command`, or from another instance)."""
        if op not in COMMANDS:
            raise UploadError(ErrorCode.UNEXPECTED_MESSAGE, f"no such request {op!r}")
        upload = await self.hold(upload_id)
        try:
            if op == "declare":
                metadata = str(args[2]) if len(args) > 2 else ""  # older instances send none
                length = None if args[0] is None else int(args[0])  # None: deferred (tus)
                final = len(args) > 3 and bool(args[3])  # a tus final request's
                upload.life.declare(length, str(args[1]), self.room(), metadata, final)
            else:
                getattr(upload.life, op)(*args)
        finally:
            await self.storage.drain(upload.id)
            self._let_go_soon(upload)
        if upload.id in self._unsaveable:  # what the request changed is not durable
            raise UploadError(ErrorCode.STORAGE_FAILED, "the upload's state cannot be saved")

    def adopt(self, upload: Upload, idle_delay: float) -> None:
        """Hold the upload here: its table wired to this manager, its idle clock running."""
        bring_to_life(upload, self)
        self._uploads[upload.id] = upload
        self._arm_idle(upload, idle_delay)

    def drop(self, upload_id: str) -> Upload | None:
        """Hold the upload here no more (cluster: another instance may take it up): its
        timers and retries stop."""
        upload = self._uploads.pop(upload_id, None)
        for timers in (self._idle, self._confirm):
            _cancel(timers, upload_id)
        self._handover_over(upload_id)
        self.retrier.stop(upload_id, "cancel notice")
        self._unsaved.discard(upload_id)
        self._unsaveable.discard(upload_id)
        return upload

    async def save_if_changed(self, upload: Upload) -> None:
        if upload.id in self._unsaved:
            await self.save(upload)

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
            if saved.modified is not None:
                # State is saved at connects, not at every chunk: the file shows activity.
                upload.idle_deadline = max(upload.idle_deadline, saved.modified + self.max_idle)
            self.adopt(upload, upload.idle_deadline - now)
            found[_restored(upload)] += 1
            if upload.receiving and upload.created:
                log.info(
                    "upload {id} restored: {n} of {length} stored",
                    id=upload.id,
                    n=upload.stored,
                    length=_length(upload),
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

    async def connect(
        self, upload_id: str, transport: Transport, length: int | None, name: str
    ) -> Upload:
        """Attach a connection to its upload (of `length` bytes; None: not known yet, a
        tus upload that deferred it), or raise UploadError."""
        upload = await self.hold(upload_id)
        try:
            upload.life.connect(transport, length, name, self.room())
        except UploadError:
            self._let_go_soon(upload)
            raise
        return upload

    def room(self) -> Room:
        """How large a new upload may be, now."""
        return Room(self.storage.free_bytes(), self.max_upload, self.max_unsized)

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
        if not isinstance(data, Spliced):  # bytes of partial uploads were counted as they came
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

        hashed = not upload.partial_of  # only a ticket's file is handed over with its SHA-256
        self.storage.write(upload.id, offset, data, digests, hashed).addCallbacks(written, failed)

    def stands(self, upload: Upload) -> None:
        if self._abandoned(upload):
            return
        # (one whose length came later keeps the part size chosen before it: unsized)
        length = None if upload.length_deferred else upload.length
        self.storage.firm(upload.id, upload.firm, length)

    def touch(self, upload: Upload) -> None:
        """Activity: the idle clock starts again, the ticket's too for a partial upload
        (whose ticket takes no bytes itself until its final request)."""
        if self._abandoned(upload):
            return
        self._arm_idle(upload, self.max_idle)
        self._unsaved.add(upload.id)
        ticket = self._uploads.get(upload.partial_of) if upload.partial_of else None
        if ticket is not None and ticket.receiving:
            self.touch(ticket)

    def save(self, upload: Upload) -> Deferred[bool]:
        """Save durably; True once saved, False (logged) if it could not be. Later disk
        work for this upload queues behind it. Cluster: in Redis too (when it is away,
        again with the next renewal)."""
        if self._abandoned(upload):
            return succeed(False)
        if not upload.handing_over:
            self._handover_over(upload.id)
        self._unsaved.discard(upload.id)
        if self.coordinator is not None:
            self.spawn(self.coordinator.send(upload))

        def saved(_: None) -> bool:
            self._unsaveable.discard(upload.id)
            if not upload.awaiting_answer:  # each phase is saved: those waiting for it hear
                for answer in self._answers.pop(upload.id, []):
                    answer.callback(None)
            return True

        def failed(failure: Any) -> bool:
            log.error("upload {id}: cannot save state: {e}", id=upload.id, e=failure.value)
            self._unsaveable.add(upload.id)
            return False

        return self.storage.save_state(upload.id, upload.to_record()).addCallbacks(saved, failed)

    def release(self, upload: Upload) -> None:
        if self._abandoned(upload):
            return
        self.storage.release(upload.id)
        self._let_go_soon(upload)

    def hand_over(self, upload: Upload) -> None:
        if self._abandoned(upload):
            return
        self.spawn(self._hand_over(upload))

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
        _cancel(self._late, upload.id)
        delay = max(began + self.handover_timeout - self.clock.seconds(), 0)
        self._late[upload.id] = self.clock.callLater(delay, upload.life.handover_late)

    def _handover_over(self, upload_id: str) -> None:
        """The upload is no longer being handed over (here): no more attempts or timer."""
        _cancel(self._late, upload_id)
        self.retrier.stop(upload_id, "handover")

    def finalize(self, upload: Upload) -> None:
        if self._abandoned(upload):
            return
        self.spawn(self._finalize(upload))

    async def _finalize(self, upload: Upload) -> None:
        if not await self.save(upload):
            return  # nobody hears of an end a restart would not find; the file stays
        if upload.remove_file_when_finished:
            await self._remove_file(upload)
        upload.life.finalized()
        self._let_go_soon(upload)

    def discard_file(self, upload: Upload) -> None:
        if self._abandoned(upload):
            return
        self.spawn(self._discard_file(upload))

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
        _cancel(self._confirm, upload.id)

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
        self._unsaveable.discard(upload.id)
        self.spawn(self._forget(upload))

    async def _forget(self, upload: Upload) -> None:
        await self.storage.discard(upload.id)
        self.storage.forget(upload.id)
        if self.coordinator is not None:
            await self.coordinator.forget(upload.id)
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
                "upload {id} started over {via}: {name!r}, {length}",
                id=upload.id,
                via=via,
                name=clipped(upload.browser_name),
                length=_length(upload),
            )
        elif event in (Event.PAUSED, Event.INTERRUPTED, Event.RESUMED):
            log.info(
                "upload {id} {event} at {n} of {length}{over}",
                id=upload.id,
                event=event.value,
                n=upload.received,
                length=_length(upload),
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

    # Cluster: uploads held here (`coordination`)

    def _abandoned(self, upload: Upload) -> bool:
        """Cluster: an upload no longer held here (taken over by another instance, whose
        lease it is now) is inert: no write, save, timer or handover of ours touches it."""
        return self.coordinator is not None and self._uploads.get(upload.id) is not upload

    def _let_go_soon(self, upload: Upload) -> None:
        if self.coordinator is not None:
            self.spawn(self.coordinator.let_go(upload))

    def start(self) -> None:
        """Take up saved uploads (one process), or start the cluster's rounds."""
        if self.coordinator is None:
            self.restore()
        else:
            self.coordinator.start()

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
        if self.coordinator is not None:
            self.coordinator.stop_rounds()
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
        if self.coordinator is not None:
            await self.coordinator.leave()


def _restored(upload: Upload) -> str:
    """What a restart found an upload doing, for the log."""
    if upload.receiving:
        return "receiving" if upload.created else "tickets not used yet"
    if upload.handing_over:
        return "being handed over again"
    if upload.notice is not None:
        return "cancelled, the backend to be told"
    if upload.with_backend:
        return "waiting for the backend's finish_upload"
    return str(upload.phase.value)


def _length(upload: Upload) -> str:
    """An upload's length, for the log."""
    return "? bytes (length deferred)" if upload.length is None else f"{upload.length} bytes"


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


def _cancel(timers: dict[str, IDelayedCall], upload_id: str) -> None:
    """The upload's timer in `timers`, if any, stopped and forgotten."""
    timer = timers.pop(upload_id, None)
    if timer is not None and timer.active():
        timer.cancel()
