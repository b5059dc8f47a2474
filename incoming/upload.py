"""An upload's life, from ticket to its end, as one transition table.

Pure: no I/O and no clock. The inputs (`UploadLife`) come from the transport
that carries the client's bytes, from the backend API, from storage, from the
handover and from the timers. The outputs are calls on `Effects` (disk,
backend, timers: `UploadManager` performs them and reports back as inputs) and
on the connected `Transport`. Every (state, input) pair is declared below; an
input that means nothing in a state is declared as ignored there.
"""

from __future__ import annotations

import enum
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .errors import ErrorCode, UploadError
from .files import Chunk, Digest

log = Logger()
HANDOVER_FAILED_TEXT = "handover failed: the backend did not take the file"
CONCAT = "concat"  # the `via` of the transport that concatenates partial uploads


class Phase(enum.Enum):
    """The states of the table, as saved with an upload's state."""

    RECEIVING = "receiving"  # bytes may arrive
    HANDOVER = "handover"  # all bytes stored; the backend is being told
    FINISH_REQUESTED = "finish_requested"  # finish_upload came before the handover's answer
    AWAITING_FINISH = "awaiting_finish"  # the backend answered `wait`
    FINISHED = "finished"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (Phase.FINISHED, Phase.CANCELLED)


class Departure(enum.Enum):
    """How a connection left its upload."""

    DONE = "done"  # its request ended as it should (a tus PATCH, answered)
    PAUSED = "paused"  # its client said it would come back (MsgPause)
    INTERRUPTED = "interrupted"  # it broke off: a connection lost, a PATCH cut short


class Event(enum.Enum):
    """What becomes of an upload that an operator hears of: a log line each, and metrics."""

    STARTED = "started"  # its first connection
    PAUSED = "paused"
    INTERRUPTED = "interrupted"  # while bytes were still to come
    RESUMED = "resumed"  # a connection after a pause or an interruption
    COMPLETE = "complete"  # every byte stored: the handover starts
    PENDING = "pending"  # no answer within HandoverTimeoutS: the client hears it is stored
    HANDED_OVER = "handed over"  # the backend answered `wait`
    FINISHED = "finished"
    CANCELLED = "cancelled"


class Cause(enum.Enum):
    """Why an upload was cancelled: a fixed set (metrics label them with it)."""

    BY_CLIENT = "by_client"
    BY_BACKEND = "by_backend"
    IDLE = "idle"
    PAST_END = "past_end"
    STORAGE_FAILED = "storage_failed"
    HANDOVER_FAILED = "handover_failed"
    CONFIRM_TIMEOUT = "confirm_timeout"


@dataclass(frozen=True)
class Ending:
    """How an upload ended, for its transport to tell the client."""

    code: ErrorCode | None  # None: handed over and finished
    message: str = ""
    result: str = ""  # the backend's verdict for the page, when finished

    @property
    def finished(self) -> bool:
        return self.code is None


@dataclass(frozen=True)
class Room:
    """How large a new upload may be: the free storage, and the configured limit (and,
    for one whose length is not known yet, what the storage can take without it)."""

    free_bytes: int
    max_bytes: int | None = None
    max_unsized: int | None = None  # an object store's parts are sized before it grows

    def limit(self, sized: bool = True) -> int | None:
        """The most bytes an upload may have (`sized`: its length is known)."""
        if sized or self.max_unsized is None:
            return self.max_bytes
        return self.max_unsized if self.max_bytes is None else min(self.max_bytes, self.max_unsized)

    def check(self, size: int, more: int, sized: bool = True) -> None:
        """An upload of `size` bytes, `more` of them not stored yet, fits; else UploadError."""
        limit = self.limit(sized)
        if limit is not None and size > limit:
            raise UploadError(
                ErrorCode.TOO_LARGE, f"{size} bytes exceed the limit of {limit} bytes"
            )
        if more > self.free_bytes:
            raise UploadError(
                ErrorCode.INSUFFICIENT_STORAGE, f"{more} bytes do not fit in the free storage space"
            )


class Transport(Protocol):
    """A connection carrying an upload's bytes: it hears what became of them."""

    via: str  # its protocol: "websocket" or "tus"
    joins: bool  # a tus final request's: it brings the partial uploads' bytes
    # Hashes its bytes also feed, as they are written (a tus checksum).
    digests: tuple[Digest, ...]

    @property
    def holding(self) -> bool:
        """While true its bytes may yet be voided (their checksum, or the rest of a request
        body, is still to come): no handover starts until it lets go and calls `ready`."""

    @property
    def may_void(self) -> bool:
        """Whether bytes it sent may still be voided (a checksum to come, or a body that may
        pass the upload's length and be refused whole): until then they do not stand."""

    def written(self, size: int) -> None:
        """`size` more of the bytes this connection sent left memory (written, not yet
        durable): room for more."""

    def stored(self, size: int) -> None:
        """`size` more of the bytes this connection sent are stored durably: what it may
        acknowledge to its client."""

    def failed(self, error: UploadError) -> None:
        """The storage could not take this connection's bytes (it is full); the upload
        goes on, from where it is durable: tell the client, and let go."""

    def ended(self, ending: Ending) -> None:
        """The upload ended (also when this connection asked to cancel it)."""

    def waiting(self) -> None:
        """The backend has the file and answered `wait`: it finishes the upload later."""

    def pending(self) -> None:
        """The backend has not answered within HandoverTimeoutS: the file is stored and
        the application will take it; the handover goes on without this connection."""

    def going_away(self) -> None:
        """The server is stopping; the client should resume later."""


