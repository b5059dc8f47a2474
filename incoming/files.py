"""File helpers shared by storage and the journal: whole writes, atomic replacement,
durable names.

State files hold backend secrets and are created 0600; upload data is 0640. "Durable"
follows POSIX strictly (what a power cut cannot take): a file's bytes once it is
fsynced, its name once its directory is fsynced too.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

Buffer = bytes | bytearray | memoryview


class Pieces:
    """Bytes that arrived in several reads, written with one `pwritev`: never joined."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.size = sum(map(len, parts))

    def __len__(self) -> int:
        return self.size


class Spliced:
    """Bytes already stored in another upload's partial file (a tus partial upload), to
    be copied by the kernel (`copy_range`), never through this process's memory."""

    def __init__(self, source: str, offset: int, size: int) -> None:
        self.source = source  # the upload id whose file holds them
        self.offset = offset
        self.size = size

    def __len__(self) -> int:
        return self.size


Chunk = Buffer | Pieces | Spliced  # what an upload's transport hands on to be written
STATE_MODE, DATA_MODE, DIRECTORY_MODE = 0o600, 0o640, 0o750
SHARED_DIRECTORY_MODE = 0o770  # with --group: its members move and delete handed-over files
IOV_MAX = 1024  # buffers one pwritev takes (Linux)
READ_BLOCK = 4 * 1024 * 1024  # read at once to hash a file's bytes (or to copy them by hand)


class Digest(Protocol):
    """A hashlib hash, fed as bytes are written."""

    def update(self, data: Buffer, /) -> None: ...

    def digest(self) -> bytes: ...


def write_all(fd: int, data: Buffer, write: Callable[[int, Buffer], int] = os.write) -> None:
    """Write every byte: a short write (a full disk) must not leave a truncated file."""
    view = memoryview(data).cast("B")
    while view:
        view = view[write(fd, view) :]


def pwrite_all(fd: int, data: Buffer | Pieces, offset: int) -> None:
    """Write every byte of `data` at `offset` (carrying on after short writes)."""
    views = [memoryview(p).cast("B") for p in (data.parts if isinstance(data, Pieces) else [data])]
    while views:
        written = os.pwritev(fd, views[:IOV_MAX], offset)
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views:
            views[0] = views[0][written:]


def copy_range(
    source: int, destination: int, offset: int, size: int, at: int, digests: Sequence[Digest] = ()
) -> None:
    """Copy `size` bytes of file `source` from `offset` to file `destination` at `at`,
    feeding `digests` with them. `copy_file_range` shares the blocks where the file system
    can (a reflink on XFS or Btrfs) and copies them in the kernel elsewhere; meanwhile the
    digests read the source (from the page cache) in this thread, so the two take as long
    as the longer, not the sum (both leave the GIL). A source shorter than `size` is an
    error."""
    if not digests:
        _copy(source, destination, offset, size, at)
        return
    with ThreadPoolExecutor(1, "copy_range") as copier:
        copying = copier.submit(_copy, source, destination, offset, size, at)
        hash_range(source, offset, size, digests)  # on an error, the `with` waits for the copy
    copying.result()


def _copy(source: int, destination: int, offset: int, size: int, at: int) -> None:
    done = 0
    while done < size:
        try:
            copied = os.copy_file_range(source, destination, size - done, offset + done, at + done)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            copied = _copy_block(source, destination, size - done, offset + done, at + done)
        if copied == 0:
            raise OSError(errno.EIO, f"the source ends {size - done} bytes short")
        done += copied


def hash_range(source: int, offset: int, size: int, digests: Sequence[Digest]) -> None:
    """Feed `digests` with `size` bytes of file `source` from `offset`, a block at a time;
    OSError if the file ends before."""
    while size > 0:
        block = os.pread(source, min(READ_BLOCK, size), offset)
        if not block:
            raise OSError(errno.EIO, f"the file ends {size} bytes short")
        for digest in digests:
            digest.update(block)
        offset, size = offset + len(block), size - len(block)


def _copy_block(source: int, destination: int, size: int, offset: int, at: int) -> int:
    """Where the kernel cannot copy between these files: one block through memory."""
    block = os.pread(source, min(READ_BLOCK, size), offset)
    pwrite_all(destination, block, at)
    return len(block)


def replace_file(
    path: Path,
    data: bytes,
    sync: bool = False,
    mode: int = STATE_MODE,
    fsync: Callable[[int], None] = os.fsync,
    fsync_directory: bool = True,
) -> None:
    """Give `path` the content `data` atomically; `sync` also makes it durable (write,
    `fsync` it, rename, fsync the directory: unless the caller does that itself, grouped
    with others). A failure (a full disk) leaves the old file."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        write_all(fd, data)
        if sync:
            fsync(fd)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    os.replace(temporary, path)
    if sync and fsync_directory:
        fsync_dir(path.parent)


def share_directory(path: Path, gid: int) -> None:
    """Give directory `path` to group `gid`, group-writable, so that its members can move
    and delete the files in it (data files are group-readable already). Setgid when new
    files would otherwise get the process's own group instead (a supplementary group);
    nothing changes when it is so already (a sandbox may forbid setting setgid)."""
    if path.stat().st_gid != gid:
        os.chown(path, -1, gid)
    current = path.stat().st_mode
    setgid = stat.S_ISGID if os.getegid() != gid or current & stat.S_ISGID else 0
    wanted = SHARED_DIRECTORY_MODE | setgid
    if stat.S_IMODE(current) != wanted:
        os.chmod(path, wanted)


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_hole(fd: int, offset: int, size: int) -> None:
    """Free the disk blocks of a file range (it reads as zeros after, the file keeps its
    size): a spool gives back the bytes an object store has taken. Raises OSError
    (EOPNOTSUPP where the file system cannot)."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, size) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def has_hole(fd: int, offset: int, size: int) -> bool:
    """Whether the file range holds a hole (bytes given back, or never written), which
    must never pass for data."""
    if size == 0:
        return False
    try:
        return os.lseek(fd, offset, os.SEEK_HOLE) < offset + size
    except OSError:  # past the end: it is all hole
        return True


def make_dirs(path: Path, mode: int, sync: bool) -> None:
    """Create `path` (with `mode`) and any missing parents (as `mkdir -p` would); `sync`:
    each new one's name made durable."""
    missing = [p for p in (path, *path.parents) if not p.is_dir()]
    for directory in reversed(missing):
        directory.mkdir(mode=mode if directory == path else 0o777, exist_ok=True)
        if sync:
            fsync_dir(directory.parent)
