"""Helpers for a web application's backend: tickets, the handover, the answer, the file.

The server side of these calls is `incoming.backend_api` (the backend API) and
`incoming.handover` (the POST to `signalFinishURL`); this module is the other end,
for the web app, so that nobody has to write that HTTP again::

    from incoming.backend import Client, HandoverRefused, answer_done_json, move_file, read_handover

    incoming = Client("http://127.0.0.1:4000")
    ticket = incoming.new_upload("https://app.example/handover", remove_file_when_finished=False)
    db.keep(ticket.id, ticket.secret)          # the page gets ticket.id, never the secret

    # POST /handover (Flask's request.form, Django's request.POST, a dict, the body):
    try:
        handover = read_handover(request.form, db.secret_of)   # typed; secret checked
        if handover.cancelled:
            db.forget(handover.id)
            return "ok"
        verdict = db.verdict_of(handover.id)   # handovers come at least once
        if verdict is None:
            stored = move_file(handover, FILES)                # SHA-256 checked
            verdict = {"url": f"/files/{stored.name}", "sha256": stored.sha256}
            db.keep_verdict(handover.id, verdict)
    except HandoverRefused as e:               # 400, 403, 422: the handover fails
        return str(e), e.status
    return answer_done_json(verdict)           # 200, text/plain: the page's `result`

Clients: `Client` blocks (WSGI apps; stdlib `urllib` only), `AsyncClient` is the same
for asyncio (a thread per call), `TwistedClient` uses treq. Everything else is plain
functions without I/O but `move_file`, which blocks on the disk: call it in a thread
from asynchronous code (`asyncio.to_thread`, `twisted.internet.threads.deferToThread`).

Only the standard library is imported here (treq when a `TwistedClient` is made), so a
Flask or Django app that imports this does not load Twisted.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import http.client
import json
import os
import re
import secrets
import stat
import unicodedata
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from .files import DATA_MODE, fsync_dir, write_all

if TYPE_CHECKING:
    from treq.client import HTTPClient

MAX_VERDICT_BYTES = 4096  # the server's limit on the text after `done` (and `result`)
ANSWER_CONTENT_TYPE = "text/plain; charset=utf-8"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
MAX_FIELDS = 100  # in a handover body we parse ourselves: the server sends under a dozen
_SHA256 = re.compile(r"[0-9a-f]{64}")
# what a handover always carries (SPEC: "the six above never change")
_REQUIRED = ("id", "filename", "filenameFromBrowser", "backendSecret", "cancelled", "cancelReason")
_KNOWN = (*_REQUIRED, "size", "sha256")


class IncomingError(Exception):
    """Anything this module raises on purpose."""


class ApiError(IncomingError):
    """The Incoming!! server refused a backend call: its HTTP status and its message
    (400 bad or unknown id, 403 wrong secret, 412 too late, 503/507 try later...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Unreachable(IncomingError):
    """No answer from the Incoming!! server (connection refused, reset, timed out)."""


class HandoverRefused(IncomingError):
    """A handover request the app must refuse; answer `status` with the message.

    Any answer but `done`/`wait` fails the handover (the server cancels the upload and
    deletes the file), so refuse only what is really wrong."""

    status = 400


class MalformedHandover(HandoverRefused):
    """A field is missing or is not what Incoming!! sends: not a handover."""


class WrongSecret(HandoverRefused):
    """The backendSecret is not the ticket's, or the ticket is unknown to the app."""

    status = 403


class FileMismatch(HandoverRefused):
    """The file's size or SHA-256 is not the one the handover announced."""

    status = 422


class InvalidVerdict(IncomingError, ValueError):
    """A verdict for the page over MAX_VERDICT_BYTES of UTF-8 (or not text): the server
    would fail the handover (or refuse `finish_upload`), so it is refused here, where
    the bug is."""


@dataclass(frozen=True)
class Ticket:
    """An upload ticket and the backendSecret given with it: keep both, give the page
    the id (the secret never leaves the backend)."""

    id: str
    secret: str


@dataclass(frozen=True)
class Handover:
    """The POST Incoming!! sends to `signalFinishURL`, typed.

    `filename` is the stored file (`StorageDir/<id>`, or `s3://BUCKET/KEY` with object
    storage; empty when cancelled); `filename_from_browser` is only what the browser
    said: never a path (see `safe_name`). `size` and `sha256` are None from servers that
    do not send them (`--checksum none` sends no sha256). Fields this version does not
    know are kept in `extra`."""

    id: str
    filename: str
    filename_from_browser: str
    backend_secret: str
    cancelled: bool
    cancel_reason: str
    size: int | None = None
    sha256: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def in_object_store(self) -> bool:
        """The file is an object (`s3://...`), not a local path: fetch it with an S3
        client (`s3_bucket`, `s3_key`, `s3_endpoint`)."""
        return self.filename.startswith("s3://")

    @property
    def s3_bucket(self) -> str | None:
        return self.extra.get("s3Bucket") or self._s3_parts()[0]

    @property
    def s3_key(self) -> str | None:
        return self.extra.get("s3Key") or self._s3_parts()[1]

    @property
    def s3_endpoint(self) -> str | None:
        """The store's URL when it is not AWS (Ceph RGW, MinIO); None for AWS."""
        return self.extra.get("s3Endpoint") or None

    def _s3_parts(self) -> tuple[str | None, str | None]:
        if not self.in_object_store:
            return None, None
        bucket, _, key = self.filename.removeprefix("s3://").partition("/")
        return bucket, key

    def verify(self, expected_secret: str | None) -> None:
        """Raise WrongSecret unless backendSecret is `expected_secret` (the one kept for
        this ticket; None: the app does not know the ticket). Constant time: how long
        it takes tells nothing of how much of a guess was right."""
        kept = (expected_secret if expected_secret is not None else "").encode("utf-8")
        given = self.backend_secret.encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, kept) or expected_secret is None:
            raise WrongSecret("wrong backendSecret or unknown upload id")