class Effects(Protocol):
    """The I/O an upload's life asks for; each result comes back as an input."""

    def write(self, upload: Upload, offset: int, data: Chunk, digests: tuple[Digest, ...]) -> None:
        """Queue a write (feeding `digests` too); then `written` and, once its bytes are
        durable, `synced`; or `storage_unavailable` (no space, the object store away), or
        `storage_failed`."""

    def stands(self, upload: Upload) -> None:
        """The upload's first `upload.firm` bytes stand: nothing voids them any more (an
        object store's spool may send them on)."""

    def touch(self, upload: Upload) -> None:
        """Restart the idle clock: it expires live uploads and forgets ended ones."""

    def save(self, upload: Upload) -> Deferred[bool]:
        """Save the upload's state (durably); fires True once saved, or False if it could
        not be (logged): nothing that relies on it is answered then."""

    def release(self, upload: Upload) -> None:
        """Nobody is sending: the upload's file need not stay open."""

    def hand_over(self, upload: Upload) -> None:
        """Make the file final and POST it, again while the backend is away (each time
        `handover_retrying`); `handover_late` once HandoverTimeoutS passed since its first
        attempt; then `answered_done`, `answered_wait`, `handover_failed` (a refusal, or
        HandoverRetryS spent) or `storage_failed`."""

    def finalize(self, upload: Upload) -> None:
        """Save the finished state durably, remove the file if asked; then `finalized`."""

    def discard_file(self, upload: Upload) -> None:
        """Remove the file; then send the backend the `cancelled=yes` POST it is owed
        (`upload.notice`), again while it is away; then `notified`."""

    def arm_confirm(self, upload: Upload) -> None:
        """`confirm_timeout` at the saved deadline, or the configured time from now."""

    def disarm_confirm(self, upload: Upload) -> None: ...

    def truncate(self, upload: Upload, size: int) -> None:
        """Cut the upload's partial file to `size` bytes."""

    def forget(self, upload: Upload) -> None:
        """Drop the ended upload and its saved state (never a file the backend kept)."""

    def happened(
        self, upload: Upload, event: Event, detail: str = "", cause: Cause | None = None
    ) -> None:
        """Tell the operator (one log line) and count it; `detail` says what for the log."""


class UploadLife(Protocol):
    """Everything that can happen to an upload: the inputs of the table."""

    def declare(
        self, length: int | None, name: str, room: Room, metadata: str = "", final: bool = False
    ) -> None:
        """A client announces the upload's length (None: a tus creation that defers it)
        and name (tus creation, whose `Upload-Metadata` is kept as given), or a tus final
        request that its partial uploads will bring the bytes (`final`); raises
        UploadError if they do not fit or differ from what was announced before."""

    def connect(self, transport: Transport, length: int | None, name: str, room: Room) -> None:
        """A connection will carry the bytes, of an upload of `length` (None: not known
        yet, tus); raises UploadError if it may not."""

    def disconnect(self, transport: Transport, how: Departure) -> None:
        """The connection is gone."""

    def ready(self) -> None:
        """The connection told its client where to resume; no byte missing: hand over."""

    def receive(self, data: Chunk) -> None:
        """The next bytes, from the connected transport."""

    def past_end(self, message: str) -> None:
        """The connection sent more bytes than the upload's length."""

    def rewind(self, offset: int) -> None:
        """Bytes from `offset` on failed their check: they are void (no writes pending)."""

    def written(self) -> None:
        """The oldest queued write is on disk (not yet durable)."""

    def synced(self, upto: int) -> None:
        """The file's first `upto` bytes are durable."""

    def all_stored(self) -> None: ...

    def storage_unavailable(self, error: UploadError) -> None:
        """The storage cannot take bytes for now (its disk is full, its object store away):
        what is not durable is void, the upload waits; its client hears `error`."""

    def storage_failed(self, why: str) -> None: ...

    def answered_done(self, result: str) -> None:
        """The backend answered `done`, and `result` for the page."""

    def answered_wait(self) -> None: ...

    def handover_failed(self, why: str) -> None:
        """`why` goes to the log only: a page may aim a ticket at any URL."""

    def handover_retrying(self) -> None:
        """An attempt of the handover got no answer, or one that says to try later: it is
        made again after a while."""

    def handover_late(self) -> None:
        """HandoverTimeoutS have passed since the handover's first attempt, unanswered."""

    def notified(self) -> None:
        """The backend heard of the cancellation (or the retries for it ran out)."""

    def finish_upload(self, result: str) -> None:
        """The backend's `finish_upload` (with its verdict for the page); raises
        UploadError if it is refused."""

    def finalized(self) -> None:
        """The finished state is durable and the file removed if asked."""

    def cancel_by_backend(self) -> None:
        """Raises UploadError if too late."""

    def cancel_by_client(self, reason: str) -> None:
        """Raises UploadError if too late."""

    def consumed(self) -> None:
        """A partial upload's bytes are in its ticket's file (durably): it goes, quietly."""

    def idle_timeout(self, idle_seconds: float) -> None: ...

    def confirm_timeout(self, waited_seconds: float) -> None: ...

    def restored(self, file_present: bool) -> None:
        """Taken up again after a restart."""

    def bytes_missing(self) -> None:
        """Taken up for its handover, its file is not whole: the end of it was only in the
        spool of an instance that died before the object was made. Nobody was told."""


