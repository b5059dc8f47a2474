"""The quick start (docs/quickstart.rst) as a newcomer follows it: its commands, read from
the page, run by bash in a fresh folder beside the checkout `incoming`, start a real
Incoming!! and the example app; the app's page loads the script, the app gives a ticket,
and a file uploaded with it ends in the app's folder with the app's verdict.

What the test does not do as written: it creates no virtualenv and installs nothing
(`python3 -m venv`, `pip install`, `npm install`: the test environment's venv and the
checkout's node_modules stand in, and tests/test_packaging.py installs the wheel), and it
runs everything on free loopback ports instead of 4000, 5000, 8000 and 3000. The page in a
real browser: tests/browser/test_examples.py."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor

from .harness import ROOT, Daemon, free_port

QUICKSTART = ROOT / "docs" / "quickstart.rst"
TUS = {"Tus-Resumable": "1.0.0"}
# what each example prints once it listens
READY = {
    "flask": rb"Running on http://127\.0\.0\.1:(\d+)",
    "django": rb"Starting development server at http://127\.0\.0\.1:(\d+)",
    "express": rb"listening on http://127\.0\.0\.1:(\d+)",
}


def commands(name: str) -> list[str]:
    """The commands of the page's `.. code-block:: console` named `name`, without their
    prompt, as a reader copies them."""
    text = QUICKSTART.read_text()
    block = re.search(
        rf"^\.\. code-block:: console\n   :name: {name}\n\n((?:   .*\n|\n)+)", text, re.M
    )
    assert block is not None, name
    lines = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert lines and all(line.startswith("$ ") for line in lines), lines
    return [line.removeprefix("$ ") for line in lines]


def script(lines: list[str]) -> str:
    """One shell session: stop at the first failure; the last command (the server)
    becomes the process itself, so that a signal reaches it."""
    return "\n".join(["set -e", *lines[:-1], "exec " + lines[-1]])


def installing(line: str) -> bool:
    """The steps that create the environment; the test's own stands in for them."""
    return line.startswith(("python3 -m venv ", "pip install ", "npm install "))


async def start(lines: list[str], cwd: Path, env: dict[str, str], ready: bytes) -> Any:
    daemon = Daemon(ready=ready)
    process = reactor.spawnProcess(  # type: ignore[attr-defined]
        daemon, "/bin/bash", ["bash", "-c", script(lines)], env=env, path=str(cwd)
    )
    await daemon.listening
    return daemon, process


async def stop(daemon: Daemon, process: Any) -> None:
    if process.pid is not None:
        process.signalProcess(signal.SIGTERM)
        await daemon.ended


def test_the_install_step_installs_the_checkout_and_the_frameworks() -> None:
    assert commands("quickstart-install") == [
        "python3 -m venv venv",
        ". venv/bin/activate",
        "pip install ./incoming flask django",
    ]
    # the environment the test uses in its place has what that line installs
    import django
    import flask

    import incoming.backend

    assert flask and django and incoming.backend


@pytest.mark.parametrize("example", ["flask", "django", "express"])
@pytest_twisted.ensureDeferred
async def test_the_quick_start_runs_as_written(tmp_path: Path, example: str) -> None:
    folder = tmp_path / "try"  # the reader's folder: the checkout and the venv in it
    folder.mkdir()
    (folder / "incoming").symlink_to(ROOT)
    (folder / "venv").symlink_to(sys.prefix)
    (folder / "node_modules").symlink_to(ROOT / "node_modules")  # `npm install express`
    incoming_port, app_port = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # this checkout's code, as `pip install ./incoming` gives
        "INCOMING_URL": f"http://127.0.0.1:{incoming_port}",  # the example's settings
        "APP_URL": f"http://127.0.0.1:{app_port}",
        "FLASK_RUN_PORT": str(app_port),
        "PORT": str(app_port),
    }
    first_terminal = [line for line in commands("quickstart-install") if not installing(line)]
    first_terminal += [
        line.replace("tcp:4000:", f"tcp:{incoming_port}:")
        for line in commands("quickstart-incoming")
    ]
    assert f"tcp:{incoming_port}:" in first_terminal[-1]
    second_terminal = [
        line.replace("runserver", f"runserver --noreload 127.0.0.1:{app_port}")
        for line in commands(f"quickstart-{example}")
        if not installing(line)
    ]
    server = await start(first_terminal, folder, env, rb"Incoming!! \S+ started: ")
    try:
        app = await start(second_terminal, folder, env, READY[example])
        try:
            assert app[0].listening.result == app_port
            await upload_through(example, app_port, incoming_port, folder)
        finally:
            await stop(*app)
    finally:
        await stop(*server)
    assert b"Traceback" not in server[0].output, server[0].output.decode()


async def upload_through(example: str, app_port: int, incoming_port: int, folder: Path) -> None:
    """What the page does, without a browser: load itself and the script, ask the app for
    a ticket, upload the file with it (tus); then the app has the file, and says so."""
    app = f"http://127.0.0.1:{app_port}"
    page = await treq.get(f"{app}/")
    assert page.code == 200
    src = f"http://127.0.0.1:{incoming_port}/incoming/frontend/incoming.js"
    assert f'<script src="{src}">' in await page.text()
    script = await treq.get(src)
    assert script.code == 200 and b"incoming" in await script.content()
    headers: dict[str, str] = {}
    csrf = re.search(r"csrftoken=([^;]+)", ",".join(page.headers.getRawHeaders("set-cookie", [])))
    if example == "django":  # the page sends Django's CSRF token with its request
        assert csrf is not None
        headers = {"Cookie": f"csrftoken={csrf.group(1)}", "X-CSRFToken": csrf.group(1)}
    answer = await treq.post(f"{app}/ticket", headers=headers)
    assert answer.code == 200
    ticket = json.loads(await answer.text())["ticket"]
    assert str(uuid.UUID(ticket)) == ticket

    data = os.urandom(300_000)
    name = "Quick start ü.bin"
    metadata = ",".join(
        f"{key} {base64.b64encode(value.encode()).decode()}"
        for key, value in {"ticket": ticket, "filename": name}.items()
    )
    tus = f"http://127.0.0.1:{incoming_port}/incoming/tus/"
    created = await treq.post(
        tus, headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": metadata}
    )
    assert created.code == 201
    location = created.headers.getRawHeaders("location")[0]
    patched = await treq.request(
        "PATCH", f"http://127.0.0.1:{incoming_port}{location}", data=data,
        headers={**TUS, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"},
    )  # fmt: skip
    await patched.content()
    assert patched.code == 204  # answered once the app has answered the handover
    verdict = json.loads(unquote(patched.headers.getRawHeaders("incoming-result")[0]))
    digest = hashlib.sha256(data).hexdigest()
    assert verdict["name"] == name and verdict["sha256"] == digest
    app_folder = {"flask": "myapp", "django": "mysite", "express": "myapp-node"}[example]
    stored = folder / app_folder / "data" / "files" / name
    assert stored.read_bytes() == data
    assert [p.name for p in (folder / "storage").iterdir() if "." not in p.name] == []
    download = await treq.get(app + verdict["url"])
    assert download.code == 200 and await download.content() == data
