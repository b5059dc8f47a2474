#!/usr/bin/env python3
"""Browser upload throughput: incoming.js in headless Chromium against the real server.

Times, inside the page, from `start()` to `onfinished`, for each transport of
incoming.js: HTTP (tus, `--slices` MiB per request, each size given measured; `all`
is the default, the whole file in one request) and the WebSocket
(`{transport: "websocket"}`, the 2014 protocol). Every configuration uploads the
same file to the same server, the runs interleaved (run 1 of each, then run 2 of
each...). By default Chromium runs plain headless
with no DevTools client: the page builds the file in memory (a 64 MiB random
block, repeated) and reports its timings itself. `--devtools` drives it with
Playwright instead (a file chosen in an input), which is much slower: DevTools is
sent every WebSocket frame.

    python bench/browser_bench.py [--size 256] [--runs 3] [--slices all] [--devtools]
    python bench/browser_bench.py --slices 8,16,32,64,all --transports http
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from playwright.sync_api import sync_playwright
from upload_bench import Daemon, MiB, http_post, start_backend

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


PLAIN_PAGE = """<!doctype html><script src="http://%(host)s/incoming/frontend/incoming.js"></script>
<script>
incoming.set_server_hostname("%(host)s");
const uploads = %(uploads)s, size = %(size)d;
function upload([ticket, options], file) {
  return new Promise((resolve, reject) => {
    const up = new incoming.Uploader(ticket, file, options), began = performance.now();
    up.onfinished = () => resolve((performance.now() - began) / 1000);
    up.onerror = () => reject(new Error(up.error_msg));
    up.start();
  });
}
(async () => {
  // One random block of at most 64 MiB, repeated: Chromium 156 fails to read a larger
  // in-memory File again and again (NotReadableError once it pages it to disk).
  const block = Math.min(size, 64 * 1048576), parts = [], blocks = [];
  const piece = new Uint8Array(65536);
  for (let done = 0; done < block; done += piece.length) {
    crypto.getRandomValues(piece);
    parts.push(piece.slice(0, Math.min(piece.length, block - done)));
  }
  const random = new Blob(parts);
  for (let done = 0; done < size; done += block) {
    blocks.push(random.slice(0, Math.min(block, size - done)));
  }
  const file = new File(blocks, "bench.bin"), seconds = [];
  for (const each of uploads) { seconds.push(await upload(each, file)); }
  await fetch("/result", {method: "POST", body: JSON.stringify(seconds)});
})().catch((e) => fetch("/result", {method: "POST", body: JSON.stringify({error: String(e)})}));
</script>"""


class PageServer:
    """Serves the bench page from 127.0.0.1 (and `files`, by path) and receives the
    page's result.

    A page from a real loopback server: Chromium refuses WebSockets to 127.0.0.1
    from pages it cannot place on the local network.
    """

    def __init__(self, page: bytes, files: dict[str, bytes] | None = None) -> None:
        self.result: Any = None
        self.done = threading.Event()
        outer = self
        served = files or {}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                body = served.get(self.path, page)
                kind = "text/html" if body is page else "application/octet-stream"
                self.send_response(200)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                outer.result = json.loads(self.rfile.read(int(self.headers["content-length"])))
                self.send_response(204)
                self.end_headers()
                outer.done.set()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/bench.html"


Upload = tuple[str, dict[str, Any]]  # a ticket, and the Uploader's options


def run_headless(pages: PageServer, timeout: float = 600) -> Any:
    """Opens the page in Chromium with no DevTools client attached (a fresh profile) and
    returns what it posted; a posted {"error": ...} raises."""
    # ignore_cleanup_errors: Chromium's helpers may still write the profile as it goes
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", *CHROMIUM_ARGS, f"--user-data-dir={profile}", pages.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            if not pages.done.wait(timeout=timeout):
                raise RuntimeError("the page reported nothing")
        finally:
            browser.terminate()
            browser.wait(timeout=20)
    pages.server.shutdown()
    if isinstance(pages.result, dict) and "error" in pages.result:
        raise RuntimeError(pages.result["error"])
    return pages.result


def plain_headless(daemon: Daemon, uploads: list[Upload], size: int) -> list[float]:
    """Chromium with no DevTools client attached: the page reports its own timings."""
    host = f"127.0.0.1:{daemon.port}"
    page = PLAIN_PAGE % {"host": host, "uploads": json.dumps(uploads), "size": size}
    return [float(seconds) for seconds in run_headless(PageServer(page.encode()))]


def devtools(daemon: Daemon, uploads: list[Upload], size: int) -> list[float]:
    """Chromium driven by Playwright (DevTools attached), the file chosen in an input."""
    host = f"127.0.0.1:{daemon.port}"
    pages = PageServer(
        f'<input type="file" id="f"><script src="http://{host}/incoming/frontend/incoming.js">'
        f"</script><script>incoming.set_server_hostname('{host}');</script>".encode()
    )
    seconds = []
    with tempfile.TemporaryDirectory() as scratch, sync_playwright() as playwright:
        source = Path(scratch) / "upload.bin"
        with source.open("wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(pages.url)
        page.set_input_files("#f", str(source))
        for ticket, options in uploads:
            seconds.append(
                page.evaluate(
                    """([ticket, options]) => new Promise((resolve, reject) => {
                        const file = document.getElementById("f").files[0];
                        const up = new incoming.Uploader(ticket, file, options);
                        const began = performance.now();
                        up.onfinished = () => resolve((performance.now() - began) / 1000);
                        up.onerror = () => reject(new Error(up.error_msg));
                        up.start();
                    })""",
                    [ticket, options],
                )
            )
        browser.close()
    pages.server.shutdown()
    return seconds


def configurations(transports: list[str], slices: list[str]) -> dict[str, dict[str, Any]]:
    """The Uploader options of each configuration measured, by name."""
    chosen: dict[str, dict[str, Any]] = {}
    for transport in transports:
        if transport == "http":
            for mib in slices:
                if mib == "all":
                    chosen["HTTP, the whole file (default)"] = {"transport": "http"}
                else:
                    options = {"transport": "http", "chunkSize": int(mib) * MiB}
                    chosen[f"HTTP, {mib} MiB slices"] = options
        else:
            chosen["WebSocket"] = {"transport": "websocket"}
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="MiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk-kb", type=int, default=512)
    parser.add_argument("--send-ahead", type=int, default=4)
    parser.add_argument("--transports", default="http,websocket", help="http, websocket or both")
    parser.add_argument(
        "--slices", default="all", help="MiB per request over HTTP, e.g. 8,16,32,64,all"
    )
    parser.add_argument("--devtools", action="store_true", help="drive Chromium with Playwright")
    args = parser.parse_args()
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if not set(transports) <= {"http", "websocket"}:
        parser.error("--transports: http and/or websocket")
    slices = [m.strip() for m in args.slices.split(",") if m.strip()]
    if not all(m == "all" or m.isdigit() for m in slices):
        parser.error("--slices: MiB per request, or all")
    chosen = configurations(transports, slices)
    backend, backend_url = start_backend()
    daemon = Daemon(["--chunk-size-kb", str(args.chunk_kb), "--send-ahead", str(args.send_ahead)])
    form = {"signalFinishURL": backend_url}  # the file is removed once handed over
    names = [name for _ in range(args.runs) for name in chosen]  # the runs interleaved
    uploads = [
        (http_post(daemon.port, "/incoming/backend/new_upload", form), chosen[name])
        for name in names
    ]
    cpu_before = daemon.cpu_seconds()
    try:
        run = devtools if args.devtools else plain_headless
        seconds = run(daemon, uploads, args.size * MiB)
    finally:
        cpu = daemon.cpu_seconds() - cpu_before
        daemon.stop()
        backend.shutdown()
    how = "Playwright (DevTools attached)" if args.devtools else "plain headless Chromium"
    print(f"{how}: {args.runs} uploads of {args.size} MiB each; server chunk {args.chunk_kb} KiB, "
          f"send-ahead {args.send_ahead}; server {cpu / (len(uploads) * args.size / 1024):.2f} "
          f"CPU-s/GiB over all uploads")  # fmt: skip
    medians = {}
    for name in chosen:
        rates = [
            args.size * MiB / s / 1e6 for n, s in zip(names, seconds, strict=True) if n == name
        ]
        medians[name] = statistics.median(rates)
        print(f"  {name:<32} median {medians[name]:4.0f} MB/s "
              f"(min {min(rates):.0f}, max {max(rates):.0f}; "
              f"runs {', '.join(f'{r:.0f}' for r in rates)})")  # fmt: skip
    if "WebSocket" in medians:
        for name, median in medians.items():
            if name != "WebSocket":
                print(f"  {name} / WebSocket: {median / medians['WebSocket']:.2f}x (medians)")


if __name__ == "__main__":
    main()
