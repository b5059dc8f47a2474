#!/usr/bin/env python3
"""Uploads across a long fat link (issue 18): the share of the line that each client
reaches, to ours and to @tus/server, through bench/linkem.py at 40 and 150 ms round
trip and 400 Mbit/s (a router buffer of 1.25 x the bandwidth-delay product, slow start).

For each round trip, one emulated path (bench/linkem.py, in its own process) in front
of both servers, and one upload of the same file (256 MiB) by each of:
- incoming.js in headless Chromium, HTTP (its default: the file in one request; and
  with chunkSize 32 MiB, a request per piece) and WebSocket, to ours;
- the 2014 library in Chromium, to ours: `--lib2014 PATH` names a copy of its
  incoming.js (uit-no-old/incoming on GitHub; not in this repository);
- a page in Chromium that sends the file as tus partial uploads over 4 connections
  and joins them with a final request (PARTIALS_PAGE), to ours: what one file over
  several connections would reach; each run also prints the partials' share of the
  line (until the last is answered) and the final request's seconds;
- tus-js-client under Node (tests/tus_client.mjs) in 8 MiB PATCHes, in one PATCH, and
  with parallelUploads: 4 (tus concatenation; "refused" where the server lacks it), to
  ours and to @tus/server with @tus/file-store (bench/tus_server.mjs).
Ours runs as deployed: `twistd -n incoming` with its default options (fsync before any
acknowledgement, SHA-256 for the handover), its backend answering the handover at once.
The share of the line is the file's size over the client's time (from its start to its
last answer: for ours, the handover included) over the line's rate. Each upload has a
fresh client process (a new browser, a new Node), so its connections start cold, as a
user's would. Every stored file is checked (size and SHA-256 against the source), then
deleted. The page builds its File from a 64 MiB block it fetches (no more in memory:
see browser_bench.py), in 1 MiB slices at offsets that differ, so no two MiB alike.

    python bench/wan_bench.py [--rtt 40,150] [--rate 400] [--size 256] [--runs 1]
        [--lib2014 PATH] [--rows WebSocket,2014] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser_bench import PageServer, run_headless  # noqa: E402
from linkem import LinkProcess  # noqa: E402
from tus_bench import CLIENT, NODE, ROOT, Ours, TusNode  # noqa: E402
from upload_bench import MiB, sha256_file, start_backend  # noqa: E402

BLOCK_SIZE = 64 * MiB  # the page's random block
PIECE = 1 * MiB
TUS_CHUNK = 8 * MiB
HTTP_PIECE = 32 * MiB  # incoming.js's chunkSize in its row of pieces (its default before)

# The goals, as the share of the line at (40 ms, 150 ms), for ours.
TARGETS = {
    "incoming.js, HTTP (default)": (0.85, 0.8),
    "the 2014 library": (0.85, 0.6),
    "tus-js-client, one PATCH": (0.85, 0.75),
    "tus-js-client, parallelUploads: 4": (0.85, 0.8),
}

PAGE = """<!doctype html><script src="%(script)s"></script>
<script>
incoming.set_server_hostname("%(host)s");
const ticket = %(ticket)s, options = %(options)s, pieces = %(pieces)s;
(async () => {
  const block = new Blob([await (await fetch("/block.bin")).arrayBuffer()]);
  const file = new File(pieces.map(([at, size]) => block.slice(at, at + size)), "wan.bin");
  const seconds = await new Promise((resolve, reject) => {
    const up = new incoming.Uploader(ticket, file, options), began = performance.now();
    up.onfinished = () => resolve((performance.now() - began) / 1000);
    up.onerror = () => reject(new Error(`error ${up.error_code}: ${up.error_msg}`));
    up.oncancelled = () => reject(new Error(`cancelled: ${up.cancel_msg}`));
    up.start();
  });
  await fetch("/result", {method: "POST", body: JSON.stringify({seconds})});
})().catch((e) => fetch("/result", {method: "POST", body: JSON.stringify({error: String(e)})}));
</script>"""


# One file as tus partial uploads over several connections from a page, then one final
# request (what incoming.js would do to use them; issue 18, item 3): each connection takes
# the next piece from a shared queue (work stealing, so that they end together), pieces of
# at most 32 MiB, fewer bytes as the file runs out (the rest over twice the connections,
# 4 MiB at least), each a creation that carries its bytes (creation-with-upload).
PARTIALS_PAGE = """<!doctype html><script>
const endpoint = "http://%(host)s/incoming/tus/", ticket = %(ticket)s, pieces = %(pieces)s,
  connections = %(connections)d, MiB = 1024 * 1024;