_RECORDED = (
    "id",
    "signal_finish_url",
    "backend_secret",
    "remove_file_when_finished",
    "length",
    "length_deferred",
    "browser_name",
    "tus_metadata",
    "partial_of",
    "final",
    "cancel_reason",
    "result",
    "idle_deadline",
    "confirm_deadline",
    "started_at",
    "interrupted",
    "via",
    "handover_began",
    "late",
    "notice",
    "notice_began",
)


@dataclass(eq=False)
class Upload:
    """One ticket: what is saved of it, and where its bytes stand."""

    id: str
    signal_finish_url: str
    backend_secret: str
    remove_file_when_finished: bool
    length: int | None = None  # set by the first connection (or a tus creation)
    length_deferred: bool = False  # a tus creation left the length to come later
    browser_name: str = ""
    tus_metadata: str = ""  # `Upload-Metadata` of the tus creation, as given
    partial_of: str = ""  # a tus partial upload: its ticket (its bytes are never handed over)
    final: bool = False  # a tus final upload: its bytes come from its partial uploads only
    phase: Phase = Phase.RECEIVING
    cancel_reason: str = ""
    result: str = ""  # the backend's verdict for the page (`done` + text, finish_upload)
    sha256: str | None = None  # of the complete file, once computed
    idle_deadline: float = 0.0  # clock time when an idle upload expires (or is forgotten)
    confirm_deadline: float | None = None  # clock time by which finish_upload must come
    started_at: float | None = None  # clock time of its first connection
    interrupted: bool = False  # its last connection paused or broke off before the end
    via: str = ""  # the protocol of its last connection
    # When the backend is away: the retries of the handover count from its first attempt
    # (a clock time), also across restarts; `late`: it was not answered within
    # HandoverTimeoutS, and the client was told the file is stored and pending.
    handover_began: float | None = None
    late: bool = False
    notice: str | None = None  # the cancelReason of a `cancelled=yes` POST owed to the backend
    notice_began: float | None = None  # clock time of that notice's first attempt
    retrying: bool = False  # an attempt of this handover failed (in this process)
    stored: int = 0  # bytes written, contiguous from the start
    durable: int = 0  # of those, bytes synced: what clients are told
    firm: int = 0  # of those, bytes no connection may void any more
    transport: Transport | None = field(default=None, repr=False)
    # queued writes, oldest first: their sizes and the connections that sent them
    pending: deque[tuple[int, Transport | None]] = field(default_factory=deque, repr=False)
    pending_bytes: int = 0
    # writes landed but not yet durable, oldest first: where they end, sizes, senders
    unsynced: deque[tuple[int, int, Transport | None]] = field(default_factory=deque, repr=False)
    era: int = 0  # each cut of the file starts a new one: writes queued before are void
    life: UploadLife = field(init=False, repr=False)

    @property
    def received(self) -> int:
        """Bytes accepted: stored, or queued for writing."""
        return self.stored + self.pending_bytes

    @property
    def unacknowledged(self) -> int:
        """Writes whose bytes are not durable yet (queued, or landed and not synced)."""
        return len(self.pending) + len(self.unsynced)

    @property
    def created(self) -> bool:
        """A connection or a tus creation gave it a length, or deferred it."""
        return self.length is not None or self.length_deferred

    @property
    def complete(self) -> bool:
        """Every byte is durable."""
        return self.length is not None and self.durable == self.length

    @property
    def whole(self) -> bool:
        """Every byte is durable, and the file is a ticket's (not a partial upload's, which
        waits to be concatenated): its handover may start."""
        return self.complete and not self.partial_of

    @property
    def receiving(self) -> bool:
        return self.phase is Phase.RECEIVING

    @property
    def cancelled(self) -> bool:
        return self.phase is Phase.CANCELLED

    @property
    def handing_over(self) -> bool:
        """The backend is being told, and has not answered yet."""
        return self.phase in (Phase.HANDOVER, Phase.FINISH_REQUESTED)

    @property
    def with_backend(self) -> bool:
        """Its next step is the backend's: a handover, the finish_upload it awaits, or the
        cancel notice it is owed."""
        return self.handing_over or self.phase is Phase.AWAITING_FINISH or self.notice is not None

    @property
    def awaiting_answer(self) -> bool:
        """The handover's answer is due: a client asking where the upload stands waits
        for it (once `late`, it hears the handover is pending)."""
        return self.handing_over and not self.late

    @property
    def handover_pending(self) -> bool:
        """The client was told the file is stored, and the backend has not finished it."""
        return self.late and not self.phase.final

    @property
    def offset(self) -> int:
        """Where a client resumes: the bytes durable, or all of them once received."""
        if self.phase is Phase.RECEIVING or self.length is None:
            return self.durable
        return self.length

    def to_record(self) -> dict[str, Any]:
        """What survives a restart; the stored byte count is read from the file itself."""
        record = {name: getattr(self, name) for name in _RECORDED}
        record["phase"] = self.phase.value
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any], stored: int) -> Upload:
        values = {name: record[name] for name in _RECORDED if name in record}
        upload = cls(**values)  # a record of an older version has no `result`
        upload.phase, upload.stored = Phase(record["phase"]), stored
        upload.durable = upload.firm = stored  # what a restart finds (synced before any
        # client hears)
        if upload.length is not None and stored > upload.length:
            raise ValueError(f"{stored} bytes stored for a {upload.length}-byte upload")
        return upload