FormFields = Mapping[str, str] | Mapping[bytes, list[bytes]] | bytes | str


def parse_handover(form: FormFields) -> Handover:
    """The handover's form fields, typed; MalformedHandover names what is wrong.

    `form` is what a framework parsed (Flask's `request.form`, Django's `request.POST`,
    a dict, Twisted's `request.args`) or the raw urlencoded body (bytes or str; a field
    given twice is refused there; Twisted's `request.args` also holds the query string
    of `signalFinishURL`: pass `request.content.read()` if it has one). Checks only the
    form: `read_handover` also checks the secret, which every app must do."""
    fields = _form_fields(form)
    missing = [name for name in _REQUIRED if name not in fields]
    if missing:
        raise MalformedHandover(f"not a handover: no {', '.join(missing)}")
    ticket = fields["id"]
    if not _is_ticket(ticket):
        raise MalformedHandover("id is not an upload ticket (a UUID)")
    cancelled = {"yes": True, "no": False}.get(fields["cancelled"])
    if cancelled is None:
        raise MalformedHandover("cancelled is neither yes nor no")
    filename = fields["filename"]
    if not cancelled and not _is_stored_file(filename):
        raise MalformedHandover("filename is neither an absolute path nor s3://BUCKET/KEY")
    return Handover(
        id=ticket,
        filename=filename,
        filename_from_browser=fields["filenameFromBrowser"],
        backend_secret=fields["backendSecret"],
        cancelled=cancelled,
        cancel_reason=fields["cancelReason"],
        size=_size(fields.get("size")),
        sha256=_sha256(fields.get("sha256")),
        extra={k: v for k, v in fields.items() if k not in _KNOWN},
    )


def read_handover(form: FormFields, secret_of: Callable[[str], str | None]) -> Handover:
    """`parse_handover`, then the secret: `secret_of(ticket)` is the backendSecret the
    app kept for the ticket, or None if it knows no such ticket (`secrets.get` of a
    dict will do). Raises MalformedHandover (400) or WrongSecret (403)."""
    handover = parse_handover(form)
    handover.verify(secret_of(handover.id))
    return handover


