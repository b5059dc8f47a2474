"""Headless Chromium against the real server and the demo app, both as subprocesses."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, CDPSession, Page, sync_playwright

ROOT = Path(__file__).resolve().parents[2]
TWISTD = str(Path(sys.executable).parent / "twistd")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Output:
    """Drains a process's output in a thread, so it never blocks on a full pipe."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.text = b""
        self._changed = threading.Condition()
        self._ended = False
        threading.Thread(target=self._drain, args=(process,), daemon=True).start()

    def _drain(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        while data := process.stdout.read1(65536):
            with self._changed:
                self.text += data
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, pattern: bytes, timeout: float = 30) -> None:
        with self._changed:
            found = self._changed.wait_for(
                lambda: re.search(pattern, self.text) is not None or self._ended, timeout
            )
            if not found or not re.search(pattern, self.text):
                raise RuntimeError(f"no {pattern!r}:\n{self.text.decode(errors='replace')}")


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        process.wait(timeout=20)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def random_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 20))
            f.write(block)
            left -= len(block)
    return path


@dataclass
class Incoming:
    """`twistd -n incoming` on a fixed loopback port; restartable on the same port."""

    storage: Path
    options: list[str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    output: Output | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "incoming",
             "--listen", f"tcp:{self.port}:interface=127.0.0.1",
             "--storage-dir", str(self.storage), *self.options],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=self.storage.parent,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.output = Output(self.process)
        try:
            self.output.wait_for(rb"Incoming!! \S+ started: ")
        except RuntimeError:
            stop(self.process, signal.SIGKILL)
            raise

    def kill(self) -> None:
        assert self.process is not None
        stop(self.process, signal.SIGKILL)

    def parts(self) -> list[Path]:
        return list(self.storage.glob("*.part"))


@dataclass
class Demo:
    """The demo web app (examples/demo/app.py) on a fixed loopback port; restartable."""

    port: int
    files: Path
    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    output: Output | None = None  # what it logs

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "demo" / "app.py"),
             "--listen", f"tcp:{self.port}:interface=127.0.0.1", *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.output = Output(self.process)
        try:
            self.output.wait_for(rb"demo listening on")
        except RuntimeError:
            stop(self.process, signal.SIGKILL)
            raise

    def restart(self) -> None:
        assert self.process is not None
        stop(self.process)
        self.start()


@pytest.fixture
def incoming_options() -> list[str]:
    return []


@pytest.fixture
def handover_mode() -> str:
    return "done"


@pytest.fixture
def incoming(tmp_path: Path, incoming_options: list[str]) -> Iterator[Incoming]:
    server = Incoming(tmp_path / "storage", incoming_options)
    server.start()
    yield server
    if server.process is not None:
        stop(server.process)


@pytest.fixture
def demo(tmp_path: Path, incoming: Incoming, handover_mode: str) -> Iterator[Demo]:
    port = free_port()
    app = Demo(
        port,
        tmp_path / "received",
        ["--incoming", f"http://127.0.0.1:{incoming.port}",
         "--own-url", f"http://127.0.0.1:{port}",
         "--files", str(tmp_path / "received"), "--handover", handover_mode],
    )  # fmt: skip
    app.start()
    yield app
    if app.process is not None:
        stop(app.process)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    errors: list[Any] = []
    page.on("pageerror", lambda error: errors.append(error))
    yield page
    _sessions.pop(page, None)
    context.close()
    assert errors == [], errors


TEST_HOOKS = """() => {
    const input = document.createElement("input");
    input.type = "file"; input.multiple = true; input.id = "testfiles";
    document.body.appendChild(input);
    window.ups = []; window.events = []; window.states = []; window.fracs = [];
    const behaviours = {
        pause: (up) => up.pause("pause"),
        cancel: (up) => up.cancel("cancelled by the test"),
    };
    // behaviour: act once, as soon as a chunk is acknowledged or 1 MiB is sent.
    // options: the Uploader's ({transport: "websocket"}...). resume: continue the
    // upload incoming.find_upload remembers for the file instead of a new ticket.
    window.startUpload = async (index, behaviour, options, resume) => {
        const file = document.getElementById("testfiles").files[index];
        let ticket = resume ? incoming.find_upload(file) : null;
        if (resume && !ticket) { throw new Error("no upload remembered for " + file.name); }
        if (!ticket) {
            ticket = (await (await fetch("/api/ticket", {method: "POST"})).json()).ticket;
        }
        const up = new incoming.Uploader(ticket, file, options || {});
        up.ticket = ticket;
        const n = window.ups.push(up) - 1;
        const states = window.states[n] = [];  // [state_msg, bytes_acked] at each new state
        const fracs = window.fracs[n] = [];  // [frac_sent, frac_complete, finished] each time
        const note = (what) => window.events.push([n, what, up.state_msg]);
        up.onprogress = () => {
            if (!states.length || states.at(-1)[0] !== up.state_msg) {
                states.push([up.state_msg, up.bytes_acked]);
            }
            fracs.push([up.frac_sent, up.frac_complete, up.finished]);
            if (behaviour && !up.acted && (up.bytes_acked > 0 || up.bytes_tx >= 1 << 20)) {
                up.acted = true;
                behaviours[behaviour](up);
            }
        };
        up.onfinished = () => note("finished");
        up.oncancelled = () => note("cancelled");
        up.onerror = () => note("error " + up.error_code);
        up.start();
        return n;
    };
}"""


@pytest.fixture
def app_page(page: Page, demo: Demo) -> Page:
    """The demo page, plus a file input and a record of uploaders for tests to drive."""
    page.goto(demo.url)
    page.evaluate(TEST_HOOKS)
    return page


_sessions: dict[Page, CDPSession] = {}


def throttle(page: Page, upload_bytes_per_s: int | None) -> None:
    """Chromium's own upload throttling (DevTools), so that a test can act mid-request;
    None lifts it. It holds across reloads."""
    if page not in _sessions:
        _sessions[page] = page.context.new_cdp_session(page)
        _sessions[page].send("Network.enable")
    _sessions[page].send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1,
         "uploadThroughput": upload_bytes_per_s or -1},
    )  # fmt: skip