const b64 = (text) => btoa(unescape(encodeURIComponent(text)));
function send(method, headers, body) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, endpoint);
    headers["Tus-Resumable"] = "1.0.0";
    for (const name in headers) xhr.setRequestHeader(name, headers[name]);
    xhr.onload = () => resolve(xhr);
    xhr.onerror = () => reject(new Error(`${method}: no answer`));
    xhr.send(body);
  });
}
(async () => {
  const block = new Blob([await (await fetch("/block.bin")).arrayBuffer()]);
  const file = new File(pieces.map(([at, size]) => block.slice(at, at + size)), "wan.bin");
  const began = performance.now(), urls = [];
  let next = 0;
  async function connection() {
    while (next < file.size) {
      const left = file.size - next, index = urls.length;
      const size = Math.min(left, Math.max(4 * MiB, Math.min(32 * MiB,
        Math.ceil(left / (2 * connections)))));
      const start = next;
      next += size;
      urls.push(null);
      const xhr = await send("POST", {"Upload-Length": String(size), "Upload-Concat": "partial",
        "Upload-Metadata": "ticket " + b64(ticket),
        "Content-Type": "application/offset+octet-stream"}, file.slice(start, start + size));
      if (xhr.status !== 201 || xhr.getResponseHeader("Upload-Offset") !== String(size)) {
        throw new Error(`partial: HTTP ${xhr.status} ${xhr.responseText}`);
      }
      urls[index] = new URL(xhr.getResponseHeader("Location"), endpoint).href;
    }
  }
  await Promise.all(Array.from({length: connections}, connection));
  const transfer = (performance.now() - began) / 1000;
  const xhr = await send("POST", {"Upload-Concat": "final;" + urls.join(" "),
    "Upload-Metadata": "ticket " + b64(ticket) + ",filename " + b64(file.name)}, null);
  if (xhr.status !== 201) throw new Error(`final: HTTP ${xhr.status} ${xhr.responseText}`);
  const seconds = (performance.now() - began) / 1000;
  await fetch("/result", {method: "POST", body: JSON.stringify({seconds, transfer})});
})().catch((e) => fetch("/result", {method: "POST", body: JSON.stringify({error: String(e)})}));
</script>"""
PARTIAL_CONNECTIONS = 4


@dataclass
class Outcome:
    """One upload: its seconds, or why there are none."""

    seconds: float | None = None
    refused: str = ""  # the server refused what the client asked (a feature it lacks)
    failed: str = ""  # anything else, a wrong file included
    link_cpu: float = 0.0  # the link emulator's CPU seconds a second meanwhile
    transfer: float | None = None  # seconds until every partial upload was answered


@dataclass
class Cell:
    """One row's figures for one server at one round trip (several runs)."""

    outcomes: list[Outcome] = field(default_factory=list)
    skipped: str = ""

    def share(self, size: int, rate: float) -> float | None:
        seconds = [o.seconds for o in self.outcomes if o.seconds is not None]
        return size / statistics.median(seconds) / rate if seconds else None

    def text(self, size: int, rate: float) -> str:
        share = self.share(size, rate)
        if share is not None and not any(o.failed for o in self.outcomes):
            return f"{share:.2f}"
        if any(o.failed for o in self.outcomes):
            return "FAILED"
        if any(o.refused for o in self.outcomes):
            return "refused"
        return "skipped" if self.skipped else "-"

    def notes(self) -> list[str]:
        found = [o.failed or o.refused for o in self.outcomes if o.failed or o.refused]
        return sorted(set(found)) + ([self.skipped] if self.skipped else [])