def new_ticket_id() -> str:
    """A ticket: a random UUID4, the only name upload files get."""
    return str(uuid.uuid4())


@dataclass
class _Core:
    upload: Upload
    effects: Effects
    finishing: str = ""  # how it finished, for the log once that is durable


def bring_to_life(upload: Upload, effects: Effects) -> UploadLife:
    """Give an upload its table, in the state its phase names."""
    upload.life = _Machine(_Core(upload, effects), _STATE[upload.phase])
    return upload.life


# The table.

_builder = TypeMachineBuilder(UploadLife, _Core)
receiving = _builder.state("receiving")
handover = _builder.state("handover")
finish_requested = _builder.state("finish_requested")
awaiting_finish = _builder.state("awaiting_finish")
finished = _builder.state("finished")
cancelled = _builder.state("cancelled")
_STATE = {
    Phase.RECEIVING: receiving,
    Phase.HANDOVER: handover,
    Phase.FINISH_REQUESTED: finish_requested,
    Phase.AWAITING_FINISH: awaiting_finish,
    Phase.FINISHED: finished,
    Phase.CANCELLED: cancelled,
}
_LIVE = (receiving, handover, finish_requested, awaiting_finish)
_HANDING_OVER = (handover, finish_requested, awaiting_finish)
_ENDED = (finished, cancelled)
On = UploadLife  # the inputs, as the table names them


def _ignored(states: tuple[Any, ...], *inputs: Any) -> None:
    for state in states:
        for each in inputs:
            state.upon(each).loop().returns(None)


# Connections come and go in every state; only live uploads take new ones.


def _describe(upload: Upload, length: int | None, name: str, room: Room) -> bool:
    """Take the length and name of a new upload, or the length of one that deferred it
    (None: deferred, tus); True if it had them already."""
    if length is None:
        if upload.created:
            return True
        upload.length_deferred, upload.browser_name = True, name
        return False
    if upload.length is not None:
        if upload.length != length:
            raise UploadError(
                ErrorCode.LENGTH_MISMATCH,
                f"LengthBytes {length} differs from the {upload.length} given before",
            )
        return True
    if length < upload.received:
        raise UploadError(
            ErrorCode.LENGTH_MISMATCH,
            f"LengthBytes {length} is less than the {upload.received} bytes received already",
        )
    # (one whose length was deferred keeps within what the storage took it could grow to)
    room.check(length, length - upload.received, sized=not upload.length_deferred)
    upload.length = length
    if not upload.length_deferred:  # else its creation named it
        upload.browser_name = name
    return False


def _attach(core: _Core, transport: Transport, length: int | None, name: str, room: Room) -> None:
    upload = core.upload
    if upload.transport is not None:
        raise UploadError(ErrorCode.ALREADY_CONNECTED, "another connection is serving this upload")
    if upload.final and not transport.joins:
        raise UploadError(
            ErrorCode.LENGTH_MISMATCH,
            "a final upload takes its bytes from its partial uploads only",
        )
    _describe(upload, length, name, room)
    upload.transport, upload.via = transport, transport.via
    if upload.started_at is None and upload.received == 0:
        core.effects.happened(upload, Event.STARTED)
    elif upload.interrupted or upload.started_at is None:  # (an older version's record)
        core.effects.happened(upload, Event.RESUMED)
    upload.interrupted = False