def answer_done(verdict: str = "") -> bytes:
    """The body that answers a handover `done`, with the verdict for the page (the
    uploader's `result` in incoming.js), at most MAX_VERDICT_BYTES of UTF-8.

    Answer it with status 200 and ANSWER_CONTENT_TYPE, and again, with the same verdict,
    when the same id is handed over again: handovers come at least once."""
    if not verdict:
        return b"done"
    return b"done\n" + _verdict_bytes(verdict)


def answer_done_json(value: Any) -> bytes:
    """`answer_done` with `value` as compact JSON (non-ASCII kept as UTF-8: more fits)."""
    return answer_done(_json(value))


def answer_wait() -> bytes:
    """The body that answers a handover `wait`: the app calls `finish_upload` later
    (within the server's HandoverConfirmTimeoutS, 600 s by default)."""
    return b"wait"


def safe_name(name: str, default: str = "upload", max_bytes: int = 200) -> str:
    """A browser's file name made safe to use as one file name in a folder of yours.

    The last path component only (`/` and `\\` both separate), Unicode NFC, letters,
    digits and ` ._-()+,=@[]` kept and anything else (controls, quotes, `%`, `:`...)
    turned to `_`; no leading dot (no hidden files, no `..`), no trailing dot or space,
    no Windows device name; at most `max_bytes` of UTF-8 with the extension kept;
    `default` if nothing is left. The same name always gives the same result."""
    base = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    kept = "".join(c if c in " ._-()+,=@[]" or unicodedata.category(c)[0] in "LNM" else "_"
                   for c in base)  # fmt: skip
    kept = re.sub(r"\s+", " ", kept).lstrip(" .-").rstrip(" .") or default
    if kept.split(".")[0].upper() in _WINDOWS_DEVICES:
        kept = "_" + kept
    stem, dot, ext = kept.rpartition(".")
    if not dot or not stem or len(ext.encode()) > 20:  # no extension worth keeping
        stem, ext = kept, ""
    else:
        ext = "." + ext
    while stem and len((stem + ext).encode()) > max_bytes:
        stem = stem[:-1]
    return (stem.rstrip(" .") or default) + ext


_WINDOWS_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))]
)


@dataclass(frozen=True)
class StoredFile:
    """A handed-over file, now the app's: where it is, its size and SHA-256."""

    path: Path
    size: int
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name


def move_file(
    handover: Handover,
    directory: Path | str,
    name: str | None = None,
    *,
    verify: bool = True,
    copy: bool = False,
) -> StoredFile:
    """Move the handed-over file into `directory` (created if missing), durably, under
    `safe_name(name or handover.filename_from_browser)`, or `stem-2.ext`, `stem-3.ext`...
    if that exists (a name is reserved with O_EXCL: concurrent handovers never collide).

    Blocks on the disk. Checks first, before anything of the app's changes: the file is
    the one of this ticket (its name is the id: a forged filename cannot move another
    file), a regular file, of the announced size and SHA-256 (FileMismatch, 422: the
    handover fails). `verify=False` trusts the server's SHA-256 and saves reading the
    file; without one (`--checksum none`) the file is read all the same. A rename within
    one file system, else a copy, fsynced before the original is removed; the folder is
    fsynced, so the file is yours once this returns: then answer `done`.

    `copy=True` leaves the original where it is, for an app that may read Incoming!!'s
    StorageDir but not write it (another user in its group, as with the systemd unit):
    create such tickets with `remove_file_when_finished=True`, and the server deletes
    the original after your `done`.

    A second handover of the same id finds the file gone (FileNotFoundError): answer it
    with the verdict kept from the first; if both run at once, the second's error (an
    HTTP 500) makes the server try again, and it then finds that verdict."""
    if handover.cancelled:
        raise ValueError("a cancelled upload has no file")
    if handover.in_object_store:
        raise ValueError(
            f"the file is in object storage ({handover.filename}): copy it with an S3 client"
        )
    source = Path(handover.filename)
    if source.name != handover.id:
        raise MalformedHandover("filename is not the upload's file (StorageDir/<id>)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MalformedHandover("filename is not a regular file")
        if handover.size is not None and info.st_size != handover.size:
            raise FileMismatch(f"the file has {info.st_size} bytes, not {handover.size}")
        target = _reserve(directory, safe_name(name or handover.filename_from_browser))
        try:
            if copy:
                digest = _copy(handover, fd, target, verify)
            else:
                digest = _rename(handover, fd, source, target, verify, info.st_dev)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
    finally:
        os.close(fd)
    fsync_dir(directory)
    return StoredFile(target, info.st_size, digest)


def _rename(
    handover: Handover, fd: int, source: Path, target: Path, verify: bool, device: int
) -> str:
    """Checked, then renamed over the empty file that reserved the name; between file
    systems (a rename fails with EXDEV across mounts too), copied and synced first."""
    if device == os.stat(target.parent).st_dev:
        digest = _check(handover, fd, verify)
        try:
            os.rename(source, target)
            return digest
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
    digest = _copy(handover, fd, target, verify)
    fsync_dir(target.parent)
    os.unlink(source)
    return digest


def _reserve(directory: Path, name: str) -> Path:
    stem, dot, suffix = name.rpartition(".")
    if not stem:
        stem, dot, suffix = name, "", ""
    for n in range(1, 10_000):
        target = directory / (name if n == 1 else f"{stem}-{n}{dot}{suffix}")
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, DATA_MODE))
            return target
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for {name!r} in {directory}")


