"""`incoming.backend`, the integrators' kit: the handover read and checked, the answer
built, the file moved, and the three clients against the real server over loopback."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from klein import Klein
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.web.server import Site

from incoming import backend
from incoming.backend import (
    MAX_VERDICT_BYTES,
    ApiError,
    AsyncClient,
    Client,
    FileMismatch,
    Handover,
    HandoverRefused,
    InvalidVerdict,
    MalformedHandover,
    Ticket,
    TwistedClient,
    Unreachable,
    WrongSecret,
    answer_done,
    answer_done_json,
    answer_wait,
    move_file,
    parse_handover,
    read_handover,
    safe_name,
)
from incoming.handover import MAX_RESULT_BYTES, form_fields, parse_answer
from incoming.upload import Upload

from .harness import CHUNK_KB, ROOT, SEND_AHEAD, Server, free_port, send_all, upload_request

TICKET = "0b4d3f52-5a55-4a8e-9f5e-1b2c3d4e5f60"
SECRET = "s3cr3t-ünïcode"
DIGEST = hashlib.sha256(b"hello").hexdigest()


def handover_form(**changes: str | None) -> dict[str, str]:
    """A handover's fields as the server builds them (`incoming.handover.form_fields`)."""
    upload = Upload(TICKET, "http://app.example/handover", SECRET, False)
    upload.browser_name = "holiday video.mp4"
    upload.stored = 5
    form = form_fields(upload, f"/srv/incoming/{TICKET}", None, DIGEST)
    for name, value in changes.items():
        if value is None:
            form.pop(name, None)
        else:
            form[name] = value
    return form


# -- reading a handover ------------------------------------------------------------------


def test_a_handover_as_the_server_sends_it_is_typed() -> None:
    body = urlencode(handover_form()).encode()  # the wire form, as the server posts it
    handover = parse_handover(body)
    assert handover == Handover(
        id=TICKET,
        filename=f"/srv/incoming/{TICKET}",
        filename_from_browser="holiday video.mp4",
        backend_secret=SECRET,
        cancelled=False,
        cancel_reason="",
        size=5,
        sha256=DIGEST,
        extra={},
    )
    assert not handover.in_object_store and handover.s3_bucket is None


def test_a_cancel_notice_has_no_file_and_a_reason() -> None:
    upload = Upload(TICKET, "http://app.example/handover", SECRET, True)
    handover = parse_handover(form_fields(upload, "", "the browser cancelled it"))
    assert handover.cancelled is True
    assert (handover.filename, handover.cancel_reason) == ("", "the browser cancelled it")
    assert (handover.size, handover.sha256) == (0, None)


@pytest.mark.parametrize(
    "form",
    [
        handover_form(),  # a dict (Flask's request.form, Django's request.POST are Mappings)
        urlencode(handover_form()),  # the body as text
        {k.encode(): [v.encode()] for k, v in handover_form().items()},  # Twisted's args
    ],
    ids=["mapping", "text", "twisted-args"],
)
def test_every_shape_of_form_gives_the_same_handover(form: Any) -> None:
    assert parse_handover(form) == parse_handover(urlencode(handover_form()).encode())


def test_a_handover_without_the_optional_fields() -> None:
    """An older server (or `--checksum none`) sends no size or sha256."""
    handover = parse_handover(handover_form(size=None, sha256=None))
    assert (handover.size, handover.sha256) == (None, None)


def test_unknown_fields_are_kept_and_object_storage_is_named() -> None:
    form = handover_form(
        filename="s3://uploads/incoming/" + TICKET,
        s3Bucket="uploads",
        s3Key="incoming/" + TICKET,
        s3Endpoint="http://127.0.0.1:7480",
        somethingNew="42",
    )
    handover = parse_handover(form)
    assert handover.extra == {
        "s3Bucket": "uploads", "s3Key": "incoming/" + TICKET,
        "s3Endpoint": "http://127.0.0.1:7480", "somethingNew": "42",
    }  # fmt: skip
    assert handover.in_object_store
    assert (handover.s3_bucket, handover.s3_key) == ("uploads", "incoming/" + TICKET)
    assert handover.s3_endpoint == "http://127.0.0.1:7480"
    # from the filename alone, when the fields are not there
    bare = parse_handover(handover_form(filename="s3://b/some/key"))
    assert (bare.s3_bucket, bare.s3_key, bare.s3_endpoint) == ("b", "some/key", None)


