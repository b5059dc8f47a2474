"""Durable storage (SPEC: Acknowledged means durable), piece by piece: grouped syncs of an
upload's bytes, of the ticket journal, atomic state files, and what start-up does with a
state file it cannot read. The power cuts themselves are in test_powercut.py."""

from __future__ import annotations

import errno
import os
import threading
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.python.threadpool import ThreadPool

from incoming.files import fsync_dir, replace_file
from incoming.journal import TicketJournal
from incoming.storage import DirectorySync, DiskStorage

BLOCK = 4096


class CountedSync:
    """os.fdatasync, counted; `hold()` makes the next calls wait until `let_go()`."""

    def __init__(self) -> None:
        self.calls = 0
        self._open = threading.Event()
        self._open.set()
        self.entered: Deferred[None] = Deferred()  # fires when a sync begins after `hold`

    def __call__(self, fd: int) -> None:
        self.calls += 1
        entered = self.entered
        reactor.callFromThread(lambda: entered.called or entered.callback(None))
        self._open.wait(10)
        os.fdatasync(fd)

    def hold(self) -> None:
        self._open.clear()
        self.entered = Deferred()

    def let_go(self) -> None:
        self._open.set()


def disk(root: Path, pool: ThreadPool, counted: CountedSync, **options: bool) -> DiskStorage:
    storage = DiskStorage(root, reactor, pool, fdatasync=counted, **options)
    storage.prepare()
    return storage


def write_and_sync(
    storage: DiskStorage, upload_id: str, offset: int, data: bytes
) -> Deferred[None]:
    """A write, then (as the upload manager does once it lands) the wait for its bytes."""
    end = offset + len(data)
    d = storage.write(upload_id, offset, data)
    return d.addCallback(lambda _: storage.synced(upload_id, end))


@pytest_twisted.ensureDeferred
async def test_writes_that_land_while_a_sync_runs_share_the_next_one(
    tmp_path: Path, pool: ThreadPool
) -> None:
    sync = CountedSync()
    storage = disk(tmp_path, pool, sync)
    upload_id = str(uuid.uuid4())
    data = os.urandom(50 * BLOCK)
    sync.hold()  # the first sync (for the first write to land) takes its time
    durable = [
        write_and_sync(storage, upload_id, o, data[o : o + BLOCK])
        for o in range(0, len(data), BLOCK)
    ]
    await sync.entered
    await storage.drain(upload_id)  # the 49 others land meanwhile, and ask for a sync
    sync.let_go()
    await gatherResults(durable)
    assert sync.calls == 2
    assert (tmp_path / f"{upload_id}.part").read_bytes() == data


@pytest_twisted.ensureDeferred
async def test_writes_with_gaps_between_them_get_a_sync_each(
    tmp_path: Path, pool: ThreadPool
) -> None:
    sync = CountedSync()
    storage = disk(tmp_path, pool, sync)
    upload_id = str(uuid.uuid4())
    for n in range(5):
        await write_and_sync(storage, upload_id, n * BLOCK, b"x" * BLOCK)
    assert sync.calls == 5
    await storage.synced(upload_id, 5 * BLOCK)  # all durable already: no sync
    assert sync.calls == 5


@pytest_twisted.ensureDeferred
async def test_writes_go_on_while_a_sync_runs_and_the_next_sync_covers_them(
    tmp_path: Path, pool: ThreadPool
) -> None:
    sync = CountedSync()
    storage = disk(tmp_path, pool, sync)
    upload_id = str(uuid.uuid4())
    sync.hold()
    first = write_and_sync(storage, upload_id, 0, b"a" * BLOCK)
    await sync.entered  # the first sync has begun, and waits
    later = [storage.write(upload_id, n * BLOCK, b"b" * BLOCK) for n in range(1, 4)]
    await gatherResults(later)  # landed while the sync waits: not queued behind it
    durable: list[object] = []
    first.addCallback(durable.append)
    waiting = [storage.synced(upload_id, n * BLOCK) for n in range(2, 5)]
    for d in waiting:
        d.addCallback(durable.append)
    assert durable == []
    sync.let_go()
    await gatherResults([first, *waiting])
    assert len(durable) == 4
    assert sync.calls == 2  # one for the first write, one shared by the three others


@pytest_twisted.ensureDeferred
async def test_with_sync_off_nothing_is_synced(tmp_path: Path, pool: ThreadPool) -> None:
    sync = CountedSync()
    storage = disk(tmp_path, pool, sync, sync=False)
    upload_id = str(uuid.uuid4())
    await write_and_sync(storage, upload_id, 0, b"z" * BLOCK)
    await storage.record_ticket(str(uuid.uuid4()), {"id": "t"})
    await storage.save_state(upload_id, {"id": upload_id})
    await storage.complete(upload_id)
    assert sync.calls == 0