for _state in _LIVE:

    @_state.upon(On.connect).loop()
    def _connect(
        life: UploadLife,
        core: _Core,
        transport: Transport,
        length: int | None,
        name: str,
        room: Room,
    ) -> None:
        _attach(core, transport, length, name, room)
        core.effects.touch(core.upload)
        core.effects.save(core.upload)

    @_state.upon(On.declare).loop()
    def _declare(
        life: UploadLife,
        core: _Core,
        length: int | None,
        name: str,
        room: Room,
        metadata: str = "",
        final: bool = False,
    ) -> None:
        upload = core.upload
        marked = final and not upload.final
        if marked and upload.transport is not None:
            raise UploadError(
                ErrorCode.ALREADY_CONNECTED, "another connection is serving this upload"
            )
        if marked and upload.received:
            raise UploadError(
                ErrorCode.LENGTH_MISMATCH,
                f"this upload has {upload.received} bytes of its own: a final request "
                "cannot join partial uploads into it",
            )
        known = _describe(upload, length, name, room) and not marked
        upload.final = upload.final or final
        if metadata and not upload.tus_metadata:  # the first creation's stay
            upload.tus_metadata, known = metadata, False
        if not known:
            core.effects.touch(upload)
            core.effects.save(upload)

    @_state.upon(On.disconnect).loop()
    def _disconnect(life: UploadLife, core: _Core, transport: Transport, how: Departure) -> None:
        upload = core.upload
        if upload.transport is transport:
            upload.transport = None
            core.effects.release(upload)
            if how is not Departure.DONE and upload.receiving and not upload.complete:
                upload.interrupted = True
                paused = how is Departure.PAUSED
                core.effects.happened(upload, Event.PAUSED if paused else Event.INTERRUPTED)
            core.effects.save(upload)  # keeps the idle deadline


def _refuse_ended(core: _Core) -> None:
    if core.upload.phase is Phase.FINISHED:
        message = "this upload is already finished"
        raise UploadError(ErrorCode.TICKET_FINISHED, message, core.upload.result)
    reason = core.upload.cancel_reason
    raise UploadError(ErrorCode.TICKET_CANCELLED, f"this upload was cancelled: {reason}")


for _state in _ENDED:

    @_state.upon(On.connect).loop()
    def _connect_ended(
        life: UploadLife,
        core: _Core,
        transport: Transport,
        length: int | None,
        name: str,
        room: Room,
    ) -> None:
        _refuse_ended(core)

    @_state.upon(On.declare).loop()
    def _declare_ended(
        life: UploadLife,
        core: _Core,
        length: int | None,
        name: str,
        room: Room,
        metadata: str = "",
        final: bool = False,
    ) -> None:
        _refuse_ended(core)


for _state in _ENDED:

    @_state.upon(On.disconnect).loop()
    def _detach(life: UploadLife, core: _Core, transport: Transport, how: Departure) -> None:
        if core.upload.transport is transport:
            core.upload.transport = None


# Receiving bytes.


@receiving.upon(On.ready).loop()
def _ready(life: UploadLife, core: _Core) -> None:
    _stand(core, core.upload.durable)
    if core.upload.whole:
        life.all_stored()


def _stand(core: _Core, upto: int) -> None:
    if upto > core.upload.firm:
        core.upload.firm = upto
        core.effects.stands(core.upload)


@receiving.upon(On.receive).loop()
def _receive(life: UploadLife, core: _Core, data: Chunk) -> None:
    upload, size = core.upload, len(data)
    # (of an upload whose length is not known yet, its transport keeps within the room)
    if upload.length is not None and upload.received + size > upload.length:
        life.past_end(
            f"chunk of {size} bytes at {upload.received} would grow the file "
            f"past LengthBytes {upload.length}"
        )
        return
    offset, sender = upload.received, upload.transport
    upload.pending.append((size, sender))
    upload.pending_bytes += size
    core.effects.touch(upload)
    core.effects.write(upload, offset, data, sender.digests if sender is not None else ())


@receiving.upon(On.written).loop()
def _written(life: UploadLife, core: _Core) -> None:
    upload = core.upload
    size, sender = upload.pending.popleft()
    upload.pending_bytes -= size
    upload.stored += size
    upload.unsynced.append((upload.stored, size, sender))
    if sender is not None:
        sender.written(size)


@receiving.upon(On.synced).loop()
def _synced(life: UploadLife, core: _Core, upto: int) -> None:
    upload = core.upload
    upload.durable = max(upload.durable, min(upto, upload.stored))
    holding, stands = False, upload.firm
    while upload.unsynced and upload.unsynced[0][0] <= upload.durable:
        end, size, sender = upload.unsynced.popleft()
        holding = sender is not None and sender.holding
        if sender is None or not sender.may_void:
            stands = end
        if sender is not None:
            sender.stored(size)
    _stand(core, stands)
    if upload.whole and not holding:
        life.all_stored()


@receiving.upon(On.storage_unavailable).loop()
def _storage_unavailable(life: UploadLife, core: _Core, error: UploadError) -> None:
    upload = core.upload
    log.warn(
        "upload {id}: {why}; it waits at {n} bytes durable",
        id=upload.id,
        why=error.message.partition(";")[0],
        n=upload.durable,
    )
    upload.pending.clear()
    upload.pending_bytes = 0
    _cut(core, upload.durable)
    if upload.transport is not None:
        upload.transport.failed(error)