class Bench:
    """The servers, the source file and what every upload needs."""

    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.size = args.size * MiB
        self.rate = args.rate * 1e6 / 8
        self.backend, backend_url = start_backend()
        self.block = os.urandom(BLOCK_SIZE)
        self.pieces = [
            ((k * 1_000_003) % (BLOCK_SIZE - PIECE), min(PIECE, self.size - start))
            for k, start in enumerate(range(0, self.size, PIECE))
        ]
        self.source = scratch / "source.bin"
        digest = hashlib.sha256()
        with self.source.open("wb") as f:
            for at, size in self.pieces:
                f.write(self.block[at : at + size])
                digest.update(self.block[at : at + size])
        self.sha256 = digest.hexdigest()
        self.lib2014 = Path(args.lib2014).read_bytes() if args.lib2014 else None
        self.ours = Ours(backend_url)
        self.theirs = TusNode(backend_url)
        self.timeout = 120 + 20 * self.size / self.rate  # at 5 % of the line, and then some

    def stop(self) -> None:
        self.ours.stop()
        self.theirs.stop()
        self.backend.shutdown()

    def browser(self, link: LinkProcess, script: str, options: dict[str, Any]) -> Outcome:
        """One upload by a library in a fresh headless Chromium, to ours through the link."""
        ticket = self.ours.metadata("wan.bin")["ticket"]
        host = f"127.0.0.1:{link.ports[0]}"
        files = {"/block.bin": self.block}
        if script == "2014":
            assert self.lib2014 is not None
            files["/incoming-2014.js"] = self.lib2014
            script = "/incoming-2014.js"
        else:
            script = f"http://{host}/incoming/frontend/incoming.js"
        page = PAGE % {
            "script": script,
            "host": host,
            "ticket": json.dumps(ticket),
            "options": json.dumps(options),
            "pieces": json.dumps(self.pieces),
        }
        return self.page(link, page, files, ticket)

    def partials(self, link: LinkProcess, connections: int) -> Outcome:
        """One upload as partial uploads over `connections` from a fresh headless Chromium
        (PARTIALS_PAGE), to ours through the link."""
        ticket = self.ours.metadata("wan.bin")["ticket"]
        page = PARTIALS_PAGE % {
            "host": f"127.0.0.1:{link.ports[0]}",
            "ticket": json.dumps(ticket),
            "pieces": json.dumps(self.pieces),
            "connections": connections,
        }
        return self.page(link, page, {"/block.bin": self.block}, ticket)

    def page(self, link: LinkProcess, page: str, files: dict[str, bytes], ticket: str) -> Outcome:
        """The page's upload in a fresh headless Chromium; the stored file checked."""
        os.sync()  # no upload pays for the dirty pages of another
        cpu = link.cpu_seconds()
        try:
            result = run_headless(PageServer(page.encode(), files), timeout=self.timeout)
        except RuntimeError as e:
            return Outcome(failed=f"Chromium: {e}")
        outcome = Outcome(seconds=float(result["seconds"]), transfer=result.get("transfer"))
        outcome.link_cpu = (link.cpu_seconds() - cpu) / outcome.seconds  # type: ignore[operator]
        outcome.failed = self.check(self.handed_over(ticket))
        return outcome

    def tus(
        self, link: LinkProcess, server: Ours | TusNode, chunk: int | None, parallel: int
    ) -> Outcome:
        """One upload by tus-js-client under Node, to `server` through the link."""
        port = link.ports[0 if server is self.ours else 1]
        path = "/incoming/tus/" if server is self.ours else "/files"
        metadata = server.metadata("wan.bin")
        spec: dict[str, Any] = {"file": str(self.source), "metadata": metadata}
        if "ticket" in metadata:  # SPEC: each partial upload carries the ticket
            spec["metadataForPartialUploads"] = {"ticket": metadata["ticket"]}
        options = {
            "endpoint": f"http://127.0.0.1:{port}{path}",
            "uploads": [spec],
            "chunkSize": chunk,
            "parallelUploads": parallel,
        }
        os.sync()
        cpu = link.cpu_seconds()
        try:
            run = subprocess.run(
                [NODE, str(CLIENT), json.dumps(options)],
                capture_output=True, cwd=ROOT, timeout=self.timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return Outcome(failed=f"{server.name}: no answer in {self.timeout:.0f} s")
        events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith(b"{")]
        end = next((e for e in events if e["event"] == "end"), None)
        last = next((e for e in events if e["event"] in ("success", "error")), None)
        if end is None or last is None:
            return Outcome(failed=f"{server.name}: {run.stderr.decode()[-300:]}")
        if last["event"] != "success":
            status, message = last.get("status", 0), last.get("body") or last.get("message")
            why = f"{server.name}: HTTP {status}: {str(message).strip()[:160]}"
            if server is self.ours:
                why += self.wrongly_handed_over(metadata["ticket"])
            if parallel > 1 and status >= 400:
                return Outcome(refused=why)
            return Outcome(failed=why)
        seconds = end["ms"] / 1000
        outcome = Outcome(seconds=seconds, link_cpu=(link.cpu_seconds() - cpu) / seconds)
        if server is self.ours:
            stored = self.handed_over(metadata["ticket"])
        else:
            stored = server.stored(last["url"])
            stored.with_suffix(".json").unlink(missing_ok=True)  # @tus/file-store's
        outcome.failed = self.check(stored)
        return outcome

    def handed_over(self, ticket: str) -> Path | None:
        """The file ours handed over for the ticket (the handover comes before its answer)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for fields in self.backend.handovers:  # type: ignore[attr-defined]
                if fields.get("id") == [ticket] and fields.get("cancelled") == ["no"]:
                    return Path(fields["filename"][0])
            time.sleep(0.05)
        return None

    def wrongly_handed_over(self, ticket: str) -> str:
        """For an upload the client saw fail: what ours handed over for it all the same
        (deleted)."""
        for fields in self.backend.handovers:  # type: ignore[attr-defined]
            if fields.get("id") == [ticket] and fields.get("cancelled") == ["no"]:
                stored = Path(fields["filename"][0])
                size = stored.stat().st_size if stored.exists() else "?"
                stored.unlink(missing_ok=True)
                return f"; yet handed over, as finished, a file of {size} bytes (of {self.size})"
        return ""

    def check(self, stored: Path | None) -> str:
        """Why the stored file is not the source ("" if it is); deletes it."""
        if stored is None:
            return "no handover"
        if not stored.exists():
            return f"{stored} is missing"
        try:
            if stored.stat().st_size != self.size:
                return f"{stored}: {stored.stat().st_size} bytes, not {self.size}"
            if sha256_file(stored) != self.sha256:
                return f"{stored}: its SHA-256 is not the source's"
            return ""
        finally:
            stored.unlink()


ROWS = [
    ("incoming.js, HTTP (default)", "browser"),
    ("incoming.js, HTTP in 32 MiB pieces", "browser"),
    ("incoming.js, WebSocket", "browser"),
    ("the 2014 library", "browser"),
    (f"a page, tus partials over {PARTIAL_CONNECTIONS} connections", "browser"),
    ("tus-js-client, 8 MiB PATCHes", "tus"),
    ("tus-js-client, one PATCH", "tus"),
    ("tus-js-client, parallelUploads: 4", "tus"),
]
SERVERS = ("ours", "@tus/server")


# What the endpoints reach alone, as the machine's load stands (through the emulator with
# no delay and no rate limit): a share of the line means something only well below it.
REFERENCE = [
    ("incoming.js, HTTP (default)", "ours"),
    ("incoming.js, WebSocket", "ours"),
    ("tus-js-client, one PATCH", "ours"),
    ("tus-js-client, one PATCH", "@tus/server"),
]


def measure(args: argparse.Namespace, bench: Bench) -> dict[float, dict[str, Any]]:
    """Every row at every round trip: {rtt: {"cells": {(row, server): Cell}, "link": ...,
    "alone": {(row, server): MB/s}}}, the endpoints alone measured before each."""
    results: dict[float, dict[str, Any]] = {}
    theirs = urlsplit(bench.theirs.endpoint).port
    assert theirs is not None
    targets = [("127.0.0.1", bench.ours.daemon.port), ("127.0.0.1", theirs)]
    for rtt in args.rtts:
        alone: dict[tuple[str, str], float] = {}
        link = LinkProcess(targets, rtt_ms=0, rate_mbit=0)
        try:
            for row, server in selected(args, REFERENCE):
                outcome = run_row(bench, link, row, server, Cell())
                if outcome is not None and outcome.seconds and not outcome.failed:
                    alone[(row, server)] = bench.size / outcome.seconds / 1e6
        finally:
            link.stop()
        link = LinkProcess(targets, rtt_ms=rtt, rate_mbit=args.rate, buffer_bdp=args.buffer_bdp)
        cells: dict[tuple[str, str], Cell] = {}
        try:
            for _ in range(args.runs):
                for row, _kind in selected(args, ROWS):
                    for server in SERVERS:
                        cell = cells.get((row, server), Cell())
                        outcome = run_row(bench, link, row, server, cell)
                        if outcome is not None:
                            cell.outcomes.append(outcome)
                            print(f"  {rtt:g} ms, {row} -> {server}: {describe(outcome, bench)}",
                                  flush=True)  # fmt: skip
                        if outcome is not None or cell.skipped:
                            cells[(row, server)] = cell
        finally:
            stats = link.stop()
        results[rtt] = {"cells": cells, "link": stats, "alone": alone}
    return results


def selected(args: argparse.Namespace, rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The rows `--rows` names (by any part of their label), or all."""
    if not args.rows:
        return rows
    parts = [part.strip().lower() for part in args.rows.split(",") if part.strip()]
    return [(row, kind) for row, kind in rows if any(part in row.lower() for part in parts)]


