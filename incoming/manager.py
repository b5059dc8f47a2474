"""Runs the uploads: wires each upload's table (`upload`) to disk, backend and clock.

It performs the effects an upload's life asks for and reports their results back
as inputs; every decision about an upload's phase is the table's. Each change
is saved with the upload's state, and `restore` takes every upload up again
after a restart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Coroutine, Iterator
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .errors import ErrorCode, UploadError
from .files import Chunk, Digest
from .handover import Handover, HandoverFailed
from .metrics import Metrics
from .storage import Storage
from .upload import Phase, Room, Transport, Upload, bring_to_life, new_ticket_id

log = Logger()


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
    ) -> None:
        self.storage = storage
        self.handover = handover
        self.clock = clock
        self.metrics = metrics
        self.max_idle = max_idle
        self.confirm_timeout = confirm_timeout
        self.max_upload = max_upload
        self._uploads: dict[str, Upload] = {}
        self._idle: dict[str, IDelayedCall] = {}
        self._confirm: dict[str, IDelayedCall] = {}
        self._unsaved: set[str] = set()  # uploads changed since their state was last saved
        self.running: set[Deferred[Any]] = set()  # background work, for shutdown and tests
        metrics.count_uploads(self.phases)

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
        """A new ticket, in the journal before anybody hears of it."""
        upload = Upload(new_ticket_id(), signal_finish_url, backend_secret, remove)
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

    def get(self, upload_id: str) -> Upload | None:
        return self._uploads.get(upload_id)

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
        """Take up every upload saved by an earlier run (at start-up)."""
        now = self.clock.seconds()
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
            log.info(
                "upload {id} restored: {phase}, {n} of {length} bytes stored",
                id=upload.id,
                phase=upload.phase.value,
                n=saved.stored,
                length=upload.length,
            )
            upload.life.restored(saved.present)

    # Connections (for transports)

    def connect(self, upload_id: str, transport: Transport, length: int, name: str) -> Upload:
        """Attach a connection to its upload, or raise UploadError."""
        upload = self.lookup(upload_id)
        upload.life.connect(transport, length, name, self.room())
        return upload

    def room(self) -> Room:
        """How large a new upload may be, now."""
        return Room(self.storage.free_bytes(), self.max_upload)

    async def resume_position(self, upload: Upload) -> int:
        """Bytes stored, once every write still in flight (an earlier connection's) landed."""
        await self.storage.drain(upload.id)
        return upload.stored

    async def settled(self, upload: Upload) -> None:
        """Fires once the disk work the upload's last input asked for has been done."""
        await self.storage.drain(upload.id)

    # Effects (upload.Effects)

    def write(self, upload: Upload, offset: int, data: Chunk, digests: tuple[Digest, ...]) -> None:
        self.metrics.bytes_received.inc(len(data))
        arrived = self.clock.seconds()

        def stored(_: None) -> None:
            self.metrics.chunk_write_seconds.observe(self.clock.seconds() - arrived)
            upload.life.written()

        def failed(failure: Any) -> None:
            log.error("upload {id}: storage failed: {e}", id=upload.id, e=failure.value)
            upload.life.storage_failed()

        self.storage.write(upload.id, offset, data, digests).addCallbacks(stored, failed)

    def touch(self, upload: Upload) -> None:
        self._arm_idle(upload, self.max_idle)
        self._unsaved.add(upload.id)

    def save(self, upload: Upload, durable: bool = False) -> Deferred[None]:
        """Save, logging a failure; later disk work for this upload queues behind it."""
        self._unsaved.discard(upload.id)

        def failed(failure: Any) -> None:
            log.error("upload {id}: cannot save state: {e}", id=upload.id, e=failure.value)

        d = self.storage.save_state(upload.id, upload.to_record(), durable)
        return d.addErrback(failed)

    def release(self, upload: Upload) -> None:
        self.storage.release(upload.id)

    def hand_over(self, upload: Upload) -> None:
        self._spawn(self._hand_over(upload))

    async def _hand_over(self, upload: Upload) -> None:
        try:
            completed = await self.storage.complete(upload.id)
        except OSError as e:
            log.error("upload {id}: cannot complete file: {e}", id=upload.id, e=e)
            upload.life.storage_failed()
            return
        upload.sha256 = completed.sha256
        try:
            answer = await self.handover.hand_over(upload, str(completed.path), completed.sha256)
        except HandoverFailed as e:
            log.info("upload {id}: handover failed: {why}", id=upload.id, why=str(e))
            upload.life.handover_failed()
            return
        if answer.kind == "done":
            upload.life.answered_done(answer.result)
        else:
            upload.life.answered_wait()

    def finalize(self, upload: Upload) -> None:
        self._spawn(self._finalize(upload))

    async def _finalize(self, upload: Upload) -> None:
        await self.save(upload, durable=True)
        if upload.remove_file_when_finished:
            await self._remove_file(upload)
        upload.life.finalized()

    def discard_file(self, upload: Upload, notice: str | None) -> None:
        self._spawn(self._discard_file(upload, notice))

    async def _discard_file(self, upload: Upload, notice: str | None) -> None:
        await self._remove_file(upload)
        if notice is not None:
            await self.handover.notify_cancelled(upload, notice)

    async def _remove_file(self, upload: Upload) -> None:
        try:
            await self.storage.remove(upload.id)
        except OSError as e:
            log.error("upload {id}: cannot remove file: {e}", id=upload.id, e=e)

    def arm_confirm(self, upload: Upload) -> None:
        now = self.clock.seconds()
        if upload.confirm_deadline is None:
            upload.confirm_deadline = now + self.confirm_timeout
        delay = max(upload.confirm_deadline - now, 0)
        self._confirm[upload.id] = self.clock.callLater(
            delay, upload.life.confirm_timeout, self.confirm_timeout
        )

    def disarm_confirm(self, upload: Upload) -> None:
        upload.confirm_deadline = None
        timer = self._confirm.pop(upload.id, None)
        if timer is not None and timer.active():
            timer.cancel()

    def truncate(self, upload: Upload, size: int) -> None:
        self.storage.truncate(upload.id, size).addErrback(
            lambda f: log.error("upload {id}: cannot truncate: {e}", id=upload.id, e=f.value)
        )

    def forget(self, upload: Upload) -> None:
        del self._uploads[upload.id]
        self._unsaved.discard(upload.id)
        self._spawn(self._forget(upload))

    async def _forget(self, upload: Upload) -> None:
        await self.storage.discard(upload.id)
        self.storage.forget(upload.id)
        log.info("upload {id} forgotten", id=upload.id)

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
        in the journal); `restore` carries on from there at the next start.
        """
        for timer in [*self._idle.values(), *self._confirm.values()]:
            if timer.active():
                timer.cancel()
        self._idle.clear()
        self._confirm.clear()
        for upload in self:
            if upload.transport is not None:
                upload.transport.going_away()
        await self.storage.drain_all()
        for upload_id in list(self._unsaved):
            changed = self._uploads.get(upload_id)
            if changed is not None:
                await self.save(changed)