@pytest.mark.parametrize(
    "name", ["id", "filename", "filenameFromBrowser", "backendSecret", "cancelled", "cancelReason"]
)
def test_a_missing_field_is_named(name: str) -> None:
    with pytest.raises(MalformedHandover, match=f"no {name}") as raised:
        parse_handover(handover_form(**{name: None}))
    assert raised.value.status == 400


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"id": "../../etc"}, "id is not an upload ticket"),
        ({"id": TICKET.upper()}, "id is not an upload ticket"),
        ({"cancelled": "true"}, "cancelled is neither yes nor no"),
        ({"filename": "relative/path"}, "filename is neither"),
        ({"filename": ""}, "filename is neither"),
        ({"filename": "s3://bucket-only"}, "filename is neither"),
        ({"filename": "/a\0b"}, "filename is neither"),
        ({"size": "-1"}, "size is not a number"),
        ({"size": "5.0"}, "size is not a number"),
        ({"size": "٥"}, "size is not a number"),  # a digit, but not ASCII
        ({"sha256": "abc"}, "sha256 is not 64 hexadecimal"),
        ({"sha256": "g" * 64}, "sha256 is not 64 hexadecimal"),
    ],
)
def test_a_malformed_field_is_refused(changes: dict[str, str], message: str) -> None:
    with pytest.raises(MalformedHandover, match=message):
        parse_handover(handover_form(**changes))


def test_an_upper_case_sha256_is_read_as_lower_case() -> None:
    assert parse_handover(handover_form(sha256=DIGEST.upper())).sha256 == DIGEST


@pytest.mark.parametrize(
    "body",
    [
        urlencode(handover_form()).encode() + b"&id=" + str(uuid.uuid4()).encode(),
        urlencode(handover_form()).encode() + b"&filename=%ff",
        b"\xff\xfe",
        b"",
    ],
    ids=["field-twice", "not-utf8-value", "not-utf8", "empty"],
)
def test_a_body_that_is_not_one_handover_is_refused(body: bytes) -> None:
    with pytest.raises(MalformedHandover):
        parse_handover(body)


def test_a_field_given_twice_in_a_parsed_form_is_refused() -> None:
    form = {k.encode(): [v.encode()] for k, v in handover_form().items()}
    form[b"backendSecret"].append(b"another")
    with pytest.raises(MalformedHandover, match="twice"):
        parse_handover(form)


# -- the secret ---------------------------------------------------------------------------


def test_the_right_secret_is_accepted() -> None:
    kept = {TICKET: SECRET}
    assert read_handover(handover_form(), kept.get).id == TICKET


@pytest.mark.parametrize(
    "kept",
    [{TICKET: "another"}, {TICKET: SECRET[:-1]}, {TICKET: SECRET + "x"}, {TICKET: ""}, {}],
    ids=["other", "prefix", "longer", "empty", "unknown-ticket"],
)
def test_a_wrong_secret_or_an_unknown_ticket_is_refused_403(kept: dict[str, str]) -> None:
    with pytest.raises(WrongSecret) as raised:
        read_handover(handover_form(), kept.get)
    assert raised.value.status == 403
    assert isinstance(raised.value, HandoverRefused)


def test_an_empty_secret_kept_for_a_ticket_matches_an_empty_one() -> None:
    assert read_handover(handover_form(backendSecret=""), {TICKET: ""}.get).backend_secret == ""


