"""What happens to uploads over time: chunks stored, handover, cancellation, expiry.

The one place that combines the pure rules (`uploads`) with disk (`storage`),
the backend (`handover`) and the clock. Each change of an upload's phase is
saved with its state, and `restore` picks every upload up again after a restart.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .config import Config
from .files import Buffer
from .handover import Backend, HandoverFailed
from .metrics import Metrics
from .storage import Storage
from .uploads import ErrorCode, Phase, Registry, Session, Upload, UploadError, clipped

log = Logger()
HANDOVER_FAILED_TEXT = "handover failed: the backend did not take the file"


class UploadManager:
    """Drives every upload from ticket to handover or cancellation."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
        storage: Storage,
        backend: Backend,
        clock: IReactorTime,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.storage = storage
        self.backend = backend
        self.clock = clock
        self.metrics = metrics or Metrics()
        self._idle: dict[str, IDelayedCall] = {}
        self._confirm: dict[str, IDelayedCall] = {}
        self._unsaved: set[str] = set()  # uploads changed since their state was last saved
        self.running: set[Deferred[Any]] = set()  # background work, for shutdown and tests

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
        upload = self.registry.create(signal_finish_url, backend_secret, remove)
        self._arm_idle(upload, self.config.max_idle)
        try:
            await self.storage.record_ticket(upload.id, upload.to_record())
        except OSError:
            self.registry.forget(upload)
            self._idle.pop(upload.id).cancel()
            raise
        self.metrics.tickets_created += 1
        return upload

    def _save(self, upload: Upload, sync: bool = False) -> Deferred[None]:
        self._unsaved.discard(upload.id)
        return self.storage.save_state(upload.id, upload.to_record(), sync)

    def _save_soon(self, upload: Upload, sync: bool = False) -> Deferred[None]:
        """Save, logging a failure; later disk work for this upload queues behind it."""

        def failed(failure: Any) -> None:
            log.error("upload {id}: cannot save state: {e}", id=upload.id, e=failure.value)

        return self._save(upload, sync).addErrback(failed)

    def restore(self) -> None:
        """Take up every upload saved by an earlier run (at start-up)."""
        now = self.clock.seconds()
        for saved in self.storage.load():
            try:
                upload = Upload.from_record(saved.record, saved.stored)
            except (KeyError, ValueError, TypeError) as e:
                log.error("ignoring saved upload {r!r}: {e}", r=saved.record.get("id"), e=e)
                continue
            self.registry.add(upload)
            if saved.modified is not None and not upload.phase.final:
                # State is saved at connects, not at every chunk: the file shows activity.
                active_until = saved.modified + self.config.max_idle
                upload.idle_deadline = max(upload.idle_deadline, active_until)
            if upload.phase is Phase.HANDOVER and upload.length and not saved.present:
                # The backend took the file away: it answered, we died before saving that.
                upload.finish()
                self._save_soon(upload, sync=True)
            self._arm_idle(upload, upload.idle_deadline - now)
            log.info(
                "upload {id} restored: {phase}, {n} of {length} bytes stored",
                id=upload.id,
                phase=upload.phase.value,
                n=saved.stored,
                length=upload.length,
            )
            if upload.phase is Phase.HANDOVER or (
                upload.phase is Phase.RECEIVING and upload.complete
            ):
                self._spawn(self._complete(upload))
            elif upload.phase is Phase.AWAITING_FINISH:
                self._arm_confirm(upload, (upload.confirm_deadline or now) - now)

    def lookup(self, upload_id: str) -> Upload:
        upload = self.registry.get(upload_id)
        if upload is None:
            raise UploadError(ErrorCode.UNKNOWN_TICKET, "unknown upload ticket")
        return upload

    def _touch(self, upload: Upload) -> None:
        """Restart the idle clock: it expires live uploads and forgets ended ones."""
        self._arm_idle(upload, self.config.max_idle)
        self._unsaved.add(upload.id)

    def _arm_idle(self, upload: Upload, delay: float) -> None:
        delay = max(delay, 0)
        upload.idle_deadline = self.clock.seconds() + delay
        timer = self._idle.get(upload.id)
        if timer is not None and timer.active():
            timer.reset(delay)
        else:
            self._idle[upload.id] = self.clock.callLater(delay, self._idle_timeout, upload)

    def _arm_confirm(self, upload: Upload, delay: float) -> None:
        delay = max(delay, 0)
        upload.confirm_deadline = self.clock.seconds() + delay
        self._confirm[upload.id] = self.clock.callLater(delay, self._confirm_timeout, upload)

    def _idle_timeout(self, upload: Upload) -> None:
        del self._idle[upload.id]
        if upload.phase.final:
            self.registry.forget(upload)
            self._unsaved.discard(upload.id)
            self._spawn(self._discard(upload))
        elif upload.phase is Phase.RECEIVING:
            log.info("upload {id} expired after {s:g} s idle", id=upload.id, s=self.config.max_idle)
            self._spawn(self._cancel(upload, f"upload idle for {self.config.max_idle:g} s"))
        else:  # the handover has its own timeouts
            self._touch(upload)

    # Browser connections

    def connect(self, upload_id: str, session: Session, length: int, browser_name: str) -> Upload:
        """Attach a browser connection to its upload, or raise UploadError."""
        upload = self.lookup(upload_id)
        upload.check_connect(length)
        if upload.length is None and length > self.storage.free_bytes():
            raise UploadError(
                ErrorCode.INSUFFICIENT_STORAGE,
                f"{length} bytes do not fit in the free storage space",
            )
        resumed = upload.length is not None
        upload.connect(session, length, browser_name)
        self._touch(upload)
        self._save_soon(upload)
        log.info(
            "upload {id} {how}: {name!r}, {n} bytes",
            id=upload.id,
            how="resumed" if resumed else "connected",
            name=clipped(browser_name),
            n=length,
        )
        return upload

    async def resume_position(self, upload: Upload) -> int:
        """Bytes already stored, once every write still in flight has landed."""
        await self.storage.drain(upload.id)
        if upload.phase is Phase.RECEIVING:
            return upload.stored
        assert upload.length is not None
        return upload.length

    def start_if_complete(self, upload: Upload) -> None:
        """A connection found nothing left to send (a zero-byte or finished file)."""
        if upload.phase is Phase.RECEIVING and upload.complete:
            self._spawn(self._complete(upload))

    def disconnect(self, upload: Upload, session: Session, paused: bool) -> None:
        upload.disconnect(session)
        if not upload.phase.final:
            self.storage.release(upload.id)  # no fd held for an upload nobody is sending
            self._save_soon(upload)  # keeps the idle deadline
            log.info(
                "upload {id} {how} at {n} bytes",
                id=upload.id,
                how="paused" if paused else "disconnected",
                n=upload.received,
            )

    # Bytes

    def receive_chunk(self, upload: Upload, data: Buffer) -> Deferred[None]:
        """Queue a chunk for writing; fires once it is on disk."""
        offset = upload.received
        try:
            upload.accept_chunk(len(data))
        except UploadError as e:
            if e.cancels:
                self._spawn(self._fail(upload, e.code, e.message))
            raise
        self._touch(upload)
        self.metrics.bytes_received += len(data)
        arrived = self.clock.seconds()
        d = self.storage.write(upload.id, offset, data)

        def stored(_: None) -> None:
            self.metrics.observe_write(self.clock.seconds() - arrived)
            upload.chunk_stored(len(data))
            if upload.phase is Phase.RECEIVING and upload.complete:
                self._spawn(self._complete(upload))

        def failed(failure: Any) -> Any:
            if upload.phase is Phase.RECEIVING:
                log.error("upload {id}: storage failed: {e}", id=upload.id, e=failure.value)
                self._spawn(self._fail(upload, ErrorCode.STORAGE_FAILED, "storage failed"))
            return failure

        return d.addCallbacks(stored, failed)

    # Handover

    async def _complete(self, upload: Upload) -> None:
        """Make the file final and hand it over (again, after a restart)."""
        if upload.phase is Phase.RECEIVING:
            upload.start_handover()
            self._save_soon(upload, sync=True)
            log.info("upload {id} complete: {n} bytes stored", id=upload.id, n=upload.stored)
        try:
            path = await self.storage.complete(upload.id)
        except OSError as e:
            log.error("upload {id}: cannot complete file: {e}", id=upload.id, e=e)
            await self._fail(upload, ErrorCode.STORAGE_FAILED, "storage failed")
            return
        try:
            answer = await self.backend.hand_over(upload, str(path))
        except HandoverFailed as e:
            # The details stay in the log: the browser may have aimed the ticket anywhere.
            log.info("upload {id}: handover failed: {why}", id=upload.id, why=str(e))
            await self._fail(upload, ErrorCode.HANDOVER_FAILED, HANDOVER_FAILED_TEXT)
            return
        if upload.phase is not Phase.HANDOVER:  # a failure elsewhere ended it meanwhile
            return
        if answer == "done":
            await self._finish(upload)
        else:
            upload.await_finish()
            self._arm_confirm(upload, self.config.handover_confirm_timeout)
            await self._save_soon(upload, sync=True)
            log.info("upload {id} handed over; backend asked to wait", id=upload.id)

    def _confirm_timeout(self, upload: Upload) -> None:
        self._confirm.pop(upload.id, None)
        message = (
            f"backend did not call finish_upload within {self.config.handover_confirm_timeout:g} s"
        )
        self._spawn(self._fail(upload, ErrorCode.HANDOVER_FAILED, message))

    async def finish_upload(self, upload: Upload) -> None:
        """The backend's `finish_upload` after it answered `wait`."""
        upload.check_finish_upload()
        timer = self._confirm.pop(upload.id, None)
        if timer is not None and timer.active():
            timer.cancel()
        await self._finish(upload)

    async def _finish(self, upload: Upload) -> None:
        upload.finish()
        self._touch(upload)
        await self._save_soon(upload, sync=True)  # durable before anybody hears of it
        if upload.remove_file_when_finished:
            await self._remove_file(upload)
        log.info("upload {id} handed over and finished", id=upload.id)
        if upload.session is not None:
            upload.session.upload_done()

    # Cancellation: the browser hears at once; the file goes next; the backend last.

    async def cancel_by_backend(self, upload: Upload) -> None:
        """The backend's `cancel_upload`: answered once the file is gone."""
        upload.check_cancel()
        reason = "cancelled by the backend"
        self._end(upload, reason)
        if upload.session is not None:
            upload.session.upload_cancelled(reason)
        await self._remove_file(upload)

    def cancel_by_frontend(self, upload: Upload, reason: str) -> None:
        """The connected browser's own `MsgCancel`: its session acknowledges it at once."""
        upload.check_cancel()
        reason = reason or "cancelled by the user"
        self._end(upload, reason)
        self._spawn(self._clean_up(upload, reason))

    async def _cancel(self, upload: Upload, reason: str) -> None:
        """The server ends an upload (idle timeout): the browser gets `MsgCancel`."""
        self._end(upload, reason)
        if upload.session is not None:
            upload.session.upload_cancelled(reason)
        await self._clean_up(upload, reason)

    async def _fail(self, upload: Upload, code: ErrorCode, message: str) -> None:
        """An error ends the upload: the browser gets `MsgError`, the backend a notice."""
        if upload.phase.final:
            return
        self._end(upload, message)
        if upload.session is not None:
            upload.session.upload_failed(code, message)
        await self._clean_up(upload, message)

    async def _clean_up(self, upload: Upload, reason: str) -> None:
        await self._remove_file(upload)
        await self.backend.notify_cancelled(upload, reason)

    def _end(self, upload: Upload, reason: str) -> None:
        upload.cancel(reason)
        timer = self._confirm.pop(upload.id, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._touch(upload)
        self._save_soon(upload)
        log.info("upload {id} cancelled: {reason}", id=upload.id, reason=clipped(reason))

    async def _remove_file(self, upload: Upload) -> None:
        try:
            await self.storage.remove(upload.id)
        except OSError as e:
            log.error("upload {id}: cannot remove file: {e}", id=upload.id, e=e)

    async def _discard(self, upload: Upload) -> None:
        await self.storage.discard(upload.id)
        self.storage.forget(upload.id)
        log.info("upload {id} forgotten", id=upload.id)

    async def shutdown(self) -> None:
        """Stop timers, send browsers away (1001) and let queued disk work land.

        Saved state stays as it is; `restore` carries on from it at the next start.
        """
        for timer in [*self._idle.values(), *self._confirm.values()]:
            if timer.active():
                timer.cancel()
        self._idle.clear()
        self._confirm.clear()
        for upload in self.registry:
            if upload.session is not None:
                upload.session.going_away()
        await self.storage.drain_all()
        # Only what changed since it was saved: never-used tickets are in the journal.
        for upload_id in list(self._unsaved):
            changed = self.registry.get(upload_id)
            if changed is not None:
                await self._save(changed)
