"""A small web app that takes uploads through Incoming!!, as a real integration would.

Its backend asks Incoming!! for a ticket per file (with a fresh backendSecret),
checks the secret on the handover, moves each finished file into its own folder
and checks its SHA-256 against the handover's `sha256` (a mismatch fails the
handover), and lists the files for download. It answers `done` and, on the next
line, its verdict for the page: JSON with the file's download URL, size (as stored),
SHA-256 and stored name, which the page gets as the uploader's `result`. `--handover wait`
answers `wait` and calls `finish_upload` with that verdict as `result` once the
file is moved.

The tickets' secrets, and the verdicts of the files received, are kept in a file
(`--secrets`), so that an upload a reloaded page continues with its ticket is
still accepted after this app restarts, and a handover that comes again (they
come at least once) gets the same answer.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import treq
from klein import Klein
from twisted.internet import reactor, threads
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.web.server import Site
from twisted.web.static import File

HERE = Path(__file__).resolve().parent
log = Logger()


def safe_name(name: str) -> str:
    """A browser-supplied name made harmless: no directories, no dot files."""
    base = re.sub(r"[^\w.\- ]", "_", name.replace("\\", "/").rsplit("/", 1)[-1]).strip(". ")
    return base[:120] or "upload"


@dataclass
class Demo:
    incoming: str  # http://host:port of the Incoming!! server, as the backend reaches it
    public_incoming: str  # host:port of the Incoming!! server, as browsers reach it
    own_url: str  # how Incoming!! reaches this app
    files: Path
    handover: str = "done"
    secrets_file: Path | None = None  # where the secrets outlive a restart
    secrets: dict[str, str] = field(default_factory=dict)
    # the verdicts of the files received: a handover may come again (at least once)
    verdicts: dict[str, str] = field(default_factory=dict)
    events: list[dict[str, str]] = field(default_factory=list)
    app: Klein = field(default_factory=Klein)

    def __post_init__(self) -> None:
        self.files.mkdir(parents=True, exist_ok=True)
        if self.secrets_file is not None and self.secrets_file.exists():
            kept = json.loads(self.secrets_file.read_text())
            self.secrets.update(kept.get("secrets", {}))
            self.verdicts.update(kept.get("verdicts", {}))
        app = self.app
        app.route("/", methods=["GET"])(self.index)
        app.route("/static/", branch=True)(lambda request: File(str(HERE / "static")))
        app.route("/api/ticket", methods=["POST"])(self.ticket)
        app.route("/api/files", methods=["GET"])(self.list_files)
        app.route("/api/events", methods=["GET"])(self.list_events)
        app.route("/handover", methods=["POST"])(self.receive_handover)
        app.route("/files/<name>", methods=["GET"])(self.download)

    def index(self, request: Any) -> bytes:
        page = (HERE / "static" / "index.html").read_text()
        request.setHeader("content-type", "text/html; charset=utf-8")
        return page.replace("{{INCOMING}}", self.public_incoming).encode()

    async def ticket(self, request: Any) -> bytes:
        secret = secrets.token_urlsafe(24)
        response = await treq.post(
            f"{self.incoming}/incoming/backend/new_upload",
            data={
                "signalFinishURL": f"{self.own_url}/handover",
                "removeFileWhenFinished": "false",
                "backendSecret": secret,
            },
        )
        body = await response.text()
        request.setHeader("content-type", "application/json")
        if response.code != 200:
            request.setResponseCode(502)
            return json.dumps({"error": body}).encode()
        self.secrets[body] = secret
        self._save_secrets()
        return json.dumps({"ticket": body}).encode()

    def _save_secrets(self) -> None:
        """Written whole, then renamed into place: a crash leaves the old or the new."""
        if self.secrets_file is None:
            return
        partial = self.secrets_file.with_name(self.secrets_file.name + ".new")
        partial.write_text(json.dumps({"secrets": self.secrets, "verdicts": self.verdicts}))
        partial.chmod(0o600)
        os.replace(partial, self.secrets_file)

    async def receive_handover(self, request: Any) -> bytes:
        form = {k.decode(): v[-1].decode() for k, v in request.args.items()}
        ticket = form.get("id", "")
        if not secrets.compare_digest(
            self.secrets.get(ticket, "\0"), form.get("backendSecret", "")
        ):
            request.setResponseCode(403)
            return b"wrong secret"
        self.events.append(form)
        if form.get("cancelled") == "yes":
            log.info("upload {id} cancelled: {why}", id=ticket, why=form.get("cancelReason"))
            self.secrets.pop(ticket, None)
            self._save_secrets()
            return b"ok"
        if ticket in self.verdicts:  # the same handover again (its answer was lost)
            return b"done\n" + self.verdicts[ticket].encode()
        # Disk work in a thread, never on the reactor: the move, and reading the file
        # to hash it (Incoming!! without a checksum, `--checksum none`, sends no sha256).
        target, size, digest = await threads.deferToThread(
            self._move, form["filename"], form["filenameFromBrowser"]
        )
        expected = form.get("sha256")
        if expected is not None and expected != digest:
            await threads.deferToThread(target.unlink)
            log.error(
                "upload {id} refused: SHA-256 {ours} of the file received, {theirs} sent",
                id=ticket,
                ours=digest,
                theirs=expected,
            )
            request.setResponseCode(422)  # not `done` nor `wait`: the handover fails
            return b"the file's SHA-256 does not match"
        log.info("upload {id} stored as {t}, SHA-256 {d}", id=ticket, t=target.name, d=digest)
        verdict = json.dumps(
            {"url": "/files/" + quote(target.name), "size": size, "sha256": digest,
             "name": target.name}
        )  # fmt: skip
        self.verdicts[ticket] = verdict
        self._save_secrets()
        if self.handover == "wait":
            # A worker finishes the job; its finish_upload may arrive before our answer.
            ensureDeferred(self._finish(ticket, verdict))
            return b"wait"
        return b"done\n" + verdict.encode()  # the verdict reaches the page as `result`

    def _move(self, source: str, browser_name: str) -> tuple[Path, int, str]:
        """Into the files folder, under a name of its own (reserved with O_EXCL: two
        handovers at once may bring the same name); its size and SHA-256."""
        stem = safe_name(browser_name)
        for n in itertools.count():
            target = self.files / (f"{n}-{stem}" if n else stem)
            try:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
                break
            except FileExistsError:
                continue
        shutil.move(source, target)
        with target.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            return target, os.fstat(f.fileno()).st_size, digest

    async def _finish(self, ticket: str, verdict: str) -> None:
        """The work is done: tell Incoming!! (it accepts this even before our `wait`),
        with the verdict for the page."""
        secret = self.secrets.get(ticket, "")
        response = await treq.post(
            f"{self.incoming}/incoming/backend/finish_upload",
            data={"id": ticket, "backendSecret": secret, "result": verdict},
        )
        await response.content()
        log.info("finish_upload {id}: {code}", id=ticket, code=response.code)

    def list_files(self, request: Any) -> bytes:
        request.setHeader("content-type", "application/json")
        entries = sorted(self.files.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        return json.dumps(
            [
                {"name": p.name, "size": p.stat().st_size, "url": "/files/" + quote(p.name)}
                for p in entries
                if p.is_file()
            ]  # fmt: skip
        ).encode()

    def list_events(self, request: Any) -> bytes:
        request.setHeader("content-type", "application/json")
        return json.dumps(self.events).encode()

    def download(self, request: Any, name: str) -> Any:
        path = self.files / safe_name(name)
        if safe_name(name) != name or not path.is_file():
            request.setResponseCode(404)
            return b"no such file"
        request.setHeader("content-disposition", f"attachment; filename*=UTF-8''{quote(name)}")
        return File(str(path), defaultType="application/octet-stream")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Incoming!! demo web app")
    parser.add_argument("--listen", default="tcp:8080:interface=127.0.0.1")
    parser.add_argument("--incoming", default="http://127.0.0.1:4000")
    parser.add_argument("--public-incoming", help="host:port browsers use [from --incoming]")
    parser.add_argument("--own-url", default="http://127.0.0.1:8080")
    parser.add_argument("--files", default="demo-data/files")
    parser.add_argument(
        "--secrets", help="file keeping the tickets' secrets [beside --files: secrets.json]"
    )
    parser.add_argument("--handover", choices=["done", "wait"], default="done")
    args = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    demo = Demo(
        incoming=args.incoming.rstrip("/"),
        public_incoming=args.public_incoming or args.incoming.split("://", 1)[1].rstrip("/"),
        own_url=args.own_url.rstrip("/"),
        files=Path(args.files),
        handover=args.handover,
        secrets_file=Path(args.secrets)
        if args.secrets
        else Path(args.files).parent / "secrets.json",
    )
    endpoint = serverFromString(reactor, args.listen)

    def listening(port: Any) -> None:
        address = port.getHost()
        print(f"demo listening on {address.host}:{address.port}", flush=True)

    endpoint.listen(Site(demo.app.resource())).addCallbacks(
        listening, lambda f: (print(f.getErrorMessage()), os._exit(1))
    )
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