@receiving.upon(On.rewind).loop()
def _rewind(life: UploadLife, core: _Core, offset: int) -> None:
    upload = core.upload
    assert not upload.pending and upload.firm <= offset <= upload.stored
    log.info("upload {id}: bytes from {n} on failed their check", id=upload.id, n=offset)
    _cut(core, offset)


def _cut(core: _Core, offset: int) -> None:
    """The file ends at `offset` again; results of writes queued before are dropped."""
    upload = core.upload
    upload.era += 1
    upload.unsynced.clear()
    upload.stored, upload.durable = offset, min(upload.durable, offset)
    core.effects.truncate(upload, offset)


@receiving.upon(On.all_stored).to(handover)
def _all_stored(life: UploadLife, core: _Core) -> None:
    upload = core.upload
    upload.phase = Phase.HANDOVER
    core.effects.happened(upload, Event.COMPLETE)  # notes when: retries count from there
    core.effects.save(upload)
    core.effects.hand_over(upload)


@receiving.upon(On.restored).loop()
def _restored_receiving(life: UploadLife, core: _Core, file_present: bool) -> None:
    if core.upload.whole:
        life.all_stored()


@receiving.upon(On.past_end).to(cancelled)
def _past_end(life: UploadLife, core: _Core, message: str) -> None:
    _end(core, Ending(ErrorCode.PAST_END, message), message, Cause.PAST_END)


for _state in (receiving, handover):  # a write, or making the file final, failed

    @_state.upon(On.storage_failed).to(cancelled)
    def _storage_failed(life: UploadLife, core: _Core, why: str) -> None:
        message = "storage failed"
        _end(core, Ending(ErrorCode.STORAGE_FAILED, message), message, Cause.STORAGE_FAILED, why)


# The handover, and the backend's answer.


@handover.upon(On.answered_done).to(finished)
def _done(life: UploadLife, core: _Core, result: str) -> None:
    _finish(core, result, "handed over and finished")


@handover.upon(On.answered_wait).to(awaiting_finish)
def _wait(life: UploadLife, core: _Core) -> None:
    upload = core.upload
    upload.phase = Phase.AWAITING_FINISH
    core.effects.arm_confirm(upload)
    core.effects.save(upload).addCallback(_tell_waiting, core)


@handover.upon(On.handover_failed).to(cancelled)
def _handover_failed(life: UploadLife, core: _Core, why: str) -> None:
    ending = Ending(ErrorCode.HANDOVER_FAILED, HANDOVER_FAILED_TEXT)
    _end(core, ending, HANDOVER_FAILED_TEXT, Cause.HANDOVER_FAILED, why)


@handover.upon(On.finish_upload).to(finish_requested)
def _finish_early(life: UploadLife, core: _Core, result: str) -> None:
    """The backend said `wait` and called `finish_upload` before we read the answer."""
    upload = core.upload
    upload.phase = Phase.FINISH_REQUESTED
    upload.result = result
    core.effects.save(upload)
    if upload.retrying or upload.late:  # no answer is on its way: none is waited for
        life.handover_retrying()


# The backend is away: its handover is tried again, for HandoverRetryS; the client does
# not wait that long.


@handover.upon(On.handover_retrying).loop()
def _retrying(life: UploadLife, core: _Core) -> None:
    core.upload.retrying = True


@handover.upon(On.handover_late).loop()
def _late(life: UploadLife, core: _Core) -> None:
    upload = core.upload
    if upload.late:
        return
    upload.late = True
    core.effects.save(upload).addCallback(_tell_pending, core)


def _tell_waiting(saved: bool, core: _Core) -> None:
    """The backend's `wait` is durable: the client hears the file is handed over."""
    if saved:
        core.effects.happened(core.upload, Event.HANDED_OVER)
        if core.upload.transport is not None:
            core.upload.transport.waiting()


def _tell_pending(saved: bool, core: _Core) -> None:
    """The handover is late, durably: the client hears the file is stored, pending."""
    if saved:
        core.effects.happened(core.upload, Event.PENDING)
        if core.upload.transport is not None:
            core.upload.transport.pending()


for _state in (handover, awaiting_finish):

    @_state.upon(On.ready).loop()
    def _ready_late(life: UploadLife, core: _Core) -> None:
        """A client that comes back while the handover is pending hears it again."""
        upload = core.upload
        if upload.late and upload.transport is not None:
            upload.transport.pending()


# The backend confirmed it has the file, whatever else its handover answer says.


_FINISHED_EARLY = "handed over and finished by the backend's finish_upload"


@finish_requested.upon(On.answered_done).to(finished)
def _confirmed_done(life: UploadLife, core: _Core, result: str) -> None:
    _finish(core, core.upload.result or result, _FINISHED_EARLY)


@finish_requested.upon(On.answered_wait).to(finished)
def _confirmed(life: UploadLife, core: _Core) -> None:
    _finish(core, core.upload.result, _FINISHED_EARLY)


