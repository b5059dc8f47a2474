"""contrib/install-test-deps, which `make test` and CI run: it installs only what is
missing, waits for the dpkg lock, starts and enables no service, and tells a user who
is not root what root must install. apt-get, dpkg-query, systemctl and update-rc.d are
stand-ins here that record how they are called (and what an install would enable)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .harness import ROOT
from .system import NEEDS_ROOT, open_directory, throwaway_accounts

SCRIPT = ROOT / "contrib" / "install-test-deps"
STAND_INS = {
    # apt-get: records its arguments and the policy in force; installing enables a
    # systemd unit and a SysV script, as redis-server and nginx do
    "apt-get": r"""
echo "apt-get $* | policy: $(cat "$POLICY_RC_D" 2>/dev/null | tail -1)" >> "$LOG"
case " $* " in *" install "*)
    echo "svc-a.service enabled enabled" >> "$STATE/units"
    ln -s ../init.d/svc-b "$RC_ROOT/rc2.d/S01svc-b" ;;
esac
""",
    "dpkg-query": 'case "$*" in *not-there*) echo not-installed ;; *) echo installed ;; esac',
    "systemctl": r"""
case "$1" in
    list-unit-files) cat "$STATE/units" ;;
    *) echo "systemctl $*" >> "$LOG" ;;
esac
""",
    "update-rc.d": 'echo "update-rc.d $*" >> "$LOG"',
}


def world(top: Path) -> dict[str, str]:
    """Stand-ins first on PATH, a machine with one service enabled already."""
    bin_dir, state, rc2 = top / "bin", top / "state", top / "rc" / "rc2.d"
    for d in (bin_dir, state, rc2):
        d.mkdir(parents=True)
    for name, body in STAND_INS.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    (state / "units").write_text("old.service enabled enabled\n")
    (rc2 / "S01old").symlink_to("../init.d/old")
    (top / "log").write_text("")
    (top / "log").chmod(0o666)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "LOG": str(top / "log"),
        "STATE": str(state),
        "RC_ROOT": str(top / "rc"),
        "POLICY_RC_D": str(top / "policy-rc.d"),
        "INSTALL_TEST_DEPS_PACKAGES": "\nfound-by-command sh\nfound-by-file /bin/sh\n"
        "missing-file /nonexistent/tool\nnot-there\nfound-by-dpkg\n",
    }


def run(env: dict[str, str], command: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command or [str(SCRIPT)], env={**os.environ, **env}, capture_output=True, text=True
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="installs as root only")
def test_it_installs_what_is_missing_and_leaves_no_service_started_or_enabled(
    tmp_path: Path,
) -> None:
    env = world(tmp_path)
    result = run(env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "log").read_text().splitlines() == [
        "apt-get -q -y -o DPkg::Lock::Timeout=600 update | policy: exit 101",
        "apt-get -q -y -o DPkg::Lock::Timeout=600 install --no-install-recommends "
        "missing-file not-there | policy: exit 101",
        "update-rc.d svc-b disable",
        "systemctl disable --quiet svc-a.service",
    ]
    assert not (tmp_path / "policy-rc.d").exists()  # ours, for the install only
    # a policy the machine had stays as it was
    (tmp_path / "log").write_text("")
    (tmp_path / "state" / "units").write_text("")
    (tmp_path / "rc" / "rc2.d" / "S01svc-b").unlink()
    (tmp_path / "policy-rc.d").write_text("#!/bin/sh\nexit 101 # the machine's\n")
    assert run(env).returncode == 0
    assert "policy: exit 101 # the machine's" in (tmp_path / "log").read_text()
    assert (tmp_path / "policy-rc.d").read_text().endswith("# the machine's\n")


def test_nothing_happens_when_everything_is_there(tmp_path: Path) -> None:
    env = world(tmp_path)
    env["INSTALL_TEST_DEPS_PACKAGES"] = "found-by-command sh\nfound-by-dpkg\n"
    result = run(env)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert (tmp_path / "log").read_text() == ""


@NEEDS_ROOT
def test_a_user_who_is_not_root_is_told_what_root_must_install() -> None:
    with throwaway_accounts() as who, open_directory() as top:
        env = world(top)
        result = run(env, who.outsider.command(str(SCRIPT), read_anything=True))
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            "install-test-deps: the tests need these Debian packages: missing-file not-there",
            f"install-test-deps: only root can install them: sudo {SCRIPT} (then make test again)",
        ]
        assert (top / "log").read_text() == ""  # apt-get never ran
