"""The package as users install it: its name, its plugin, its files, and the
install instructions that ship with it."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

from .harness import ROOT

DISTRIBUTION = "incoming-server"  # "incoming" on PyPI is an unrelated library


def test_the_wheel_installs_a_twistd_plugin_and_the_browser_library(tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", tmp_path / "dist", ROOT], check=True)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.startswith("incoming_server-")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        assert f"Name: {DISTRIBUTION}\n" in archive.read(metadata).decode()
    assert {
        "twisted/plugins/incoming_plugin.py",
        "incoming/frontend/incoming.js",
        "incoming/frontend/incoming.mjs",
    } <= names
    assert not {n for n in names if n.endswith((".d.ts", "package.json", "uppy.mjs"))}
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], check=True)

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


def test_install_instructions_name_this_distribution() -> None:
    for path in (ROOT / "README.rst", ROOT / "contrib" / "systemd" / "incoming.service"):
        text = path.read_text()
        for command in re.findall(r"pip install ([^\s)]+)", text):
            assert command in (".", f"{DISTRIBUTION}", "'.[test]'"), (path, command)