@finish_requested.upon(On.handover_failed).to(finished)
def _confirmed_all_the_same(life: UploadLife, core: _Core, why: str) -> None:
    _finish(core, core.upload.result, f"{_FINISHED_EARLY} (its answer failed: {why})")


@finish_requested.upon(On.handover_retrying).to(finished)
def _confirmed_while_away(life: UploadLife, core: _Core) -> None:
    _finish(core, core.upload.result, f"{_FINISHED_EARLY} (its handover was being retried)")


@finish_requested.upon(On.handover_late).to(finished)
def _confirmed_unanswered(life: UploadLife, core: _Core) -> None:
    _finish(core, core.upload.result, f"{_FINISHED_EARLY} (its handover was not answered)")


@finish_requested.upon(On.finish_upload).loop()
def _finish_again(life: UploadLife, core: _Core, result: str) -> None:
    core.upload.result = core.upload.result or result


@awaiting_finish.upon(On.finish_upload).to(finished)
def _finish_upload(life: UploadLife, core: _Core, result: str) -> None:
    core.effects.disarm_confirm(core.upload)
    _finish(core, result, "finished by the backend's finish_upload")


@awaiting_finish.upon(On.confirm_timeout).to(cancelled)
def _confirm_timeout(life: UploadLife, core: _Core, waited_seconds: float) -> None:
    message = f"backend did not call finish_upload within {waited_seconds:g} s"
    _end(core, Ending(ErrorCode.HANDOVER_FAILED, message), message, Cause.CONFIRM_TIMEOUT)


for _state in (handover, finish_requested):

    @_state.upon(On.restored).loop()
    def _restored_handover(life: UploadLife, core: _Core, file_present: bool) -> None:
        upload = core.upload
        upload.retrying = False
        if upload.phase is Phase.HANDOVER and not upload.complete and file_present:
            life.bytes_missing()
        elif file_present:
            core.effects.hand_over(core.upload)  # again, with the whole file
        else:  # the backend took the file away: it answered; we died before saving that
            life.answered_done(core.upload.result)


@handover.upon(On.bytes_missing).to(receiving)
def _bytes_missing(life: UploadLife, core: _Core) -> None:
    upload = core.upload
    log.warn(
        "upload {id}: only {n} of its {length} bytes are in the store (the instance that "
        "held the rest died); it takes bytes again",
        id=upload.id,
        n=upload.durable,
        length=upload.length,
    )
    upload.phase = Phase.RECEIVING
    core.effects.save(upload)


@awaiting_finish.upon(On.restored).loop()
def _restored_awaiting(life: UploadLife, core: _Core, file_present: bool) -> None:
    core.effects.arm_confirm(core.upload)


@cancelled.upon(On.restored).loop()
def _restored_cancelled(life: UploadLife, core: _Core, file_present: bool) -> None:
    if core.upload.notice is not None:  # the backend is still owed it
        core.effects.discard_file(core.upload)


@cancelled.upon(On.notified).loop()
def _notified(life: UploadLife, core: _Core) -> None:
    core.upload.notice = core.upload.notice_began = None
    core.effects.save(core.upload)


@receiving.upon(On.finish_upload).loop()
def _finish_upload_too_soon(life: UploadLife, core: _Core, result: str) -> None:
    raise UploadError(ErrorCode.NOT_WAITING, "upload is receiving, not waiting for finish_upload")


for _state in _ENDED:

    @_state.upon(On.finish_upload).loop()
    def _finish_upload_ended(life: UploadLife, core: _Core, result: str) -> None:
        raise UploadError(
            ErrorCode.NOT_WAITING,
            f"upload is {core.upload.phase.value}, not waiting for finish_upload",
        )


# Finished.


def _finish(core: _Core, result: str, how: str) -> None:
    core.upload.phase = Phase.FINISHED
    core.upload.result = result
    core.finishing = how
    core.effects.touch(core.upload)
    core.effects.finalize(core.upload)  # durable before anybody hears of it


@finished.upon(On.finalized).loop()
def _finalized(life: UploadLife, core: _Core) -> None:
    upload = core.upload
    core.effects.happened(upload, Event.FINISHED, core.finishing)
    if upload.transport is not None:
        upload.transport.ended(Ending(None, result=upload.result))


# Cancelling: the connected client hears at once; the file goes next, the backend last.


@receiving.upon(On.cancel_by_backend).to(cancelled)
def _cancel_by_backend(life: UploadLife, core: _Core) -> None:
    reason = "cancelled by the backend"
    ending = Ending(ErrorCode.TICKET_CANCELLED, reason)
    _end(core, ending, None, Cause.BY_BACKEND, "")  # not echoed


@receiving.upon(On.cancel_by_client).to(cancelled)
def _cancel_by_client(life: UploadLife, core: _Core, reason: str) -> None:
    transport = core.upload.transport
    if core.upload.partial_of and transport is not None and transport.via == CONCAT:
        raise UploadError(ErrorCode.TOO_LATE, "this partial upload is being concatenated")
    given, reason = reason, reason or "cancelled by the user"
    _end(core, Ending(ErrorCode.TICKET_CANCELLED, reason), reason, Cause.BY_CLIENT, given)