def run_row(bench: Bench, link: LinkProcess, row: str, server: str, cell: Cell) -> Outcome | None:
    """One upload of `row` to `server`; None where the row has no such server."""
    if row.startswith(("incoming.js", "the 2014", "a page")):
        if server != "ours":
            return None
        if row.startswith("a page"):
            return bench.partials(link, PARTIAL_CONNECTIONS)
        if row.startswith("the 2014"):
            if bench.lib2014 is None:
                cell.skipped = "the 2014 library: skipped, no --lib2014 PATH (its incoming.js)"
                return None
            return bench.browser(link, "2014", {})
        if "WebSocket" in row:
            return bench.browser(link, "ours", {"transport": "websocket"})
        return bench.browser(link, "ours", {"chunkSize": HTTP_PIECE} if "MiB pieces" in row else {})
    target = bench.ours if server == "ours" else bench.theirs
    if "8 MiB" in row:
        return bench.tus(link, target, TUS_CHUNK, 1)
    if "one PATCH" in row:
        return bench.tus(link, target, None, 1)
    return bench.tus(link, target, None, 4)


def describe(outcome: Outcome, bench: Bench) -> str:
    if outcome.seconds is None or outcome.failed:
        return outcome.failed or outcome.refused
    rate = bench.size / outcome.seconds
    phases = ""
    if outcome.transfer is not None:
        phases = (
            f"; the partials {bench.size / outcome.transfer / bench.rate:.2f} of the line, "
            f"then the final request {outcome.seconds - outcome.transfer:.2f} s"
        )
    return (
        f"{outcome.seconds:.2f} s, {rate / 1e6:.1f} MB/s, {rate / bench.rate:.2f} of the line"
        f"{phases} (link emulator: {outcome.link_cpu:.0%} of a core)"
    )


