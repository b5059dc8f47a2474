"""The backend's verdict reaches the page (SPEC: Handover, "the backend's verdict reaches
the page"): a backend that answers `done` + a newline + a payload, and incoming.js in
headless Chromium, on a page of another origin than the server (CORS included).
A 2014-protocol client, which reads only MsgAllDone's Success, still finishes."""

from __future__ import annotations

import json
import threading
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
NOTE = 'été 100% + ✓ "quoted"\nsecond line'  # survives percent-encoding and JSON

PAGE = """<!doctype html><meta charset="utf-8"><title>verdict</title>
<input type="file" id="file">
<script src="http://127.0.0.1:%(port)d/incoming/frontend/incoming.js"></script>
<script>
incoming.set_server_hostname("127.0.0.1:%(port)d");
// The uploader's result as onfinished sees it (or how it ended otherwise).
window.upload = (ticket, options) => new Promise((resolve) => {
  const up = new incoming.Uploader(ticket, document.getElementById("file").files[0], options);
  up.onfinished = (u) => resolve({finished: u.finished, result: u.result});
  up.oncancelled = (u) => resolve({cancelled: u.cancel_msg});
  up.onerror = (u) => resolve({error: u.error_code, msg: u.error_msg});
  up.start();
});
// A client of the 2014 protocol that reads only what the 2014 server sent: it streams
// the file in the server's chunks, SendAhead at most unacknowledged, and ends on
// MsgAllDone when its Success is true. It records the server's messages.
window.upload2014 = (ticket) => {
  const file = document.getElementById("file").files[0];
  return file.arrayBuffer().then((bytes) => new Promise((resolve) => {
    const ws = new WebSocket("ws://127.0.0.1:%(port)d/incoming/frontend/upload_ws");
    const got = [];
    let pos = 0, unacked = 0, chunk = 0, ahead = 0;
    const send = (type, data) => ws.send(JSON.stringify({MsgType: type, MsgData: data}));
    const pump = () => {
      while (unacked < ahead && pos < bytes.byteLength) {
        const end = Math.min(pos + chunk, bytes.byteLength);
        ws.send(bytes.slice(pos, end));
        pos = end;
        unacked++;
      }
    };
    ws.onopen = () => send("MsgUploadReq", {Id: ticket, LengthBytes: file.size, Name: file.name});
    ws.onmessage = (event) => {
      const msg = JSON.parse(event.data), data = msg.MsgData;
      got.push(msg);
      if (msg.MsgType === "MsgUploadConf") {
        chunk = data.ChunkSizeKB * 1024; ahead = data.SendAhead; pos = data.FilePos;
        send("MsgAck", {Ack: true});
        pump();
      } else if (msg.MsgType === "MsgChunkAck") {
        unacked--;
        pump();
      } else if (msg.MsgType === "MsgAllDone") {
        resolve({ended: data.Success === true ? "finished" : "no success", got: got});
      } else {
        resolve({ended: msg.MsgType, got: got});
      }
    };
    ws.onclose = () => resolve({ended: "closed", got: got});
  }));
};
</script>
"""


@dataclass
class Backend:
    """A web app on loopback: serves the page and answers each handover `done` + a newline
    + its verdict, a JSON text made from the handover."""

    incoming: Incoming
    posts: list[dict[str, str]] = field(default_factory=list)
    port: int = 0

    @property
    def page_url(self) -> str:
        return f"http://localhost:{self.port}/"  # another origin than 127.0.0.1

    def verdict(self, post: dict[str, str]) -> dict[str, str]:
        return {"name": post["filenameFromBrowser"], "sha256": post["sha256"], "note": NOTE}

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


@pytest.fixture
def backend(incoming: Incoming) -> Iterator[Backend]:
    app = Backend(incoming)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._answer(PAGE % {"port": incoming.port}, "text/html; charset=utf-8")

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
            post = dict(urllib.parse.parse_qsl(body, keep_blank_values=True))
            app.posts.append(post)
            if post["cancelled"] == "yes":
                self._answer("ok")
            else:
                self._answer("done\n" + json.dumps(app.verdict(post), ensure_ascii=False))

        def _answer(self, text: str, content_type: str = "text/plain; charset=utf-8") -> None:
            body = text.encode("utf-8")
            self.send_response(200)
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


@pytest.mark.parametrize("options", [{}, {"transport": "websocket"}], ids=["http", "websocket"])
def test_the_verdict_reaches_the_page_as_result(
    page: Page, backend: Backend, incoming: Incoming, tmp_path: Path, options: dict[str, str]
) -> None:
    source = random_file(tmp_path / "clip été.mp4", 3 * MiB + 7)
    ticket = backend.new_upload()
    page.goto(backend.page_url)
    page.set_input_files("#file", str(source))
    ended = page.evaluate("([t, o]) => upload(t, o)", [ticket, options])
    [post] = backend.posts
    assert post["sha256"] == sha256(source) == sha256(incoming.storage / ticket)
    assert ended["finished"] is True
    assert json.loads(ended["result"]) == {
        "name": "clip été.mp4", "sha256": sha256(source), "note": NOTE,
    }  # fmt: skip
    # a page that comes back to the finished upload (a reload) learns the same verdict:
    # over HTTP from HEAD (the creation gets 410), over the WebSocket with error 11
    assert page.evaluate("([t, o]) => upload(t, o)", [ticket, options]) == ended
    assert len(backend.posts) == 1


def test_a_2014_protocol_client_still_finishes_with_a_verdict_sent(
    page: Page, backend: Backend, incoming: Incoming, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "old.bin", 3 * MiB + 7)
    ticket = backend.new_upload()
    page.goto(backend.page_url)
    page.set_input_files("#file", str(source))
    ended = page.evaluate("(t) => upload2014(t)", ticket)
    assert ended["ended"] == "finished"
    types = [m["MsgType"] for m in ended["got"]]
    assert types == ["MsgUploadConf", *["MsgChunkAck"] * 7, "MsgAllDone"]
    # the 2014 fields as they were, the verdict beside them (which this client never reads)
    all_done = ended["got"][-1]["MsgData"]
    assert all_done["Success"] is True
    assert json.loads(all_done["Result"])["sha256"] == sha256(source)
    assert sha256(incoming.storage / ticket) == sha256(source)
    [post] = backend.posts
    assert post["cancelled"] == "no"