def test_the_secret_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through hmac.compare_digest, on UTF-8 bytes (it refuses non-ASCII str), also
    for an unknown ticket, so that its answer takes the same time."""
    seen: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    read_handover(handover_form(), {TICKET: SECRET}.get)
    with pytest.raises(WrongSecret):
        read_handover(handover_form(), {}.get)
    assert seen == [(SECRET.encode(), SECRET.encode()), (SECRET.encode(), b"")]


# -- the answer ---------------------------------------------------------------------------


def test_done_with_and_without_a_verdict_is_what_the_server_reads() -> None:
    assert answer_done() == b"done"
    assert parse_answer(answer_done()).kind == "done"
    verdict = json.dumps({"url": "/files/ü.bin"})
    answer = parse_answer(answer_done(verdict))
    assert (answer.kind, answer.result) == ("done", verdict)
    assert parse_answer(answer_wait()).kind == "wait"


def test_done_json_is_compact_utf8_json() -> None:
    body = answer_done_json({"name": "résumé.pdf", "size": 3})
    assert body == 'done\n{"name":"résumé.pdf","size":3}'.encode()
    assert json.loads(parse_answer(body).result) == {"name": "résumé.pdf", "size": 3}


def test_a_verdict_of_the_server_limit_passes_one_byte_more_is_refused() -> None:
    assert MAX_VERDICT_BYTES == MAX_RESULT_BYTES  # the server's own limit
    exact = "x" * (MAX_VERDICT_BYTES - 2) + "é"  # 4096 bytes of UTF-8
    assert parse_answer(answer_done(exact)).result == exact
    with pytest.raises(InvalidVerdict, match="4097 bytes"):
        answer_done("x" * (MAX_VERDICT_BYTES - 1) + "é")  # 4095 characters, 4097 bytes
    with pytest.raises(InvalidVerdict):
        answer_done_json({"x": "y" * MAX_VERDICT_BYTES})
    with pytest.raises(InvalidVerdict, match="not valid Unicode"):
        answer_done("\ud800")  # a lone surrogate cannot be UTF-8
    assert issubclass(InvalidVerdict, ValueError)


# -- safe names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("holiday video.mp4", "holiday video.mp4"),
        ("résumé (final).pdf", "résumé (final).pdf"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\report.docx", "report.docx"),
        (".htaccess", "htaccess"),
        ("..", "upload"),
        ("", "upload"),
        ("con.txt", "_con.txt"),
        ("a\0b\nc.txt", "a_b_c.txt"),
        ("\u202egnp.exe", "_gnp.exe"),  # right-to-left override: shown as "exe.png"
        ("100%;rm -rf *.bin", "100__rm -rf _.bin"),
        ("-o.txt", "o.txt"),
        ("name. ", "name"),
        ("e\u0301t\u00e9.txt", "\u00e9t\u00e9.txt"),  # NFC
    ],
)
def test_safe_name(name: str, safe: str) -> None:
    assert safe_name(name) == safe


def test_safe_name_keeps_the_extension_when_it_cuts() -> None:
    cut = safe_name("é" * 300 + ".tar.gz")
    assert cut.endswith(".gz") and len(cut.encode()) <= 200
    assert len(safe_name("x" * 300, max_bytes=50).encode()) == 50


@given(st.text(max_size=400))
def test_a_safe_name_is_one_harmless_file_name(name: str) -> None:
    safe = safe_name(name)
    assert safe and safe not in (".", "..") and not safe.startswith((".", "-"))
    assert "/" not in safe and "\\" not in safe and "\0" not in safe
    assert all(c.isprintable() for c in safe)
    assert 0 < len(safe.encode()) <= 200
    assert safe_name(safe) == safe  # settled: a second pass changes nothing


# -- moving the file ----------------------------------------------------------------------


@pytest.fixture
def stored(tmp_path: Path) -> Iterator[Path]:
    """The server's StorageDir with one finished upload, `StorageDir/<ticket>`."""
    storage = tmp_path / "storage"
    storage.mkdir()
    path = storage / TICKET
    path.write_bytes(b"hello")
    yield path


def handover_of(path: Path, **changes: str | None) -> Handover:
    return parse_handover(handover_form(filename=str(path), **changes))


def test_move_file_moves_verifies_and_reports(stored: Path, tmp_path: Path) -> None:
    result = move_file(handover_of(stored), tmp_path / "files")
    assert result.path == tmp_path / "files" / "holiday video.mp4"
    assert (result.name, result.size, result.sha256) == ("holiday video.mp4", 5, DIGEST)
    assert result.path.read_bytes() == b"hello"
    assert not stored.exists()