@receiving.upon(On.idle_timeout).to(cancelled)
def _expired(life: UploadLife, core: _Core, idle_seconds: float) -> None:
    reason = f"upload idle for {idle_seconds:g} s"
    _end(core, Ending(ErrorCode.TICKET_CANCELLED, reason), reason, Cause.IDLE)


@receiving.upon(On.consumed).to(cancelled)
def _consumed(life: UploadLife, core: _Core) -> None:
    upload = core.upload
    upload.phase = Phase.CANCELLED
    upload.cancel_reason = "concatenated into the upload of its ticket"
    core.effects.touch(upload)
    core.effects.save(upload)
    core.effects.discard_file(upload)


def _too_late(core: _Core) -> None:
    if core.upload.phase is Phase.CANCELLED:
        raise UploadError(ErrorCode.TICKET_CANCELLED, "this upload is already cancelled")
    raise UploadError(
        ErrorCode.TOO_LATE, f"upload is {core.upload.phase.value}; too late to cancel"
    )


for _state in (*_HANDING_OVER, *_ENDED):

    @_state.upon(On.cancel_by_backend).loop()
    def _backend_too_late(life: UploadLife, core: _Core) -> None:
        _too_late(core)

    @_state.upon(On.cancel_by_client).loop()
    def _client_too_late(life: UploadLife, core: _Core, reason: str) -> None:
        _too_late(core)


def _end(
    core: _Core, ending: Ending, notice: str | None, cause: Cause, detail: str | None = None
) -> None:
    """Cancel: `ending` reaches the client once that is saved (durably); then the file
    goes and the backend hears `notice` (none when the backend asked for the cancel).
    The log says `detail` (by default the ending's message)."""
    upload = core.upload
    upload.phase = Phase.CANCELLED
    upload.cancel_reason = ending.message
    upload.notice = None if upload.partial_of else notice  # the backend knows only tickets
    core.effects.disarm_confirm(upload)
    core.effects.touch(upload)
    core.effects.happened(
        upload, Event.CANCELLED, ending.message if detail is None else detail, cause
    )  # notes when: the notice's retries count from there
    saved = core.effects.save(upload)
    transport = upload.transport
    if transport is not None:

        def tell(saved: bool) -> None:
            if saved:
                transport.ended(ending)

        saved.addCallback(tell)
    core.effects.discard_file(upload)


# Time passes.

for _state in _HANDING_OVER:  # the handover has timeouts of its own

    @_state.upon(On.idle_timeout).loop()
    def _still_handing_over(life: UploadLife, core: _Core, idle_seconds: float) -> None:
        core.effects.touch(core.upload)


for _state in _ENDED:

    @_state.upon(On.idle_timeout).loop()
    def _forget(life: UploadLife, core: _Core, idle_seconds: float) -> None:
        if core.upload.notice is not None:  # kept until the backend has heard of its end
            core.effects.touch(core.upload)
        else:
            core.effects.forget(core.upload)


# Inputs that mean nothing in a state: bytes, acks and answers that come too late.

_ignored((finish_requested, *_ENDED), On.ready)
_ignored(
    (*_HANDING_OVER, *_ENDED),
    On.receive,
    On.past_end,
    On.written,
    On.synced,
    On.storage_unavailable,
    On.all_stored,
    On.rewind,
)
_ignored(
    (receiving, awaiting_finish, *_ENDED), On.answered_done, On.answered_wait, On.handover_failed
)
_ignored((finish_requested, awaiting_finish, *_ENDED), On.storage_failed)
_ignored((receiving, handover, finish_requested, *_ENDED), On.confirm_timeout)
_ignored((*_LIVE, cancelled), On.finalized)
_ignored((receiving, awaiting_finish, *_ENDED), On.handover_retrying, On.handover_late)
_ignored((*_LIVE, finished), On.notified)
_ignored((*_HANDING_OVER, *_ENDED), On.consumed)
_ignored((receiving, finish_requested, awaiting_finish, *_ENDED), On.bytes_missing)


@finished.upon(On.restored).loop()
def _restored_finished(life: UploadLife, core: _Core, file_present: bool) -> None:
    if file_present and core.upload.remove_file_when_finished:  # a crash came before
        core.effects.discard_file(core.upload)


_Machine = _builder.build()


def _index(machine: Any) -> None:
    """automat finds a transition by comparing the (state, input) pair with each of the
    ~140 declared ones (about 30 microseconds per chunk here); a dict finds it in 2."""
    automaton = machine.__automat_automaton__
    index = {
        (id(state), symbol): (target, list(outputs))
        for state, symbol, target, outputs in automaton.allTransitions()
    }
    automaton.outputForInput = lambda state, symbol: index[(id(state), symbol)]


_index(_Machine)
