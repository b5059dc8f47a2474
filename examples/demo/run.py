#!/usr/bin/env python3
"""`make run`: Incoming!! and the demo web app on 127.0.0.1, until Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TWISTD = str(Path(sys.executable).parent / "twistd")


class Child:
    """A process whose output is passed on, watched for the line saying it listens:
    only its own word proves that it, not whoever held the port before, answers there."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], ready: str) -> None:
        self.name = name
        self.ready = re.compile(ready)
        self.listening = threading.Event()
        self.last_line = ""
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._relay, daemon=True).start()

    def _relay(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            self.last_line = line.strip() or self.last_line
            if self.ready.search(line):
                self.listening.set()

    def wait_until_listening(self, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while not self.listening.wait(0.1):
            if self.process.poll() is not None:
                self.process.wait()
                sys.exit(f"{self.name} did not start: {self.last_line}")
            if time.monotonic() > deadline:
                sys.exit(f"{self.name} did not start within {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--incoming-port", type=int, default=4000)
    parser.add_argument("--port", type=int, default=8080, help="the demo web app's port")
    parser.add_argument("--handover", choices=["done", "wait"], default="done")
    parser.add_argument("--data", default=str(ROOT / "demo-data"))
    args = parser.parse_args()
    data = Path(args.data)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    incoming = Child(
        "Incoming!!",
        [TWISTD, "-n", "--pidfile=", "incoming",
         "--listen", f"tcp:{args.incoming_port}:interface=127.0.0.1",
         "--storage-dir", str(data / "storage")],
        env,
        rf"Incoming!! \S+ started: browser and backend on 127\.0\.0\.1:{args.incoming_port}\b",
    )  # fmt: skip
    demo = Child(
        "the demo app",
        [sys.executable, str(ROOT / "examples" / "demo" / "app.py"),
         "--listen", f"tcp:{args.port}:interface=127.0.0.1",
         "--incoming", f"http://127.0.0.1:{args.incoming_port}",
         "--own-url", f"http://127.0.0.1:{args.port}",
         "--files", str(data / "files"), "--handover", args.handover],
        env,
        rf"demo listening on 127\.0\.0\.1:{args.port}$",
    )  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signalled = False  # Ctrl-C in the terminal reached the children too
    try:
        incoming.wait_until_listening()
        demo.wait_until_listening()
        print(f"\n  Incoming!! demo: open http://127.0.0.1:{args.port}/\n"
              f"  (Incoming!! on 127.0.0.1:{args.incoming_port}, handover '{args.handover}',"
              f" files in {data / 'files'}; Ctrl-C stops both)\n", flush=True)  # fmt: skip
        while incoming.process.poll() is None and demo.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        signalled = True
    finally:
        for child in (demo, incoming):
            if signalled:  # it stops by itself; another signal would stop it twice
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.process.wait(timeout=10)
            if child.process.poll() is None:
                child.process.terminate()
                child.process.wait(timeout=20)


if __name__ == "__main__":
    main()
