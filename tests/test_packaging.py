"""The package as users install it: its name, its plugin, its files (the browser library,
and the units, .tac and YAML files an operator copies), and the install instructions
that ship with it; and the installed daemon run by a user who cannot write into it."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
import pytest_twisted
import treq
from packaging.requirements import Requirement

from .harness import ROOT, free_port, stop_daemon
from .system import NEEDS_ROOT, Account, open_directory, spawn_twistd, started, throwaway_accounts
from .test_systemd_units import settings

DISTRIBUTION = "incoming-server"  # "incoming" on PyPI is an unrelated library
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
CONTRIB = {
    "incoming/contrib/incoming.tac",
    "incoming/contrib/incoming.yaml",
    "incoming/contrib/systemd/incoming.service",
    "incoming/contrib/systemd/incoming@.service",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of the checkout without what earlier builds left (setuptools
    would take files from a stale build/lib)."""
    source, dist = tmp_path_factory.mktemp("source") / "tree", tmp_path_factory.mktemp("dist")
    left = shutil.ignore_patterns(
        "build", "dist", "*.egg-info", ".venv", "node_modules", ".git", "demo-data", "__pycache__"
    )
    shutil.copytree(ROOT, source, symlinks=True, ignore=left)
    subprocess.run([*PIP, "wheel", "--no-deps", "-w", dist, source], check=True)
    [built] = dist.glob("*.whl")
    return built


def test_the_wheel_installs_a_twistd_plugin_and_the_browser_library(
    wheel: Path, tmp_path: Path
) -> None:
    assert wheel.name.startswith("incoming_server-")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        assert f"Name: {DISTRIBUTION}\n" in archive.read(metadata).decode()
        tac = archive.read("incoming/contrib/incoming.tac")
    assert {
        "twisted/plugins/incoming_plugin.py",
        "incoming/frontend/incoming.js",
        "incoming/frontend/incoming.mjs",
    } <= names
    assert not {n for n in names if n.endswith((".d.ts", "package.json", "uppy.mjs"))}
    assert names >= CONTRIB
    assert tac == (ROOT / "incoming.tac").read_bytes()  # the checkout's, by its symlink
    target = tmp_path / "site"
    subprocess.run([*PIP, "install", "--no-deps", "--target", target, wheel], check=True)

    def run(*args: str) -> str:
        return subprocess.run(
            [sys.executable, *args],
            cwd=tmp_path,  # not the checkout; the installed copy comes first on the path
            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    assert re.search(r"^\s+incoming\s", run("-m", "twisted", "--help"), re.M)
    script = "from incoming.frontend import Script; print(len(Script.library().body))"
    assert int(run("-c", script)) > 1000
    module = "from incoming.frontend import Script; print(Script.library(True).body[-200:])"
    assert "export default incoming;" in run("-c", module)
    where = run("-c", "import incoming.frontend; print(incoming.frontend.__file__)")
    assert where.startswith(str(target))
    assert run("-m", "incoming.contrib").strip() == str(target / "incoming" / "contrib")
    unit = run("-m", "incoming.contrib", "systemd/incoming.service").strip()
    assert Path(unit).read_text() == (ROOT / "contrib/systemd/incoming.service").read_text()


def test_install_instructions_name_this_distribution() -> None:
    """Every `pip install` in the README, the docs, the examples' READMEs and the units
    installs this distribution (by name, or a checkout: `.`, `./incoming`), or the
    examples' frameworks: never PyPI's unrelated `incoming`."""
    paths = [
        ROOT / "README.rst",
        *sorted((ROOT / "docs").rglob("*.rst")),
        *sorted((ROOT / "examples").glob("*/README.md")),
        ROOT / "contrib" / "systemd" / "incoming.service",
        ROOT / "contrib" / "systemd" / "incoming@.service",
    ]
    checkout = (".", "./incoming", "'.[test]'", "'.[examples]'")
    found = 0
    for path in paths:
        for line in re.findall(r"pip install ([^\n`]+)", path.read_text()):
            line = re.sub(r"\s@\s*\S+", "", line.split("#")[0])  # "NAME @ git+URL"
            words = line.replace('"', " ").split()
            names = [w for w in words if not w.startswith("-")]
            assert names, (path, line)
            assert names[0] in (*checkout, DISTRIBUTION), (path, line)
            assert set(names[1:]) <= {"flask", "django"}, (path, line)
            found += 1
    assert found >= 5


def requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    return [
        Requirement(line.partition(":")[2]) for line in lines if line.startswith("Requires-Dist:")
    ]


def copy_dependencies(wheel: Path, site: Path) -> None:
    """Install what the wheel depends on into `site` as pip would have, offline: the
    files of the distributions this environment has (their RECORD), recursively."""
    todo = [(r, "") for r in requirements(wheel)]  # (requirement, the extra asking for it)
    seen: set[tuple[str, str]] = set()
    copied: set[str] = set()
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        found = metadata.distribution(requirement.name)
        for wanted in ("", *requirement.extras):  # Twisted[tls]: pyOpenSSL too
            if (found.name, wanted) not in seen:
                seen.add((found.name, wanted))
                todo += [(Requirement(r), wanted) for r in found.requires or []]
        if found.name in copied:
            continue
        copied.add(found.name)
        for file in found.files or []:
            if file.parts[0] != "..":  # a script in bin/: written by the fixture
                target = site / file
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(str(file.locate())), target)
    assert {"Twisted", "klein", "treq", "pyOpenSSL"} <= copied


