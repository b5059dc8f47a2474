"""A backend that is away when the upload ends (SPEC: "When the backend is away"):
incoming.js in headless Chromium, on a page of another origin than the server (CORS
included), fires onfinished with `pending` once HandoverTimeoutS has passed, then
onhandedover with the backend's verdict when it is back (or onerror if the server
gives the handover up). The real server, as a subprocess, with a one-second timeout."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page

from .conftest import Incoming, random_file, sha256

MiB = 1024 * 1024
TRANSPORTS = pytest.mark.parametrize(
    "options", [{}, {"transport": "websocket"}], ids=["http", "websocket"]
)

PAGE = """<!doctype html><meta charset="utf-8"><title>pending</title>
<input type="file" id="file">
<script src="http://127.0.0.1:%(port)d/incoming/frontend/incoming.js"></script>
<script>
incoming.set_server_hostname("127.0.0.1:%(port)d");
window.events = [];  // what the callbacks saw, in order
window.start = (ticket, options) => {
  const up = new incoming.Uploader(ticket, document.getElementById("file").files[0], options);
  const note = (event) => window.events.push({event: event, finished: up.finished,
    pending: up.pending, result: up.result, error: up.error_code});
  up.onfinished = () => note("finished");
  up.onhandedover = () => note("handed over");
  up.oncancelled = () => note("cancelled");
  up.onerror = () => note("error");
  up.start();
};
</script>
"""


@dataclass
class Backend:
    """A web app on loopback: serves the page; answers handovers 503 while `away`, then
    `done` + a verdict; cancel notices `ok`."""

    incoming: Incoming
    away: bool = True
    posts: list[tuple[dict[str, str], int]] = field(default_factory=list)  # and the status
    port: int = 0

    @property
    def page_url(self) -> str:
        return f"http://localhost:{self.port}/"  # another origin than 127.0.0.1

    def new_upload(self) -> str:
        form = {
            "signalFinishURL": f"http://127.0.0.1:{self.port}/handover",
            "removeFileWhenFinished": "false",
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.incoming.port}/incoming/backend/new_upload",
            data=urllib.parse.urlencode(form).encode(),
        )
        with urllib.request.urlopen(request) as response:
            return str(response.read().decode())

    def handovers(self) -> list[tuple[dict[str, str], int]]:
        return [(post, status) for post, status in self.posts if post["cancelled"] == "no"]


@pytest.fixture
def incoming_options() -> list[str]:
    return ["--handover-timeout", "1"]


@pytest.fixture
def backend(incoming: Incoming) -> Iterator[Backend]:
    app = Backend(incoming)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._answer(200, PAGE % {"port": incoming.port}, "text/html; charset=utf-8")

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
            post = dict(urllib.parse.parse_qsl(body, keep_blank_values=True))
            if post["cancelled"] == "yes":
                status, text = 200, "ok"
            elif app.away:
                status, text = 503, "deploying"
            else:
                status, text = 200, "done\n" + json.dumps({"sha256": post["sha256"]})
            app.posts.append((post, status))
            self._answer(status, text)

        def _answer(
            self, status: int, text: str, content_type: str = "text/plain; charset=utf-8"
        ) -> None:
            body = text.encode("utf-8")
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    app.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield app
    server.shutdown()
    server.server_close()


def events(page: Page, count: int, timeout_ms: float = 60_000) -> list[dict[str, Any]]:
    """The callbacks' events, once there are `count` of them."""
    page.wait_for_function(f"() => window.events.length >= {count}", timeout=timeout_ms)
    seen: list[dict[str, Any]] = page.evaluate("() => window.events")
    return seen


@TRANSPORTS
def test_onfinished_pending_then_onhandedover_with_the_verdict(
    page: Page, backend: Backend, incoming: Incoming, tmp_path: Path, options: dict[str, str]
) -> None:
    source = random_file(tmp_path / "report.pdf", 3 * MiB + 7)
    ticket = backend.new_upload()
    page.goto(backend.page_url)
    page.set_input_files("#file", str(source))
    page.evaluate("([t, o]) => start(t, o)", [ticket, options])
    [finished] = events(page, 1)
    assert finished == {
        "event": "finished", "finished": True, "pending": True, "result": "", "error": 0,
    }  # fmt: skip
    assert sha256(incoming.storage / ticket) == sha256(source)  # stored, kept
    assert backend.handovers() and all(status == 503 for _, status in backend.handovers())
    backend.away = False
    handed_over = events(page, 2)[1]
    verdict = json.dumps({"sha256": sha256(source)})
    assert handed_over == {
        "event": "handed over", "finished": True, "pending": False, "result": verdict,
        "error": 0,
    }  # fmt: skip
    *before, (last, status) = backend.handovers()
    assert status == 200 and all(code == 503 for _, code in before)
    assert {post["sha256"] for post, _ in backend.handovers()} == {sha256(source)}
    assert sha256(incoming.storage / ticket) == sha256(source)
    assert page.evaluate("() => window.events.length") == 2


@pytest.mark.parametrize("incoming_options", [["--handover-timeout", "1", "--handover-retry", "3"]])
def test_a_handover_given_up_is_onerror_30_after_the_pending_finish(
    page: Page, backend: Backend, incoming: Incoming, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "a.bin", MiB)
    ticket = backend.new_upload()
    page.goto(backend.page_url)
    page.set_input_files("#file", str(source))
    page.evaluate("([t, o]) => start(t, o)", [ticket, {}])
    finished, failed = events(page, 2)
    assert (finished["event"], finished["pending"]) == ("finished", True)
    assert failed == {"event": "error", "finished": False, "pending": False, "result": "",
                      "error": 30}  # fmt: skip
    # then the file goes, as before, and the backend hears (which may come after onerror)
    deadline = time.monotonic() + 10
    while not (notices := [post for post, _ in backend.posts if post["cancelled"] == "yes"]):
        assert time.monotonic() < deadline, "no cancel notice"
        time.sleep(0.05)
    assert [post["id"] for post in notices] == [ticket]
    assert not (incoming.storage / ticket).exists()
