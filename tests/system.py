"""The daemon as an operator runs it: as users of its own, with other users beside it
(throwaway accounts, created and removed by the test: root only, as in CI), and under
the seccomp sandbox of its systemd units."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor

from .harness import ROOT, TWISTD, Daemon

NEEDS_ROOT = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("setpriv") is None,
    reason="creates users and switches to them: needs root, useradd and setpriv (CI has them)",
)
SANDBOX_EXEC = Path(__file__).with_name("sandbox_exec.py")


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int

    def command(self, *argv: str, read_anything: bool = False) -> list[str]:
        """`argv` run as this user, with its groups. `read_anything` keeps one capability,
        CAP_DAC_READ_SEARCH, so that it can read this test's interpreter and code
        wherever they are (a home only root may enter): it never lets it write."""
        caps = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
        return [
            "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
            *(caps if read_anything else []), "--", *argv,
        ]  # fmt: skip

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*argv), capture_output=True, text=True, timeout=30)


@dataclass(frozen=True)
class Accounts:
    group: str  # shared by the daemon and the backend
    gid: int
    server: Account  # the daemon's user
    backend: Account  # a web app's backend, in `group`
    outsider: Account  # in no group of theirs


@contextlib.contextmanager
def throwaway_accounts(server_in_group: str = "primary") -> Iterator[Accounts]:
    """A group and three system users; the daemon's user has the group as its primary
    group (as the units' `Group=` gives it) or, with "supplementary", as another."""
    tag = f"inct{secrets.token_hex(3)}"
    group = f"{tag}share"
    created: list[str] = []
    subprocess.run(["groupadd", "--system", group], check=True)
    try:
        common = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        server_groups = (
            ["--gid", group] if server_in_group == "primary" else ["--user-group", "-G", group]
        )
        plans = {
            f"{tag}srv": server_groups,
            f"{tag}be": ["--user-group", "-G", group],
            f"{tag}out": ["--user-group"],
        }
        for name, options in plans.items():
            subprocess.run([*common, *options, name], check=True)
            created.append(name)
        server, backend, outsider = (
            Account(n, pwd.getpwnam(n).pw_uid, pwd.getpwnam(n).pw_gid) for n in created
        )
        gid = int(subprocess.run(
            ["getent", "group", group], capture_output=True, text=True, check=True
        ).stdout.split(":")[2])  # fmt: skip
        yield Accounts(group, gid, server, backend, outsider)
    finally:  # --force: even while a daemon the failed test left is still running
        for name in created:
            subprocess.run(["userdel", "--force", name], check=False, capture_output=True)
            subprocess.run(["groupdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", group], check=False, capture_output=True)


@contextlib.contextmanager
def open_directory() -> Iterator[Path]:
    """A temporary directory every user may enter (pytest's are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="incoming-test-", dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def spawn_twistd(
    args: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    account: Account | None = None,
    sandbox: Path | None = None,
    command: list[str] | None = None,
) -> tuple[Daemon, Any]:
    """`twistd -n --pidfile= ARGS` (or `command`), as `account` if given, under the
    seccomp filters described in the JSON file `sandbox` if given; without waiting for
    it to listen."""
    daemon = Daemon()
    daemon.listening.addErrback(lambda _: None)  # it may end without listening
    command = command or [TWISTD, "-n", "--pidfile=", *args]
    if sandbox is not None:
        command = [sys.executable, str(SANDBOX_EXEC), str(sandbox), *command]
    if account is not None:
        command = account.command(*command, read_anything=True)
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    process = reactor.spawnProcess(  # type: ignore[attr-defined]
        daemon, command[0], command, env=environment, path=str(cwd)
    )
    return daemon, process


async def started(daemon: Daemon, timeout: float = 60) -> None:
    """Wait for the daemon's start-up summary; fail with its log if it ends first."""
    summary = daemon.logged(rb"started: ").addTimeout(timeout, reactor)

    def ended(result: Any) -> Any:
        if not summary.called:
            summary.errback(RuntimeError(daemon.output.decode(errors="replace")))
        return result

    daemon.ended.addBoth(ended)
    await summary


def unit_sandbox(unit: dict[str, list[str]], path: Path) -> Path:
    """Write to `path` the seccomp part of a unit's sandbox, for `sandbox_exec.py`: the
    system calls `SystemCallFilter=` allows (its groups expanded by systemd-analyze, the
    `~` lists taken out), `SystemCallErrorNumber=`, `RestrictAddressFamilies=`,
    `MemoryDenyWriteExecute=`, `RestrictSUIDSGID=` and `UMask=`."""
    allowed: set[str] = set()
    for line in unit["SystemCallFilter"]:
        names = _expand(line.lstrip("~").split())
        allowed = allowed - names if line.startswith("~") else allowed | names
    spec = {
        "allowed": sorted(allowed),
        "errno": unit["SystemCallErrorNumber"][0],
        "families": unit["RestrictAddressFamilies"][0].split(),
        "deny_write_execute": unit["MemoryDenyWriteExecute"] == ["true"],
        "deny_suid_sgid": unit["RestrictSUIDSGID"] == ["true"],
        "umask": int(unit["UMask"][0], 8),
    }
    path.write_text(json.dumps(spec))
    path.chmod(0o644)
    return path


def _expand(names: list[str]) -> set[str]:
    """System call names, with systemd's @groups expanded."""
    found: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            found.add(name)
            continue
        listing = subprocess.run(
            ["systemd-analyze", "syscall-filter", name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        members = [
            line.strip() for line in listing.splitlines()[1:]
            if line.strip() and not line.strip().startswith("#")
        ]  # fmt: skip
        found |= _expand(members)
    return found