def test_move_file_never_overwrites_a_file_of_the_same_name(stored: Path, tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / "holiday video.mp4").write_bytes(b"older")
    (files / "holiday video-2.mp4").write_bytes(b"old too")
    result = move_file(handover_of(stored), files)
    assert result.name == "holiday video-3.mp4"
    assert (files / "holiday video.mp4").read_bytes() == b"older"
    assert result.path.read_bytes() == b"hello"


def test_move_file_takes_a_name_of_the_apps_made_safe(stored: Path, tmp_path: Path) -> None:
    result = move_file(handover_of(stored), tmp_path / "files", name="../../../x.bin")
    assert result.path == tmp_path / "files" / "x.bin"


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"sha256": hashlib.sha256(b"other").hexdigest()}, FileMismatch, "SHA-256 is"),
        ({"size": "6"}, FileMismatch, "has 5 bytes, not 6"),
    ],
)
def test_a_file_that_is_not_what_was_announced_stays_where_it_is(
    stored: Path, tmp_path: Path, changes: dict[str, str], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as raised:
        move_file(handover_of(stored, **changes), tmp_path / "files")
    assert raised.value.status == 422  # type: ignore[attr-defined]
    assert stored.read_bytes() == b"hello"
    assert list((tmp_path / "files").iterdir()) == []  # no name left reserved


def test_move_file_refuses_a_filename_that_is_not_the_tickets(tmp_path: Path) -> None:
    """A forged handover (the secret leaked, say) cannot have the app move any file."""
    victim = tmp_path / "important.db"
    victim.write_bytes(b"data")
    with pytest.raises(MalformedHandover, match="not the upload's file"):
        move_file(handover_of(victim), tmp_path / "files")
    assert victim.read_bytes() == b"data"


def test_move_file_does_not_follow_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "important.db"
    victim.write_bytes(b"hello")
    (tmp_path / TICKET).symlink_to(victim)
    with pytest.raises(OSError):
        move_file(handover_of(tmp_path / TICKET), tmp_path / "files")
    assert victim.read_bytes() == b"hello" and (tmp_path / TICKET).is_symlink()
    assert list((tmp_path / "files").iterdir()) == []


def test_a_second_handover_of_the_same_file_finds_it_gone(stored: Path, tmp_path: Path) -> None:
    """At least once: the app answers the repeat from the verdict it kept."""
    first = move_file(handover_of(stored), tmp_path / "files")
    with pytest.raises(FileNotFoundError):
        move_file(handover_of(stored), tmp_path / "files")
    assert [p.name for p in (tmp_path / "files").iterdir()] == [first.name]


def test_verify_false_trusts_the_servers_digest(stored: Path, tmp_path: Path) -> None:
    """Nothing read: a wrong digest goes unnoticed, which is what `verify=False` means."""
    other = hashlib.sha256(b"other").hexdigest()
    result = move_file(handover_of(stored, sha256=other), tmp_path / "files", verify=False)
    assert result.sha256 == other and result.path.read_bytes() == b"hello"
    # without a digest from the server (--checksum none) the file is read all the same
    stored.write_bytes(b"hello")
    again = move_file(handover_of(stored, sha256=None), tmp_path / "files", verify=False)
    assert again.sha256 == DIGEST


def test_move_file_copies_between_file_systems(tmp_path: Path) -> None:
    """StorageDir on a tmpfs (/dev/shm), the app's folder on the disk: no rename across
    them, so a copy, checked and synced, then the original removed."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    with tempfile.TemporaryDirectory(dir=shm) as storage:
        source = Path(storage) / TICKET
        data = os.urandom(3 << 20)
        source.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        with pytest.raises(FileMismatch):
            move_file(handover_of(source, size=str(len(data))), tmp_path / "files")
        assert source.read_bytes() == data and list((tmp_path / "files").iterdir()) == []
        result = move_file(
            handover_of(source, size=str(len(data)), sha256=digest), tmp_path / "files"
        )
        assert result.path.read_bytes() == data and result.sha256 == digest
        assert not source.exists()


def test_copy_leaves_the_original_for_the_server_to_delete(stored: Path, tmp_path: Path) -> None:
    """For an app that may read StorageDir but not write it (`remove_file_when_finished`
    true: the server deletes the original after `done`)."""
    with pytest.raises(FileMismatch):
        move_file(handover_of(stored, size="5", sha256="1" * 64), tmp_path / "files", copy=True)
    assert list((tmp_path / "files").iterdir()) == []
    result = move_file(handover_of(stored), tmp_path / "files", copy=True)
    assert result.path.read_bytes() == stored.read_bytes() == b"hello"
    assert result.sha256 == DIGEST
    assert result.path.stat().st_ino != stored.stat().st_ino  # a copy, not a link


def test_move_file_refuses_cancelled_uploads_and_objects(stored: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cancelled"):
        move_file(handover_of(stored, cancelled="yes"), tmp_path / "files")
    with pytest.raises(ValueError, match="object storage"):
        move_file(parse_handover(handover_form(filename="s3://b/" + TICKET)), tmp_path / "f")


# -- the clients, against the real server -------------------------------------------------


def url_of(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.mark.parametrize("base", ["", "/", "/incoming", "/incoming/"])
@pytest_twisted.ensureDeferred
async def test_blocking_client_new_and_cancel(server: Server, base: str) -> None:
    client = Client(url_of(server) + base)
    ticket = await threads.deferToThread(
        client.new_upload, "http://127.0.0.1:9/handover?x=1", remove_file_when_finished=False
    )
    upload = server.manager.get(ticket.id)
    assert upload is not None
    assert upload.signal_finish_url == "http://127.0.0.1:9/handover?x=1"
    assert upload.backend_secret == ticket.secret and len(ticket.secret) >= 32
    assert upload.remove_file_when_finished is False
    await threads.deferToThread(client.cancel_upload, ticket.id, ticket.secret)
    with pytest.raises(ApiError) as again:
        await threads.deferToThread(client.cancel_upload, ticket.id, ticket.secret)
    assert again.value.status == 412


@pytest_twisted.ensureDeferred
async def test_blocking_client_errors(server: Server) -> None:
    client = Client(url_of(server))
    ticket = await threads.deferToThread(
        client.new_upload, "http://127.0.0.1:9/h", backend_secret="mine"
    )
    assert ticket.secret == "mine"
    assert server.manager.get(ticket.id).remove_file_when_finished is True  # type: ignore[union-attr]
    with pytest.raises(ApiError) as wrong:
        await threads.deferToThread(client.cancel_upload, ticket.id, "not mine")
    assert (wrong.value.status, wrong.value.message) == (403, "wrong backendSecret")
    with pytest.raises(ApiError) as unknown:
        await threads.deferToThread(client.finish_upload, str(uuid.uuid4()), "x")
    assert unknown.value.status == 400
    with pytest.raises(ApiError) as refused:
        await threads.deferToThread(client.new_upload, "ftp://nowhere/")
    assert refused.value.status == 400 and "signalFinishURL" in refused.value.message
    with pytest.raises(InvalidVerdict):  # refused before it is sent
        await threads.deferToThread(
            client.finish_upload, ticket.id, "mine", "x" * (MAX_VERDICT_BYTES + 1)
        )


def test_no_server_is_unreachable() -> None:
    with pytest.raises(Unreachable):
        Client(f"http://127.0.0.1:{free_port()}", timeout=5).new_upload("http://127.0.0.1:9/")


class CutShort(Protocol):
    """A server whose answer breaks off: 200 announced with 100 bytes, 3 sent."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_an_answer_cut_short_is_unreachable_not_a_ticket() -> None:
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await endpoint.listen(Factory.forProtocol(CutShort))
    try:
        client = Client(f"http://127.0.0.1:{port.getHost().port}", timeout=10)
        with pytest.raises(Unreachable):
            await threads.deferToThread(client.new_upload, "http://127.0.0.1:9/")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_asyncio_client(server: Server) -> None:
    """In an asyncio event loop of its own (as a FastAPI or aiohttp app has)."""

    async def app() -> tuple[Ticket, int]:
        client = AsyncClient(url_of(server))
        ticket = await client.new_upload("http://127.0.0.1:9/h")
        await client.cancel_upload(ticket.id, ticket.secret)
        try:
            await client.finish_upload(ticket.id, ticket.secret)
        except ApiError as e:
            return ticket, e.status
        return ticket, 0

    ticket, status = await threads.deferToThread(asyncio.run, app())
    assert status == 412  # cancelled: nothing to finish
    assert server.manager.get(ticket.id) is not None


@pytest_twisted.ensureDeferred
async def test_asyncio_client_unreachable() -> None:
    client = AsyncClient(f"http://127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(Unreachable):
        await threads.deferToThread(asyncio.run, client.new_upload("http://127.0.0.1:9/"))


@pytest_twisted.ensureDeferred
async def test_twisted_client_errors(server: Server) -> None:
    client = TwistedClient(url_of(server))
    ticket = await client.new_upload("http://127.0.0.1:9/h")
    with pytest.raises(ApiError) as wrong:
        await client.cancel_upload(ticket.id, ticket.secret + "x")
    assert wrong.value.status == 403
    await client.cancel_upload(ticket.id, ticket.secret)
    with pytest.raises(Unreachable):
        await TwistedClient(f"http://127.0.0.1:{free_port()}").new_upload("http://x.example/")


class KitBackend:
    """A Klein backend written with the kit alone: a ticket per file, the handover read
    and checked, the file moved into `files`, the verdict kept and answered (`done`, or
    `wait` and then `finish_upload` with the verdict)."""

    app = Klein()

    def __init__(self, incoming: TwistedClient, files: Path, mode: str) -> None:
        self.incoming = incoming
        self.files = files
        self.mode = mode
        self.secrets: dict[str, str] = {}
        self.verdicts: dict[str, str] = {}
        self.port = 0
        self.finished: Deferred[None] = Deferred()

    async def ticket(self) -> str:
        ticket = await self.incoming.new_upload(
            f"http://127.0.0.1:{self.port}/handover", remove_file_when_finished=False
        )
        self.secrets[ticket.id] = ticket.secret
        return ticket.id

    @app.route("/handover", methods=["POST"])
    async def handover(self, request: Any) -> bytes:
        try:
            handover = read_handover(request.args, self.secrets.get)
        except HandoverRefused as e:
            request.setResponseCode(e.status)
            return str(e).encode()
        if handover.cancelled:
            return b"ok"
        if handover.id not in self.verdicts:
            stored = await threads.deferToThread(move_file, handover, self.files)
            self.verdicts[handover.id] = json.dumps({"name": stored.name, "sha256": stored.sha256})
        if self.mode == "wait":
            ensureDeferred(self.finish(handover.id))
            return answer_wait()
        return answer_done(self.verdicts[handover.id])

    async def finish(self, ticket: str) -> None:
        await self.incoming.finish_upload(ticket, self.secrets[ticket], self.verdicts[ticket])
        self.finished.callback(None)


@pytest.mark.parametrize("mode", ["done", "wait"])
@pytest_twisted.ensureDeferred
async def test_a_backend_built_with_the_kit_takes_a_real_upload(
    server: Server, tmp_path: Path, mode: str
) -> None:
    kit = KitBackend(TwistedClient(url_of(server)), tmp_path / "files", mode)
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await endpoint.listen(Site(kit.app.resource()))
    kit.port = port.getHost().port
    try:
        data = os.urandom(50_000)
        ticket = await kit.ticket()
        client, _ = await upload_request(server, ticket, len(data), name="../report 1.pdf")
        client.send("MsgAck", Ack=True)
        await send_all(client, data, CHUNK_KB * 1024, SEND_AHEAD)
        done = await client.expect("MsgAllDone")
        if mode == "wait":
            await kit.finished
        digest = hashlib.sha256(data).hexdigest()
        assert json.loads(done["Result"]) == {"name": "report 1.pdf", "sha256": digest}
        assert (tmp_path / "files" / "report 1.pdf").read_bytes() == data
        assert not (server.storage_dir / ticket).exists()
    finally:
        await port.stopListening()


def test_the_module_imports_no_twisted() -> None:
    """A Flask or Django app that imports the kit does not load Twisted (nor treq)."""
    code = (
        "import sys, incoming.backend; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'treq')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.stdout.strip() == "[]"
    assert backend.__all__  # and everything it offers is named
