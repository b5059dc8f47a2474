"""In-memory stand-ins for the parts an upload's life talks to (storage, the
handover, a transport). They answer at once, so a test sees exactly the order
in which inputs and outputs happen."""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from incoming.files import Chunk, Pieces
from incoming.handover import Answer, BackendAway, HandoverFailed
from incoming.storage import Completed, Record, Saved
from incoming.upload import Ending, Upload


class MemoryStorage:
    """`incoming.storage.Storage` in memory; writes fail past `full_at` bytes (ENOSPC:
    later writes too, until a truncate) or `broken_at` (EIO)."""

    def __init__(
        self, free: int = 1 << 40, full_at: int | None = None, broken_at: int | None = None
    ) -> None:
        self.free = free
        self.full_at = full_at
        self.broken_at = broken_at
        self.short: set[str] = set()  # uploads whose write found no space
        self.parts: dict[str, bytearray] = {}  # files being written
        self.finals: dict[str, bytes] = {}  # complete files
        self.journal: dict[str, Record] = {}
        self.states: dict[str, Record] = {}
        self.saves: list[tuple[str, object]] = []  # (id, phase), in order
        self.unsaveable_phases: set[str] = set()  # states in these phases find no space
        self.open: set[str] = set()  # uploads whose file is open
        self.firms: list[tuple[str, int]] = []  # (id, bytes that stand), as told

    def load(self) -> list[Saved]:
        records = {**self.journal, **self.states}
        return [
            Saved(record, len(self.parts.get(i, self.finals.get(i, b""))), True, None)
            for i, record in records.items()
        ]

    def free_bytes(self) -> int:
        return self.free

    def saved(self) -> Deferred[list[Saved]]:
        return succeed(self.load())

    def stored(self, upload_id: str) -> Deferred[tuple[int, bool]]:
        for files in (self.parts, self.finals):
            if upload_id in files:
                return succeed((len(files[upload_id]), True))
        return succeed((0, False))

    def read_state(self, upload_id: str) -> Deferred[Record | None]:
        return succeed(self.states.get(upload_id, self.journal.get(upload_id)))

    def record_ticket(self, upload_id: str, record: Record) -> Deferred[None]:
        self.journal[upload_id] = record
        return succeed(None)

    def save_state(self, upload_id: str, record: Record) -> Deferred[None]:
        if record["phase"] in self.unsaveable_phases:
            return fail(OSError(errno.ENOSPC, "No space left on device"))
        self.states[upload_id] = record
        self.saves.append((upload_id, record["phase"]))
        return succeed(None)

    def write(
        self,
        upload_id: str,
        offset: int,
        data: Chunk,
        digests: tuple[Any, ...] = (),
        hashed: bool = True,
    ) -> Deferred[None]:
        data = b"".join(data.parts) if isinstance(data, Pieces) else data
        for digest in digests:
            digest.update(data)
        if self.broken_at is not None and offset + len(data) > self.broken_at:
            return fail(OSError(errno.EIO, "Input/output error"))
        if upload_id in self.short or (
            self.full_at is not None and offset + len(data) > self.full_at
        ):
            self.short.add(upload_id)
            return fail(OSError(errno.ENOSPC, "No space left on device"))
        part = self.parts.setdefault(upload_id, bytearray())
        part[offset : offset + len(data)] = data
        self.open.add(upload_id)
        return succeed(None)

    def synced(self, upload_id: str, upto: int) -> Deferred[None]:
        return succeed(None)  # memory is as durable as it gets here

    def release(self, upload_id: str) -> Deferred[None]:
        self.open.discard(upload_id)
        return succeed(None)

    def drain(self, upload_id: str) -> Deferred[None]:
        return succeed(None)

    def drain_all(self) -> Deferred[list[None]]:
        return succeed([])

    def complete(self, upload_id: str) -> Deferred[Completed]:
        final = self.finals[upload_id] = bytes(self.parts.pop(upload_id, b""))
        self.open.discard(upload_id)
        sha256 = hashlib.sha256(final).hexdigest()
        return succeed(Completed(f"/memory/{upload_id}", sha256))

    def remove(self, upload_id: str) -> Deferred[None]:
        self.parts.pop(upload_id, None)
        self.finals.pop(upload_id, None)
        self.open.discard(upload_id)
        return succeed(None)

    async def discard(self, upload_id: str) -> None:
        self.journal.pop(upload_id, None)
        self.states.pop(upload_id, None)
        self.parts.pop(upload_id, None)

    def truncate(self, upload_id: str, size: int) -> Deferred[None]:
        self.short.discard(upload_id)
        del self.parts.setdefault(upload_id, bytearray())[size:]
        return succeed(None)

    def forget(self, upload_id: str) -> None:
        pass

    def firm(self, upload_id: str, upto: int, length: int | None) -> None:
        self.firms.append((upload_id, upto))

    shared = splices = True

    def take_up(self, upload_id: str) -> Deferred[tuple[int, bool]]:
        return self.stored(upload_id)

    def let_go(self, upload_id: str, size: int) -> Deferred[None]:
        return succeed(None)

    def leave(self, upload_id: str) -> None:
        pass


class RecordingHandover:
    """`incoming.handover.Handover` that answers as told: `done` (with `result`), `wait`,
    `fail` (a refusal) or `away` (no answer: BackendAway); with `hold`, each handover
    waits for `answer(...)`. Cancel notices meet `notices_away` BackendAways first."""

    def __init__(self, answer: str = "done", hold: bool = False, result: str = "") -> None:
        self.default = answer
        self.hold = hold
        self.result = result
        self.handovers: list[tuple[str, str]] = []  # (id, filename)
        self.digests: list[str | None] = []
        self.notices: list[tuple[str, str]] = []  # (id, reason), delivered
        self.notices_away = 0
        self.notice_attempts = 0
        self.waiting: list[Deferred[str]] = []

    async def hand_over(
        self,
        upload: Upload,
        filename: str,
        sha256: str | None,
        extra: Mapping[str, str] | None = None,
    ) -> Answer:
        self.handovers.append((upload.id, filename))
        self.digests.append(sha256)
        answer = self.default
        if self.hold:
            waiting: Deferred[str] = Deferred()
            self.waiting.append(waiting)
            answer = await waiting
        if answer == "fail":
            raise HandoverFailed("backend answered b'nope'")
        if answer == "away":
            raise BackendAway("backend answered HTTP 503")
        return Answer(answer, self.result if answer == "done" else "")

    def answer(self, answer: str) -> None:
        self.waiting.pop(0).callback(answer)

    async def notify_cancelled(self, upload: Upload, reason: str) -> None:
        self.notice_attempts += 1
        if self.notices_away:
            self.notices_away -= 1
            raise BackendAway("cannot reach backend: ConnectionRefusedError")
        self.notices.append((upload.id, reason))


class RecordingTransport:
    """`incoming.upload.Transport` that writes down what it hears."""

    via = "websocket"
    joins = False
    digests = ()
    holding = may_void = False

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def written(self, size: int) -> None:
        pass  # back-pressure only: `stored` is what a client hears

    def stored(self, size: int) -> None:
        self.events.append(("stored", size))

    def failed(self, error: Any) -> None:
        self.events.append(("failed", error.code, error.message))

    def ended(self, ending: Ending) -> None:
        self.events.append(("ended", ending.code, ending.message))

    def waiting(self) -> None:
        self.events.append(("waiting",))

    def pending(self) -> None:
        self.events.append(("pending",))

    def going_away(self) -> None:
        self.events.append(("going away",))
