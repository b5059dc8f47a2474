"""The power-cut file system itself: it loses what was not fsynced and keeps what was, so
that tests built on it cannot pass by accident."""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from incoming.files import fsync_dir

from .harness import Daemon
from .powercut import PowerCutDir, mounted, unavailable


def write(path: Path, data: bytes, sync: str | None = "fsync", flags: int = os.O_TRUNC) -> None:
    """Writes `data` to `path` (created if need be), then `sync`s it: fsync, fdatasync, None."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        os.write(fd, data)
        if sync is not None:
            getattr(os, sync)(fd)
    finally:
        os.close(fd)


def durable(path: Path, data: bytes) -> None:
    """A file whose content and name are both on disk."""
    write(path, data)
    fsync_dir(path.parent)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (None) under `root`, by relative path."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


@pytest_twisted.ensureDeferred
async def test_unsynced_writes_are_read_back_then_lost(powercut_dir: PowerCutDir) -> None:
    f = powercut_dir.path / "f"
    durable(f, b"durable")
    with open(f, "r+b") as file:
        file.write(b"DUR")  # over durable bytes
        file.seek(0, os.SEEK_END)
        file.write(b" and more")
    assert f.read_bytes() == b"DURable and more"
    await powercut_dir.power_cut()
    assert f.read_bytes() == b"durable"


@pytest.mark.parametrize("sync", ["fsync", "fdatasync", "O_DSYNC"])
@pytest_twisted.ensureDeferred
async def test_synced_writes_are_kept(powercut_dir: PowerCutDir, sync: str) -> None:
    f = powercut_dir.path / "f"
    durable(f, b"old")
    if sync == "O_DSYNC":  # each write durable on return
        write(f, b"new content", sync=None, flags=os.O_TRUNC | os.O_DSYNC)
    else:
        write(f, b"new content", sync=sync)
    await powercut_dir.power_cut()
    assert f.read_bytes() == b"new content"


@pytest_twisted.ensureDeferred
async def test_only_what_the_last_fsync_saw_survives(powercut_dir: PowerCutDir) -> None:
    data = os.urandom(3 * 1024 * 1024)
    f = powercut_dir.path / "f"
    durable(f, data)
    fd = os.open(f, os.O_RDWR)
    os.pwrite(fd, b"A" * 5000, 1_000_000)  # kept: fsynced below
    os.pwrite(fd, b"B" * 100, 4095)
    os.fsync(fd)
    os.pwrite(fd, b"C" * 70_000, 999_000)  # lost: overlaps A and durable bytes
    os.pwrite(fd, b"D" * 10, 4090)  # lost: overlaps B
    os.pwrite(fd, b"E" * 2_000_000, len(data) - 10)  # lost: grows the file
    os.close(fd)
    expected = bytearray(data)
    expected[1_000_000:1_005_000] = b"A" * 5000
    expected[4095:4195] = b"B" * 100
    await powercut_dir.power_cut()
    assert f.read_bytes() == bytes(expected)


@pytest.mark.parametrize("dir_synced", [True, False])
@pytest_twisted.ensureDeferred
async def test_a_new_file_needs_its_directory_fsynced(
    powercut_dir: PowerCutDir, dir_synced: bool
) -> None:
    f = powercut_dir.path / "new"
    write(f, b"fsynced data")
    if dir_synced:
        fsync_dir(powercut_dir.path)
    await powercut_dir.power_cut()
    assert tree(powercut_dir.path) == ({"new": b"fsynced data"} if dir_synced else {})


@pytest_twisted.ensureDeferred
async def test_a_durable_name_without_fsynced_data_comes_back_empty(
    powercut_dir: PowerCutDir,
) -> None:
    write(powercut_dir.path / "f", b"never fsynced", sync=None)
    fsync_dir(powercut_dir.path)
    await powercut_dir.power_cut()
    assert tree(powercut_dir.path) == {"f": b""}


@pytest.mark.parametrize("dir_synced", [True, False])
@pytest_twisted.ensureDeferred
async def test_rename_needs_the_directory_fsynced(
    powercut_dir: PowerCutDir, dir_synced: bool
) -> None:
    durable(powercut_dir.path / "a", b"content")
    os.rename(powercut_dir.path / "a", powercut_dir.path / "b")
    if dir_synced:
        fsync_dir(powercut_dir.path)
    await powercut_dir.power_cut()
    assert tree(powercut_dir.path) == {"b" if dir_synced else "a": b"content"}


@pytest.mark.parametrize(
    ("synced", "survivors"),
    [
        ({"from", "to"}, {"from": None, "to": None, "to/f": b"content"}),
        ({"to"}, {"from": None, "from/f": b"content", "to": None, "to/f": b"content"}),
        ({"from"}, {"from": None, "to": None}),  # lost: strict POSIX, unlike ext4's journal
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_move_between_directories_needs_both_fsynced(
    powercut_dir: PowerCutDir, synced: set[str], survivors: dict[str, bytes | None]
) -> None:
    root = powercut_dir.path
    (root / "from").mkdir()
    (root / "to").mkdir()
    fsync_dir(root)
    durable(root / "from" / "f", b"content")
    os.rename(root / "from" / "f", root / "to" / "f")
    for name in synced:
        fsync_dir(root / name)
    await powercut_dir.power_cut()
    assert tree(root) == survivors


@pytest.mark.parametrize("dir_synced", [True, False])
@pytest_twisted.ensureDeferred
async def test_atomic_replace_survives_only_with_the_directory_fsynced(
    powercut_dir: PowerCutDir, dir_synced: bool
) -> None:
    """O_TRUNC + write + fsync of a temporary file, rename over the old one, fsync the
    directory: the new file, else the old one whole."""
    target, temporary = powercut_dir.path / "state.json", powercut_dir.path / "state.json.tmp"
    durable(target, b'{"version": 1}')
    durable(temporary, b"leftover of an earlier attempt, replaced by O_TRUNC")
    write(temporary, b'{"version": 2}')
    os.replace(temporary, target)
    assert tree(powercut_dir.path) == {"state.json": b'{"version": 2}'}
    if dir_synced:
        fsync_dir(powercut_dir.path)
    await powercut_dir.power_cut()
    if dir_synced:
        assert tree(powercut_dir.path) == {"state.json": b'{"version": 2}'}
    else:  # the temporary name is back too, with what its last fsync saw
        assert tree(powercut_dir.path) == {
            "state.json": b'{"version": 1}',
            "state.json.tmp": b'{"version": 2}',
        }


@pytest_twisted.ensureDeferred
async def test_journal_lines_appended_after_the_last_fsync_are_lost(
    powercut_dir: PowerCutDir,
) -> None:
    journal = powercut_dir.path / "journal"
    durable(journal, b"")
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND)
    for line in (b"one\n", b"two\n"):
        os.write(fd, line)
    os.fdatasync(fd)
    os.write(fd, b"three\n")
    os.close(fd)
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND)  # a second handle appends at the end
    os.write(fd, b"four\n")
    os.close(fd)
    assert journal.read_bytes() == b"one\ntwo\nthree\nfour\n"
    await powercut_dir.power_cut()
    assert journal.read_bytes() == b"one\ntwo\n"


@pytest.mark.parametrize("dir_synced", [True, False])
@pytest_twisted.ensureDeferred
async def test_unlink_needs_the_directory_fsynced(
    powercut_dir: PowerCutDir, dir_synced: bool
) -> None:
    durable(powercut_dir.path / "f", b"content")
    with open(powercut_dir.path / "f", "ab") as file:
        file.write(b" not synced")
    os.unlink(powercut_dir.path / "f")
    if dir_synced:
        fsync_dir(powercut_dir.path)
    await powercut_dir.power_cut()
    assert tree(powercut_dir.path) == ({} if dir_synced else {"f": b"content"})


@pytest_twisted.ensureDeferred
async def test_truncation_is_undone_unless_fsynced(powercut_dir: PowerCutDir) -> None:
    lost, kept, reopened = (powercut_dir.path / name for name in ("lost", "kept", "reopened"))
    data = os.urandom(100_000)
    for f in (lost, kept, reopened):
        durable(f, data)
    os.truncate(lost, 10)
    fd = os.open(kept, os.O_RDWR)
    os.ftruncate(fd, 10)
    os.fsync(fd)
    os.ftruncate(fd, 5)  # lost
    os.close(fd)
    os.close(os.open(reopened, os.O_WRONLY | os.O_TRUNC))
    assert [f.stat().st_size for f in (lost, kept, reopened)] == [10, 5, 0]
    await powercut_dir.power_cut()
    assert tree(powercut_dir.path) == {"kept": data[:10], "lost": data, "reopened": data}


@pytest.mark.parametrize("unsynced", [None, "a/b", "a", "."])
@pytest_twisted.ensureDeferred
async def test_nested_directories_need_each_level_fsynced(
    powercut_dir: PowerCutDir, unsynced: str | None
) -> None:
    root = powercut_dir.path
    (root / "a" / "b").mkdir(parents=True)
    write(root / "a" / "b" / "f", b"deep")
    for level in ("a/b", "a", "."):
        if level != unsynced:
            fsync_dir(root / level)
    await powercut_dir.power_cut()
    full = {"a": None, "a/b": None, "a/b/f": b"deep"}
    survivors = {
        None: full,
        "a/b": {"a": None, "a/b": None},
        "a": {"a": None},
        ".": {},
    }[unsynced]
    assert tree(root) == survivors


@pytest_twisted.ensureDeferred
async def test_renamed_and_removed_directories_come_back(powercut_dir: PowerCutDir) -> None:
    root = powercut_dir.path
    (root / "moved").mkdir()
    (root / "removed").mkdir()
    durable(root / "moved" / "f", b"in moved")
    durable(root / "removed" / "g", b"in removed")
    fsync_dir(root)
    os.rename(root / "moved", root / "elsewhere")
    os.unlink(root / "removed" / "g")
    os.rmdir(root / "removed")
    assert tree(root) == {"elsewhere": None, "elsewhere/f": b"in moved"}
    await powercut_dir.power_cut()
    assert tree(root) == {
        "moved": None,
        "moved/f": b"in moved",
        "removed": None,
        "removed/g": b"in removed",
    }


@pytest_twisted.ensureDeferred
async def test_each_cut_starts_from_what_survived_the_last(powercut_dir: PowerCutDir) -> None:
    durable(powercut_dir.path / "first", b"1")
    write(powercut_dir.path / "lost", b"x")
    await powercut_dir.power_cut()
    durable(powercut_dir.path / "second", b"2")
    write(powercut_dir.path / "first", b"changed", sync=None)
    await powercut_dir.power_cut(remount=False)
    assert tree(powercut_dir.backing) == {"first": b"1", "second": b"2"}
    assert sorted(p.name for p in powercut_dir.backing.parent.iterdir()) == ["disk", "mnt"]
    assert powercut_dir.cuts == [
        "0 files and 1 directories reverted",
        "1 files and 0 directories reverted",
    ]


@pytest_twisted.ensureDeferred
async def test_files_left_open_do_not_stop_the_cut(powercut_dir: PowerCutDir) -> None:
    durable(powercut_dir.path / "f", b"durable")
    fd = os.open(powercut_dir.path / "f", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b" lost")
    directory = os.open(powercut_dir.path, os.O_RDONLY | os.O_DIRECTORY)
    await powercut_dir.power_cut()
    with pytest.raises(OSError) as cut_off:
        os.write(fd, b"too late")
    assert cut_off.value.errno == errno.ENOTCONN
    with pytest.raises(OSError):  # its flush cannot reach the old mount either
        os.close(fd)
    os.close(directory)
    assert tree(powercut_dir.path) == {"f": b"durable"}


# A tiny "server": a journal made durable record by record (each acknowledged on stdout
# once fdatasync returned), and a scratch file written but never synced; it never
# closes them, and is killed mid-stream.
WRITER = r"""
import os, sys
root = sys.argv[1]
journal = os.open(os.path.join(root, "journal"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
scratch = os.open(os.path.join(root, "scratch"), os.O_WRONLY | os.O_CREAT, 0o644)
directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
os.fsync(directory)
n = 0
while True:
    os.write(scratch, b"s" * 4096)
    os.write(journal, b"record %06d\n" % n)
    os.fdatasync(journal)
    print("acked", n, flush=True)
    n += 1
"""


@pytest_twisted.ensureDeferred
async def test_a_killed_writer_keeps_exactly_its_synced_records(
    powercut_dir: PowerCutDir,
) -> None:
    writer = Daemon(ready=rb"acked 0\n")
    command = [sys.executable, "-c", WRITER, str(powercut_dir.path)]
    process = reactor.spawnProcess(writer, sys.executable, command)  # type: ignore[attr-defined]
    await writer.logged(rb"acked 200\n")
    process.signalProcess(signal.SIGKILL)
    assert await writer.ended == (None, signal.SIGKILL)
    acked = max(int(n) for n in re.findall(rb"acked (\d+)\n", writer.output))
    scratch = powercut_dir.path / "scratch"
    assert scratch.stat().st_size > 0
    await powercut_dir.power_cut()
    records = (powercut_dir.path / "journal").read_bytes().splitlines(keepends=True)
    # every acknowledged record, and at most the one synced but not yet acknowledged
    assert acked + 1 <= len(records) <= acked + 2
    assert records == [b"record %06d\n" % n for n in range(len(records))]
    assert scratch.read_bytes() == b""


@pytest_twisted.ensureDeferred
async def test_a_crashed_file_system_is_reported_and_unmounted(tmp_path: Path) -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    directory = PowerCutDir(tmp_path)
    await directory.mount()
    assert mounted(directory.path)
    directory._process.signalProcess(signal.SIGKILL)
    with pytest.raises(AssertionError, match="powercut-fs mounted"):
        await directory.close()
    assert not mounted(directory.path)