def print_table(args: argparse.Namespace, bench: Bench, results: dict[float, Any]) -> bool:
    """The table; returns whether every upload that ran stored the right file."""
    rtts = list(results)
    line_mb = bench.rate / 1e6
    print(
        f"\n{args.size} MiB across {args.rate:g} Mbit/s ({line_mb:g} MB/s), router buffer "
        f"{args.buffer_bdp:g} x BDP, slow start: the share of the line "
        f"(size / time / {line_mb:g} MB/s), median of {args.runs}"
    )
    head = f"{'client -> server':<58}" + "".join(f"{f'{r:g} ms':>20}" for r in rtts)
    print(head + f"{'goal ' + ' / '.join(f'{r:g}' for r in rtts):>16}")
    notes: list[str] = []
    ok = True
    for row, kind in selected(args, ROWS):
        label = row + (" -> ours / @tus/server" if kind == "tus" else " -> ours")
        line = f"{label:<58}"
        for rtt in rtts:
            cells = results[rtt]["cells"]
            shown = [cells[(row, s)] for s in SERVERS if (row, s) in cells]
            texts = [c.text(bench.size, bench.rate) for c in shown]
            line += f"{' / '.join(texts):>20}"
            for cell in shown:
                notes += [n for n in cell.notes() if n not in notes]
                ok = ok and not any(o.failed for o in cell.outcomes)
        target = TARGETS.get(row)
        if target and args.rate == 400 and set(rtts) <= {40, 150}:
            line += f"{' / '.join(f'{target[(40, 150).index(r)]:.2f}' for r in rtts):>16}"
        print(line)
    for note in notes:
        print(f"  {note}")
    print_targets(args, bench, results)
    for rtt, found in results.items():
        cpus = [o.link_cpu for c in found["cells"].values() for o in c.outcomes if o.seconds]
        link = found["link"]
        print(
            f"link at {rtt:g} ms: its emulator used at most {max(cpus, default=0):.0%} of a "
            f"core; queue at most {link['up']['peak_queue_bytes'] / 1e6:.1f} MB of "
            f"{link['buffer_bytes'] / 1e6:.1f}; {link['connections']} connections"
        )
        alone = ", ".join(f"{r} -> {s} {mb:.0f}" for (r, s), mb in found["alone"].items())
        print(f"  just before, with no delay or rate limit (MB/s): {alone}")
    return ok