@pytest_twisted.ensureDeferred
async def test_waiting_for_bytes_that_are_cut_off_unsynced_fails(
    tmp_path: Path, pool: ThreadPool
) -> None:
    sync = CountedSync()
    storage = disk(tmp_path, pool, sync)
    upload_id = str(uuid.uuid4())
    await write_and_sync(storage, upload_id, 0, b"a" * BLOCK)
    sync.hold()
    await storage.write(upload_id, BLOCK, b"b" * BLOCK)
    cut_off = storage.synced(upload_id, 2 * BLOCK)
    truncated = storage.truncate(upload_id, BLOCK)
    sync.let_go()
    await truncated
    with pytest.raises(OSError, match="cut off"):
        await cut_off
    await storage.synced(upload_id, BLOCK)  # what is left stays durable
    assert (tmp_path / f"{upload_id}.part").read_bytes() == b"a" * BLOCK


@pytest_twisted.ensureDeferred
async def test_tickets_appended_together_share_a_journal_sync(
    tmp_path: Path, pool: ThreadPool
) -> None:
    sync = CountedSync()
    journal = TicketJournal(tmp_path / "j", reactor, pool, fdatasync=sync)
    journal.load()
    assert sync.calls == 1  # the journal made anew at start-up, durably
    ids = [str(uuid.uuid4()) for _ in range(20)]
    await gatherResults([journal.append(i, {"id": i}) for i in ids])
    assert sync.calls == 2  # one batch: asked for together, written and synced together
    await gatherResults([journal.append(i, {"id": i}) for i in ids[:5]])
    assert sync.calls == 3
    journal.close()


@pytest_twisted.ensureDeferred
async def test_a_ticket_whose_sync_failed_is_not_in_the_journal(
    tmp_path: Path, pool: ThreadPool
) -> None:
    """The backend hears of an error: no restart may bring the ticket back."""
    failing: list[bool] = []

    def sync(fd: int) -> None:
        if failing:
            raise OSError(errno.EIO, "Input/output error")
        os.fdatasync(fd)

    journal = TicketJournal(tmp_path / "j", reactor, pool, fdatasync=sync)
    journal.load()
    kept, lost = str(uuid.uuid4()), str(uuid.uuid4())
    await journal.append(kept, {"id": kept})
    failing.append(True)
    with pytest.raises(OSError):
        await journal.append(lost, {"id": lost})
    journal.close()
    assert sorted(TicketJournal(tmp_path / "j", reactor, pool).load()) == [kept]


@pytest_twisted.ensureDeferred
async def test_directory_syncs_asked_for_together_are_shared(
    tmp_path: Path, pool: ThreadPool
) -> None:
    calls: list[Path] = []

    def counted(path: Path) -> None:
        calls.append(path)
        fsync_dir(path)

    directory = DirectorySync(tmp_path, reactor, pool, counted)
    await gatherResults([directory.synced() for _ in range(20)])
    assert calls == [tmp_path] * 2  # the first at once; the 19 asking meanwhile share one
    await directory.synced()
    assert len(calls) == 3


def test_a_failed_replacement_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    replace_file(path, b'{"old": 1}', sync=True)

    def failing(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        replace_file(path, b'{"new": 2}', sync=True, fsync=failing)
    assert path.read_bytes() == b'{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no .tmp left


@pytest_twisted.ensureDeferred
async def test_an_unreadable_state_file_is_set_aside_and_its_data_kept(
    tmp_path: Path, pool: ThreadPool, server_log: list[str]
) -> None:
    storage = disk(tmp_path, pool, CountedSync())
    empty, garbled, fine = (str(uuid.uuid4()) for _ in range(3))
    (tmp_path / f"{empty}.json").write_bytes(b"")  # created, never synced, then a power cut
    (tmp_path / f"{empty}.part").write_bytes(b"bytes of an upload")
    (tmp_path / f"{garbled}.json").write_bytes(b'{"id": "')
    await storage.save_state(fine, {"id": fine, "phase": "receiving"})
    (tmp_path / f"{fine}.json.tmp").write_bytes(b"{")  # a replacement cut short
    found = DiskStorage(tmp_path, reactor, pool).load()
    assert [saved.record["id"] for saved in found] == [fine]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert f"{empty}.part" in names and (tmp_path / f"{empty}.part").read_bytes()
    assert not any(name.endswith(".tmp") for name in names)
    assert f"{empty}.json" not in names and f"{garbled}.json" not in names
    aside = [name for name in names if ".json.unreadable-" in name]
    assert sorted(name.split(".")[0] for name in aside) == sorted([empty, garbled])
    assert sum("set aside" in line for line in server_log) == 2
    again = DiskStorage(tmp_path, reactor, pool).load()  # set aside once, ignored after
    assert [saved.record["id"] for saved in again] == [fine]
