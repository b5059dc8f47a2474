#!/usr/bin/env python3
"""`make run`: Incoming!! and the demo web app on 127.0.0.1, until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TWISTD = str(Path(sys.executable).parent / "twistd")


def wait_for(port: int, process: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"{name} did not start; is port {port} free?")
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--incoming-port", type=int, default=4000)
    parser.add_argument("--port", type=int, default=8080, help="the demo web app's port")
    parser.add_argument("--handover", choices=["done", "wait"], default="done")
    parser.add_argument("--data", default=str(ROOT / "demo-data"))
    args = parser.parse_args()
    data = Path(args.data)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    incoming = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "incoming",
         "--listen", f"tcp:{args.incoming_port}:interface=127.0.0.1",
         "--storage-dir", str(data / "storage")],
        env=env,
    )  # fmt: skip
    demo = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "demo" / "app.py"),
         "--listen", f"tcp:{args.port}:interface=127.0.0.1",
         "--incoming", f"http://127.0.0.1:{args.incoming_port}",
         "--own-url", f"http://127.0.0.1:{args.port}",
         "--files", str(data / "files"), "--handover", args.handover],
        env=env,
    )  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        wait_for(args.incoming_port, incoming, "Incoming!!")
        wait_for(args.port, demo, "the demo app")
        print(f"\n  Incoming!! demo: open http://127.0.0.1:{args.port}/\n"
              f"  (Incoming!! on 127.0.0.1:{args.incoming_port}, handover '{args.handover}',"
              f" files in {data / 'files'}; Ctrl-C stops both)\n", flush=True)  # fmt: skip
        while incoming.poll() is None and demo.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for process in (demo, incoming):
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=20)


if __name__ == "__main__":
    main()