def print_targets(args: argparse.Namespace, bench: Bench, results: dict[float, Any]) -> None:
    """The issue's goals, for ours, where this run measured them (400 Mbit/s, 40 or 150 ms)."""
    if args.rate != 400:
        return
    marks = []
    for row, goals in TARGETS.items():
        for rtt, goal in zip((40, 150), goals, strict=True):
            if rtt in results and (row, "ours") in results[rtt]["cells"]:
                share = results[rtt]["cells"][(row, "ours")].share(bench.size, bench.rate)
                got = "n/a" if share is None else f"{share:.2f}"
                mark = "ok" if share is not None and share >= goal else "MISSED"
                marks.append(f"{row} at {rtt} ms: {got} (>= {goal:.2f}) {mark}")
    if marks:
        print("issue 18's goals for ours:")
        for mark in marks:
            print(f"  {mark}")


def as_json(args: argparse.Namespace, bench: Bench, results: dict[float, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "size_MiB": args.size, "rate_Mbit": args.rate, "buffer_bdp": args.buffer_bdp,
        "runs": args.runs, "rtt_ms": {},
    }  # fmt: skip
    for rtt, found in results.items():
        rows: dict[str, Any] = {}
        for (row, server), cell in found["cells"].items():
            rows.setdefault(row, {})[server] = {
                "share_of_line": cell.share(bench.size, bench.rate),
                "seconds": [o.seconds for o in cell.outcomes],
                "partials_seconds": [o.transfer for o in cell.outcomes if o.transfer],
                "refused": [o.refused for o in cell.outcomes if o.refused],
                "failed": [o.failed for o in cell.outcomes if o.failed],
                "skipped": cell.skipped,
                "link_emulator_cpu": [round(o.link_cpu, 3) for o in cell.outcomes],
            }
        alone = {f"{r} -> {s}": mb for (r, s), mb in found["alone"].items()}
        out["rtt_ms"][f"{rtt:g}"] = {"rows": rows, "link": found["link"], "alone_MB_s": alone}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rtt", default="40,150", help="round trips in ms, e.g. 40,150")
    parser.add_argument("--rate", type=float, default=400, help="the line's Mbit/s")
    parser.add_argument("--buffer-bdp", type=float, default=1.25, help="router buffer, x BDP")
    parser.add_argument("--size", type=int, default=256, help="MiB per upload")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--lib2014", help="a copy of the 2014 library's incoming.js")
    parser.add_argument(
        "--rows", help="only the rows whose label holds one of these, e.g. WebSocket,2014"
    )
    parser.add_argument("--quick", action="store_true", help="32 MiB, one run")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    args.rtts = [float(r) for r in args.rtt.split(",") if r.strip()]
    if args.quick:
        args.size, args.runs = 32, 1
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wan-bench-") as scratch:
        bench = Bench(args, Path(scratch))
        try:
            results = measure(args, bench)
        finally:
            bench.stop()
    ok = print_table(args, bench, results)
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(as_json(args, bench, results), indent=2))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
