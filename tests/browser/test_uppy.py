"""Uppy (@uppy/core + @uppy/tus, bundled by esbuild) in headless Chromium against the real
server's tus endpoint, with the backend's ticket in the file's meta (SPEC: HTTP upload
transport: tus 1.0), by hand and with our IncomingTickets plugin (frontend/uppy.mjs). The
page comes from another origin than the server: CORS included."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page

from .conftest import ROOT, Incoming, random_file, sha256, throttle

MiB = 1024 * 1024
BUILD = ROOT / "build" / "tus-browser"  # gitignored


@pytest.fixture(scope="module")
def uppy_page() -> Iterator[str]:
    """Bundles Uppy into build/ and serves it with tests/browser/uppy.html on loopback."""
    esbuild = ROOT / "node_modules" / ".bin" / "esbuild"
    if not esbuild.exists():
        pytest.fail("esbuild is missing: `make node_modules/.installed` (npm ci) first")
    BUILD.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [str(esbuild), str(ROOT / "tests" / "browser" / "uppy_entry.mjs"), "--bundle",
         "--minify", "--format=iife", "--target=chrome110", "--log-level=warning",
         f"--outfile={BUILD / 'uppy.js'}"],
        check=True, cwd=ROOT,
    )  # fmt: skip
    shutil.copy(ROOT / "tests" / "browser" / "uppy.html", BUILD / "index.html")
    handler = functools.partial(_Quiet, directory=str(BUILD))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}/"  # another origin than 127.0.0.1
    server.shutdown()
    server.server_close()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def verdict(post: dict[str, str]) -> str:
    """What the test backend tells the page about a file: non-ASCII, two lines."""
    return json.dumps(
        {"stored": post["id"], "name": post["filenameFromBrowser"]}, ensure_ascii=False
    )


class _Handover(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
        post = dict(urllib.parse.parse_qsl(body, keep_blank_values=True))
        self.server.posts.append(post)  # type: ignore[attr-defined]
        answer = f"done\n{verdict(post)}".encode() if post["cancelled"] == "no" else b"ok"
        self.send_response(200)
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def handovers() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A backend on loopback answering `done`: its handover URL, and the POSTs it got."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handover)
    server.posts = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/handover", server.posts  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


def backend_call(incoming: Incoming, call: str, form: dict[str, str]) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{incoming.port}/incoming/backend/{call}",
        data=urllib.parse.urlencode(form).encode(),
    )
    with urllib.request.urlopen(request) as response:
        return str(response.read().decode())


def new_upload(incoming: Incoming, backend_url: str) -> str:
    form = {"signalFinishURL": backend_url, "removeFileWhenFinished": "false"}
    return backend_call(incoming, "new_upload", form)


@pytest.mark.parametrize("parallel", [1, 4], ids=["one-upload", "parallelUploads-4"])
def test_uppy_uploads_with_the_ticket_in_its_meta(
    page: Page,
    uppy_page: str,
    incoming: Incoming,
    handovers: tuple[str, list[dict[str, str]]],
    tmp_path: Path,
    parallel: int,
) -> None:
    backend_url, posts = handovers
    source = random_file(tmp_path / "holiday video.mp4", 24 * MiB + 5)
    ticket = new_upload(incoming, backend_url)
    hosts: set[str | None] = set()
    page.on("request", lambda request: hosts.add(urllib.parse.urlsplit(request.url).hostname))
    page.goto(uppy_page)
    page.set_input_files("#file", str(source))
    endpoint = f"http://127.0.0.1:{incoming.port}/incoming/tus/"
    result = page.evaluate("([e, t, p]) => uploadWithUppy(e, t, p)", [endpoint, ticket, parallel])
    assert result == {
        "successful": [{"name": "holiday video.mp4", "url": f"{endpoint}{ticket}",
                        "size": 24 * MiB + 5, "complete": True}],
        "failed": [],
        "progressed": True,
    }  # fmt: skip
    assert hosts == {"localhost", "127.0.0.1"}  # the page and the server: nothing else
    # Uppy's success came after the handover's answer: the backend has the file already
    [post] = posts
    assert (post["id"], post["cancelled"], post["filenameFromBrowser"]) == (
        ticket, "no", "holiday video.mp4")  # fmt: skip
    assert post["filename"] == str(incoming.storage / ticket)
    assert sha256(incoming.storage / ticket) == sha256(source)
    assert post["sha256"] == sha256(source)
    assert list(incoming.storage.glob("*.part")) == []  # partial uploads gone with the copy


class Tickets:
    """The app's ticket endpoint, as the page's getTicket reaches it (window.newTicket):
    a new ticket per call, or the ones queued in `next` first."""

    def __init__(self, incoming: Incoming, backend_url: str) -> None:
        self.incoming = incoming
        self.backend_url = backend_url
        self.given: list[tuple[str, str]] = []  # (file name, ticket)
        self.next: list[str] = []

    def __call__(self, name: str) -> str:
        ticket = self.next.pop(0) if self.next else new_upload(self.incoming, self.backend_url)
        self.given.append((name, ticket))
        return ticket


@pytest.fixture
def tickets(page: Page, incoming: Incoming, handovers: tuple[str, list[dict[str, str]]]) -> Tickets:
    app = Tickets(incoming, handovers[0])
    page.expose_function("newTicket", app)
    return app


def test_the_plugin_asks_a_ticket_per_file_and_gives_the_verdict(
    page: Page,
    uppy_page: str,
    incoming: Incoming,
    handovers: tuple[str, list[dict[str, str]]],
    tickets: Tickets,
    tmp_path: Path,
) -> None:
    _, posts = handovers
    sources = [random_file(tmp_path / "été vidéo.mp4", 24 * MiB + 5),
               random_file(tmp_path / "notes.txt", 1000)]  # fmt: skip
    page.goto(uppy_page)
    page.set_input_files("#file", [str(p) for p in sources])
    endpoint = f"http://127.0.0.1:{incoming.port}/incoming/tus/"
    summary = page.evaluate("(e) => startWithTickets(e)", endpoint)
    given = dict(tickets.given)
    assert sorted(given) == ["notes.txt", "été vidéo.mp4"] and len(set(given.values())) == 2
    by_id = {post["id"]: post for post in posts}
    expected = {name: verdict(by_id[ticket]) for name, ticket in given.items()}
    assert summary == {
        "successful": [
            {"name": name, "ticket": given[name], "url": f"{endpoint}{given[name]}",
             "result": expected[name]}
            for name in ("été vidéo.mp4", "notes.txt")
        ],
        "failed": [],
        "verdicts": expected,  # on upload-success, decoded
        "remembered": [],  # no fingerprint kept that could resume this ticket for another
    }  # fmt: skip
    assert json.loads(expected["été vidéo.mp4"])["name"] == "été vidéo.mp4"
    for source in sources:
        post = by_id[given[source.name]]
        assert (post["cancelled"], post["filenameFromBrowser"]) == ("no", source.name)
        assert sha256(incoming.storage / given[source.name]) == sha256(source)


def test_a_file_added_again_after_a_reload_goes_to_its_new_ticket(
    page: Page,
    uppy_page: str,
    incoming: Incoming,
    handovers: tuple[str, list[dict[str, str]]],
    tickets: Tickets,
    tmp_path: Path,
) -> None:
    """tus-js-client would resume the first upload of the same file (its fingerprint) under
    the first ticket, whose handover may be for another record of the app."""
    _, posts = handovers
    source = random_file(tmp_path / "big.bin", 8 * MiB)
    endpoint = f"http://127.0.0.1:{incoming.port}/incoming/tus/"
    requests: list[tuple[str, str]] = []
    page.on("request", lambda r: requests.append((r.method, r.url)))
    page.goto(uppy_page)
    throttle(page, 1 << 20)
    page.set_input_files("#file", str(source))
    page.evaluate("(e) => { startWithTickets(e); }", endpoint)
    page.wait_for_function("() => (window.progressed['big.bin'] || 0) >= 1 << 20")
    [(_, first)] = tickets.given
    page.reload()
    throttle(page, None)
    requests.clear()
    page.set_input_files("#file", str(source))
    summary = page.evaluate("(e) => startWithTickets(e)", endpoint)
    [_, (_, second)] = tickets.given
    assert second != first
    assert summary["successful"] == [
        {"name": "big.bin", "ticket": second, "url": f"{endpoint}{second}",
         "result": verdict({"id": second, "filenameFromBrowser": "big.bin"})}
    ]  # fmt: skip
    assert [post["id"] for post in posts] == [second]
    assert sha256(incoming.storage / second) == sha256(source)
    assert not (incoming.storage / first).exists()
    assert not [r for r in requests if first in r[1]], "the first ticket's upload was left alone"


def test_a_ticket_found_cancelled_is_replaced_on_retry(
    page: Page,
    uppy_page: str,
    incoming: Incoming,
    handovers: tuple[str, list[dict[str, str]]],
    tickets: Tickets,
    tmp_path: Path,
) -> None:
    _, posts = handovers
    source = random_file(tmp_path / "a.bin", 3 * MiB)
    cancelled = new_upload(incoming, handovers[0])
    assert backend_call(incoming, "cancel_upload", {"id": cancelled}) == "ok"
    tickets.next.append(cancelled)
    endpoint = f"http://127.0.0.1:{incoming.port}/incoming/tus/"
    page.goto(uppy_page)
    page.set_input_files("#file", str(source))
    summary = page.evaluate("(e) => startWithTickets(e)", endpoint)
    [failed] = summary["failed"]
    assert (failed["name"], failed["ticket"]) == ("a.bin", None)  # the dead ticket dropped
    assert "response code: 410" in failed["error"]
    summary = page.evaluate("() => retryWithTickets()")
    [(_, first), (_, fresh)] = tickets.given
    assert (first, summary["failed"]) == (cancelled, [])
    assert [(f["name"], f["ticket"]) for f in summary["successful"]] == [("a.bin", fresh)]
    assert [post["id"] for post in posts if post["cancelled"] == "no"] == [fresh]
    assert sha256(incoming.storage / fresh) == sha256(source)