@pytest.fixture
def installed(wheel: Path) -> Iterator[tuple[Path, Path]]:
    """A fresh virtual environment owned by root, the wheel and its dependencies installed
    into it (these copied from this environment, not downloaded again); and a directory
    every user may enter."""
    with open_directory() as top:
        venv = top / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
        where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        site = Path(
            subprocess.run(
                [venv / "bin" / "python", "-c", where], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
        subprocess.run([*PIP, "install", "--no-deps", "--target", site, wheel], check=True)
        copy_dependencies(wheel, site)
        twistd = venv / "bin" / "twistd"  # Twisted's console script, as pip writes it
        twistd.write_text(
            f"#!{venv / 'bin' / 'python'}\nfrom twisted.scripts.twistd import run\nrun()\n"
        )
        twistd.chmod(0o755)
        yield venv, top


def unit_command(venv: Path, tac: Path) -> list[str]:
    """The single unit's ExecStart, for this environment."""
    [line] = settings(ROOT / "contrib" / "systemd" / "incoming.service")["ExecStart"]
    words = shlex.split(line)
    assert words[0] == "/opt/incoming/bin/twistd" and words[-1] == "/opt/incoming/incoming.tac"
    return [str(venv / "bin" / "twistd"), *words[1:-1], str(tac)]


async def serve_once(command: list[str], user: Account, top: Path, env: dict[str, str]) -> str:
    """Run the daemon as `user`, check it answers, stop it; its log."""
    daemon, process = spawn_twistd([], top, env, user, command=command)
    try:
        await started(daemon)
        response = await treq.get(f"http://127.0.0.1:{env['PORT']}/incoming/health")
        assert (response.code, await response.text()) == (200, "ok")
        await stop_daemon(daemon, process)
    finally:
        if process.pid is not None:
            process.signalProcess("KILL")
    return daemon.output.decode()


@NEEDS_ROOT
@pytest_twisted.ensureDeferred
async def test_the_installed_units_run_as_a_user_who_cannot_write_the_plugin_cache(
    installed: tuple[Path, Path],
) -> None:
    venv, top = installed
    with throwaway_accounts() as who:
        python = str(venv / "bin" / "python")
        where = who.server.command(
            python, "-m", "incoming.contrib", "incoming.tac", read_anything=True
        )
        found = subprocess.run(where, capture_output=True, text=True, check=True, cwd=top)
        found = found.stdout.strip()
        assert found.startswith(str(venv)) and Path(found).is_file()
        tac = top / "incoming.tac"  # where the unit wants it: /opt/incoming/incoming.tac
        shutil.copy(found, tac)
        storage = top / "storage"
        storage.mkdir()
        shutil.chown(storage, who.server.uid, who.server.gid)
        port = free_port()
        config = top / "incoming.yaml"
        config.write_text(f"IncomingIP: 127.0.0.1\nIncomingPort: {port}\nStorageDir: {storage}\n")
        config.chmod(0o644)
        env = {"INCOMING_CONFIG": str(config), "PORT": str(port), "PYTHONPATH": ""}
        log = await serve_once(unit_command(venv, tac), who.server, top, env)
        assert "Unable to write to plugin cache" not in log, log
        assert f"started: browser and backend on 127.0.0.1:{port}" in log
        # `twistd incoming` looks for plugins, and would write their cache here
        plugin_run = [str(venv / "bin" / "twistd"), "--nodaemon", "--pidfile=", "--logfile=-",
                      "incoming", "--config", str(config)]  # fmt: skip
        log = await serve_once(plugin_run, who.server, top, env)
        assert "Unable to write to plugin cache" in log