def _check(handover: Handover, fd: int, verify: bool) -> str:
    """The file's SHA-256, read only if asked to or if the server sent none."""
    if handover.sha256 is not None and not verify:
        return handover.sha256
    digest = hashlib.sha256()
    for block in _blocks(fd):
        digest.update(block)
    return _compare(handover, digest.hexdigest())


def _copy(handover: Handover, fd: int, target: Path, verify: bool) -> str:
    """Into `target` (another file system), hashing as it goes; fsynced."""
    digest = hashlib.sha256()
    out = os.open(target, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        for block in _blocks(fd):
            digest.update(block)
            write_all(out, block)
        os.fsync(out)
    finally:
        os.close(out)
    return (
        _compare(handover, digest.hexdigest()) if verify else handover.sha256 or digest.hexdigest()
    )


def _compare(handover: Handover, digest: str) -> str:
    if handover.sha256 is not None and not hmac.compare_digest(digest, handover.sha256):
        raise FileMismatch(f"the file's SHA-256 is {digest}, not {handover.sha256}")
    return digest


def _blocks(fd: int, size: int = 1 << 20) -> Iterator[bytes]:
    os.lseek(fd, 0, os.SEEK_SET)
    while block := os.read(fd, size):
        yield block


# -- the backend API: new_upload, cancel_upload, finish_upload ---------------------------


class Client:
    """The backend API of an Incoming!! server, blocking (a WSGI app's request handler,
    a worker), over the standard library's `urllib`: no dependency.

    `base_url` is where the backend reaches the server (`http://127.0.0.1:4000`, or its
    `--backend-listen` address); routes are under `prefix`. Failures raise ApiError (the
    server said no) or Unreachable (it did not answer within `timeout` seconds)."""

    def __init__(
        self, base_url: str = "http://127.0.0.1:4000", *, timeout: float = 30.0,
        prefix: str = "/incoming",
    ) -> None:  # fmt: skip
        self.base_url = _api_url(base_url, prefix)
        self.timeout = timeout

    def new_upload(
        self, signal_finish_url: str, *, backend_secret: str | None = None,
        remove_file_when_finished: bool = True,
    ) -> Ticket:  # fmt: skip
        """A ticket for one file, and the backendSecret the handover will carry: a
        fresh random one unless given. `remove_file_when_finished=False` when the app
        moves the file away (`move_file`); True lets the server delete what remains."""
        secret, fields = _new_upload(signal_finish_url, backend_secret, remove_file_when_finished)
        return _ticket(self._post("new_upload", fields), secret)

    def cancel_upload(self, ticket: str, backend_secret: str) -> None:
        """Cancel the upload (its partial file is deleted, a connected page told).
        ApiError 412 when it is too late: the handover runs or is over."""
        self._post("cancel_upload", {"id": ticket, "backendSecret": backend_secret})

    def finish_upload(self, ticket: str, backend_secret: str, result: str = "") -> None:
        """After answering `wait`: the app has the file. `result` is the verdict for the
        page, as after `done` (at most MAX_VERDICT_BYTES). It may come before the `wait`
        answer has reached the server."""
        self._post("finish_upload", _finish_fields(ticket, backend_secret, result))

    def _post(self, call: str, fields: dict[str, str]) -> str:
        request = urllib.request.Request(
            f"{self.base_url}/backend/{call}",
            data=urlencode(fields).encode(),
            headers={"Content-Type": FORM_CONTENT_TYPE},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return _outcome(response.status, response.read())
        except urllib.error.HTTPError as e:
            with e:
                return _outcome(e.code, e.read())
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut
            raise Unreachable(f"{self.base_url}: {getattr(e, 'reason', e)!s}") from e


class AsyncClient:
    """`Client` for asyncio apps (FastAPI, aiohttp, Starlette): each call runs the
    blocking one in a thread (`asyncio.to_thread`), so the event loop never waits on it;
    no HTTP library to add. The same arguments and errors."""

    def __init__(
        self, base_url: str = "http://127.0.0.1:4000", *, timeout: float = 30.0,
        prefix: str = "/incoming",
    ) -> None:  # fmt: skip
        self.blocking = Client(base_url, timeout=timeout, prefix=prefix)

    async def new_upload(
        self, signal_finish_url: str, *, backend_secret: str | None = None,
        remove_file_when_finished: bool = True,
    ) -> Ticket:  # fmt: skip
        return await asyncio.to_thread(
            self.blocking.new_upload, signal_finish_url, backend_secret=backend_secret,
            remove_file_when_finished=remove_file_when_finished,
        )  # fmt: skip

    async def cancel_upload(self, ticket: str, backend_secret: str) -> None:
        await asyncio.to_thread(self.blocking.cancel_upload, ticket, backend_secret)

    async def finish_upload(self, ticket: str, backend_secret: str, result: str = "") -> None:
        await asyncio.to_thread(self.blocking.finish_upload, ticket, backend_secret, result)


class TwistedClient:
    """`Client` for Twisted and Klein apps, over treq: coroutines to await (or wrap in
    `ensureDeferred`). `http` is a treq `HTTPClient` of the app's (its own connection
    pool, or treq's `StubTreq` in tests); treq's shared one by default."""

    def __init__(
        self, base_url: str = "http://127.0.0.1:4000", *, http: HTTPClient | None = None,
        timeout: float = 30.0, prefix: str = "/incoming",
    ) -> None:  # fmt: skip
        import treq

        self.base_url = _api_url(base_url, prefix)
        self.timeout = timeout
        self._http: Any = http if http is not None else treq

    async def new_upload(
        self, signal_finish_url: str, *, backend_secret: str | None = None,
        remove_file_when_finished: bool = True,
    ) -> Ticket:  # fmt: skip
        secret, fields = _new_upload(signal_finish_url, backend_secret, remove_file_when_finished)
        return _ticket(await self._post("new_upload", fields), secret)

    async def cancel_upload(self, ticket: str, backend_secret: str) -> None:
        await self._post("cancel_upload", {"id": ticket, "backendSecret": backend_secret})

    async def finish_upload(self, ticket: str, backend_secret: str, result: str = "") -> None:
        await self._post("finish_upload", _finish_fields(ticket, backend_secret, result))

    async def _post(self, call: str, fields: dict[str, str]) -> str:
        from twisted.internet.defer import CancelledError, TimeoutError
        from twisted.internet.error import ConnectError, ConnectionLost, DNSLookupError
        from twisted.web.client import ResponseFailed, ResponseNeverReceived

        unanswered = (
            ConnectError, ConnectionLost, DNSLookupError, ResponseFailed,
            ResponseNeverReceived, CancelledError, TimeoutError,
        )  # fmt: skip

        try:
            response = await self._http.post(
                f"{self.base_url}/backend/{call}",
                data=urlencode(fields).encode(),
                headers={b"Content-Type": [FORM_CONTENT_TYPE.encode()]},
                timeout=self.timeout,
            )
            body = await response.content()
        except unanswered as e:
            raise Unreachable(f"{self.base_url}: {e}") from e
        return _outcome(response.code, body)


def _api_url(base_url: str, prefix: str) -> str:
    """The server's URL and the routes' prefix (unless the URL ends with it already)."""
    base = base_url.rstrip("/")
    return base if base.endswith(prefix) else base + prefix


def _new_upload(url: str, secret: str | None, remove: bool) -> tuple[str, dict[str, str]]:
    secret = secrets.token_urlsafe(32) if secret is None else secret
    return secret, {
        "signalFinishURL": url,
        "destType": "file",
        "removeFileWhenFinished": "true" if remove else "false",
        "backendSecret": secret,
    }


def _finish_fields(ticket: str, secret: str, result: str) -> dict[str, str]:
    fields = {"id": ticket, "backendSecret": secret}
    if result:
        fields["result"] = _verdict_bytes(result).decode()
    return fields


def _ticket(answer: str, secret: str) -> Ticket:
    answer = answer.strip()
    if not _is_ticket(answer):
        raise ApiError(200, f"the server answered {answer[:60]!r}, not a ticket")
    return Ticket(answer, secret)


def _outcome(status: int, body: bytes) -> str:
    """The value of a 200 answer, or ApiError with the server's message."""
    text = body.decode("utf-8", "replace")
    if status != 200:
        raise ApiError(status, text.strip() or "no message")
    return text


# -- form fields --------------------------------------------------------------------------


def _form_fields(form: FormFields) -> dict[str, str]:
    try:
        if isinstance(form, bytes | str):
            text = form.decode() if isinstance(form, bytes) else form
            pairs = parse_qsl(
                text, keep_blank_values=True, strict_parsing=bool(text), errors="strict",
                max_num_fields=MAX_FIELDS,
            )  # fmt: skip
            fields = dict(pairs)
            if len(fields) != len(pairs):
                raise MalformedHandover("a field is given twice")
            return fields
        return {_text(k): _one(v) for k, v in form.items()}
    except (UnicodeDecodeError, ValueError) as e:
        raise MalformedHandover(f"not a form of UTF-8 fields: {e}") from None


def _one(value: Any) -> str:
    if isinstance(value, list | tuple):
        if len(value) != 1:
            raise MalformedHandover("a field is given twice")
        value = value[0]
    return _text(value)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if not isinstance(value, str):
        raise MalformedHandover(f"a field is a {type(value).__name__}, not text")
    return value


def _is_ticket(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def _is_stored_file(filename: str) -> bool:
    if "\0" in filename:
        return False
    if filename.startswith("s3://"):
        bucket, _, key = filename[5:].partition("/")
        return bool(bucket and key)
    return os.path.isabs(filename)


def _size(text: str | None) -> int | None:
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()):
        raise MalformedHandover("size is not a number of bytes")
    return int(text)


def _sha256(text: str | None) -> str | None:
    if text is None:
        return None
    if not _SHA256.fullmatch(text.lower()):
        raise MalformedHandover("sha256 is not 64 hexadecimal digits")
    return text.lower()


def _verdict_bytes(verdict: str) -> bytes:
    try:
        data = verdict.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidVerdict("the verdict is not valid Unicode text") from None
    if len(data) > MAX_VERDICT_BYTES:
        raise InvalidVerdict(
            f"the verdict has {len(data)} bytes of UTF-8; at most {MAX_VERDICT_BYTES}"
        )
    return data


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


__all__ = [
    "ANSWER_CONTENT_TYPE", "MAX_VERDICT_BYTES", "ApiError", "AsyncClient", "Client",
    "FileMismatch", "Handover", "HandoverRefused", "IncomingError", "MalformedHandover",
    "StoredFile", "Ticket", "TwistedClient", "Unreachable", "InvalidVerdict", "WrongSecret",
    "answer_done", "answer_done_json", "answer_wait", "move_file", "parse_handover",
    "read_handover", "safe_name",
]  # fmt: skip
