"""Uppy (@uppy/core + @uppy/tus, bundled by esbuild) in headless Chromium against the real
server's tus endpoint, with the backend's ticket in the file's meta (SPEC: HTTP upload
transport: tus 1.0). The page comes from another origin than the server: CORS included."""

from __future__ import annotations

import functools
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

from .conftest import ROOT, Incoming, random_file, sha256

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


class _Handover(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
        self.server.posts.append(dict(urllib.parse.parse_qsl(body, keep_blank_values=True)))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-length", "4")
        self.end_headers()
        self.wfile.write(b"done")

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


def new_upload(incoming: Incoming, backend_url: str) -> str:
    form = {"signalFinishURL": backend_url, "removeFileWhenFinished": "false"}
    request = urllib.request.Request(
        f"http://127.0.0.1:{incoming.port}/incoming/backend/new_upload",
        data=urllib.parse.urlencode(form).encode(),
    )
    with urllib.request.urlopen(request) as response:
        return str(response.read().decode())


def test_uppy_uploads_with_the_ticket_in_its_meta(
    page: Page,
    uppy_page: str,
    incoming: Incoming,
    handovers: tuple[str, list[dict[str, str]]],
    tmp_path: Path,
) -> None:
    backend_url, posts = handovers
    source = random_file(tmp_path / "holiday video.mp4", 24 * MiB + 5)
    ticket = new_upload(incoming, backend_url)
    hosts: set[str | None] = set()
    page.on("request", lambda request: hosts.add(urllib.parse.urlsplit(request.url).hostname))
    page.goto(uppy_page)
    page.set_input_files("#file", str(source))
    endpoint = f"http://127.0.0.1:{incoming.port}/incoming/tus/"
    result = page.evaluate("([e, t]) => uploadWithUppy(e, t)", [endpoint, ticket])
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
