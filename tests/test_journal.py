"""The ticket journal: group commit, tombstones, compaction, and what a restart reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.python.threadpool import ThreadPool

from incoming.journal import TicketJournal
from incoming.storage import DiskStorage

IDS = [f"00000000-0000-4000-8000-{n:012d}" for n in range(40)]


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


@pytest_twisted.ensureDeferred
async def test_tickets_appended_together_are_written_together(
    tmp_path: Path, pool: ThreadPool
) -> None:
    journal = TicketJournal(tmp_path / "j", reactor, pool)
    journal.load()
    await gatherResults([journal.append(i, {"id": i, "n": k}) for k, i in enumerate(IDS[:10])])
    assert lines(tmp_path / "j") == [{"id": i, "n": k} for k, i in enumerate(IDS[:10])]
    journal.close()


@pytest_twisted.ensureDeferred
async def test_restart_reads_live_tickets_only(tmp_path: Path, pool: ThreadPool) -> None:
    journal = TicketJournal(tmp_path / "j", reactor, pool)
    journal.load()
    for i in IDS[:5]:
        await journal.append(i, {"id": i})
    await journal.forget(IDS[1])
    journal.close()
    (tmp_path / "j").write_bytes(
        (tmp_path / "j").read_bytes() + b'{"id": "torn'
    )  # a crash mid-line
    again = TicketJournal(tmp_path / "j", reactor, pool)
    assert sorted(again.load()) == [IDS[0], IDS[2], IDS[3], IDS[4]]
    assert lines(tmp_path / "j") == [{"id": i} for i in (IDS[0], IDS[2], IDS[3], IDS[4])]


@pytest_twisted.ensureDeferred
async def test_compaction_keeps_exactly_the_live_tickets(tmp_path: Path, pool: ThreadPool) -> None:
    journal = TicketJournal(tmp_path / "j", reactor, pool, compact_at=500)
    journal.load()
    for i in IDS[:30]:
        await journal.append(i, {"id": i, "pad": "x" * 20})
    for i in IDS[:10]:
        journal.superseded(i)  # they have state files now
    # The first tombstone is written alone; the other nine, queued behind it,
    # make half the journal dead, so their batch compacts it.
    await gatherResults([journal.forget(i) for i in IDS[10:20]])
    await journal.append(IDS[30], {"id": IDS[30], "pad": ""})
    compacted = lines(tmp_path / "j")  # no tombstones, no superseded lines, no duplicates
    assert sorted(str(e["id"]) for e in compacted) == IDS[20:31]
    assert len(compacted) == 11
    journal.close()


@pytest_twisted.ensureDeferred
async def test_many_live_tickets_are_appended_not_rewritten(
    tmp_path: Path, pool: ThreadPool
) -> None:
    journal = TicketJournal(tmp_path / "j", reactor, pool, compact_at=500)
    journal.load()
    inode = (tmp_path / "j").stat().st_ino
    for i in IDS[:30]:  # four times compact_at, all of it live
        await journal.append(i, {"id": i, "pad": "x" * 20})
    assert (tmp_path / "j").stat().st_ino == inode  # never replaced by a compaction
    assert [e["id"] for e in lines(tmp_path / "j")] == IDS[:30]
    journal.close()


@pytest_twisted.ensureDeferred
async def test_storage_load_prefers_state_files(tmp_path: Path, pool: ThreadPool) -> None:
    storage = DiskStorage(tmp_path, reactor, pool)
    storage.prepare()
    assert storage.load() == []
    await storage.record_ticket(IDS[0], {"id": IDS[0], "phase": "receiving"})
    await storage.record_ticket(IDS[1], {"id": IDS[1], "phase": "receiving"})
    await storage.save_state(IDS[1], {"id": IDS[1], "phase": "handover"})
    await storage.write(IDS[1], 0, b"12345")
    await ensureDeferred(storage.discard(IDS[0]))
    storage.journal.close()
    again = DiskStorage(tmp_path, reactor, pool)
    [saved] = again.load()
    assert (saved.record, saved.stored, saved.present) == (
        {"id": IDS[1], "phase": "handover"},
        5,
        True,
    )
    assert saved.modified == (tmp_path / f"{IDS[1]}.part").stat().st_mtime
