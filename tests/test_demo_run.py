"""`make run` (examples/demo/run.py): it says the demo is up only once Incoming!! and the
demo app said they listen on their ports, and otherwise stops with their reason; a
port that answers is not enough (another server may hold it)."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .harness import ROOT, free_port

RUN = [sys.executable, str(ROOT / "examples" / "demo" / "run.py")]
BANNER = "Incoming!! demo: open"


class Impostor(http.server.BaseHTTPRequestHandler):
    """Whoever held the port first, answering as Incoming!! would."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def impostor() -> Iterator[int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RUN, "--data", str(tmp_path / "data"), *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_a_port_held_by_another_server_stops_it_with_the_reason(tmp_path: Path) -> None:
    with impostor() as held:
        result = run(tmp_path, "--incoming-port", str(held), "--port", str(free_port()))
        assert result.returncode == 1
        assert BANNER not in result.stdout
        reason = result.stderr.strip().splitlines()[-1]
        assert reason.startswith("Incoming!! did not start: ")
        assert reason.endswith(
            f"cannot listen on tcp:{held}:interface=127.0.0.1 (browser and backend): "
            "Address already in use"
        )
        result = run(tmp_path, "--incoming-port", str(free_port()), "--port", str(held))
        assert result.returncode == 1
        assert BANNER not in result.stdout
        assert result.stderr.strip().splitlines()[-1].startswith("the demo app did not start: ")


def test_it_says_so_once_both_listen_and_stops_both(tmp_path: Path) -> None:
    incoming_port, port = free_port(), free_port()
    process = subprocess.Popen(
        [*RUN, "--data", str(tmp_path / "data"), "--incoming-port", str(incoming_port),
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        seen = []
        for line in process.stdout:  # its children's logs, then the banner
            seen.append(line)
            if BANNER in line:
                break
        assert any(f"started: browser and backend on 127.0.0.1:{incoming_port}" in s for s in seen)
        assert any(f"demo listening on 127.0.0.1:{port}" in s for s in seen)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        rest = process.stdout.read()
        assert "Server Shut Down." in rest  # Incoming!! stopped with it
    finally:
        if process.poll() is None:
            process.kill()
