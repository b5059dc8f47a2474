"""tus 1.0.0 as the protocol words it (tus.io/protocols/resumable-upload), and requests
that no route serves: over loopback, against the real site and the real daemon."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq

from incoming.config import Config
from incoming.upload import Upload

from .harness import Backend, Server, serving, start_daemon
from .test_tus import OFFSET_STREAM, TUS, create, created, head, header, metadata, patch

ORIGIN = "https://app.example"


def files_of(server: Server, ticket: str) -> bytes:
    """The bytes stored for the ticket's upload so far (none: b"")."""
    return server.files().get(f"{ticket}.part", server.files().get(ticket, b""))


# Routing: a path nobody serves touches nothing


@pytest.mark.parametrize("path", ["/incoming/x/tus/", "/x/tus/", "/incoming/0.1/x/tus/"])
@pytest_twisted.ensureDeferred
async def test_a_patch_to_a_path_nobody_serves_writes_and_holds_nothing(
    server: Server, backend: Backend, path: str
) -> None:
    ticket = await created(server, backend, 10, removeFileWhenFinished="false")
    stray = await treq.request(
        "PATCH",
        f"http://127.0.0.1:{server.port}{path}{ticket}",
        data=b"stray",
        headers={**TUS, "Content-Type": OFFSET_STREAM, "Upload-Offset": "0"},
    )
    assert stray.code == 404
    await server.settled()
    assert header(await head(server, ticket), "Upload-Offset") == "0"
    assert files_of(server, ticket) == b""
    upload = server.manager.get(ticket)
    assert upload is not None and upload.transport is None  # nothing holds it
    real = await patch(server, ticket, 0, b"0123456789")
    assert (real.code, header(real, "Upload-Offset")) == (204, "10")
    assert backend.posts.pending[0]["size"] == "10"
    assert server.files() == {ticket: b"0123456789"}


@pytest.mark.parametrize("path", ["/incoming/whatever/tus/", "/whatever/tus/"])
@pytest_twisted.ensureDeferred
async def test_a_creation_on_a_path_nobody_serves_creates_nothing(
    server: Server, backend: Backend, path: str
) -> None:
    empty = await server.new_upload(backend.url)
    with_body = await server.new_upload(backend.url)
    url = f"http://127.0.0.1:{server.port}{path}"
    zero = await treq.post(
        url, headers={**TUS, "Upload-Length": "0", "Upload-Metadata": metadata(ticket=empty)}
    )
    assert zero.code == 404
    carrying = await treq.post(
        url,
        data=b"abc",
        headers={**TUS, "Upload-Length": "3", "Content-Type": OFFSET_STREAM,
                 "Upload-Metadata": metadata(ticket=with_body)},
    )  # fmt: skip
    assert carrying.code == 404
    await server.settled()
    assert backend.posts.pending == []  # nothing handed over
    for ticket in (empty, with_body):
        assert (await head(server, ticket)).code == 404  # never created
        assert files_of(server, ticket) == b""
        assert (await create(server, ticket, 7)).code == 201  # no length was declared


@pytest.mark.parametrize("prefix", ["/incoming", "/incoming/0.1"])
@pytest_twisted.ensureDeferred
async def test_the_endpoint_is_served_without_its_trailing_slash(
    server: Server, backend: Backend, prefix: str
) -> None:
    url = f"http://127.0.0.1:{server.port}{prefix}/tus"
    preflight = await treq.request(
        "OPTIONS", url, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.code in (200, 204)  # a redirect fails a browser's preflight
    assert header(preflight, "Access-Control-Allow-Origin") == "*"
    assert header(preflight, "Tus-Version") == "1.0.0"
    ticket = await server.new_upload(backend.url)
    response = await treq.post(
        url,
        headers={**TUS, "Upload-Length": "5", "Upload-Metadata": metadata(ticket=ticket),
                 "Origin": ORIGIN},
    )  # fmt: skip
    assert response.code == 201
    assert header(response, "Location") == f"{prefix}/tus/{ticket}"
    assert header(response, "Access-Control-Allow-Origin") == "*"
    carried = await server.new_upload(backend.url, removeFileWhenFinished="false")
    with_upload = await treq.post(
        url,
        data=b"abc",
        headers={**TUS, "Upload-Length": "3", "Content-Type": OFFSET_STREAM,
                 "Upload-Metadata": metadata(ticket=carried)},
    )  # fmt: skip
    assert (with_upload.code, header(with_upload, "Upload-Offset")) == (201, "3")
    assert header(with_upload, "Location") == f"{prefix}/tus/{carried}"
    assert server.files()[carried] == b"abc"


@pytest_twisted.ensureDeferred
async def test_unserved_methods_and_paths_answer_as_tus(server: Server, backend: Backend) -> None:
    """Every answer but OPTIONS carries Tus-Resumable, and CORS headers a page can read."""
    ticket = await created(server, backend, 5)
    for method, path, status in [
        ("GET", f"/tus/{ticket}", 405),
        ("PATCH", "/tus/", 405),
        ("HEAD", f"/tus/{ticket}/more", 404),
    ]:
        response = await treq.request(
            method, f"{server.base}{path}", headers={**TUS, "Origin": ORIGIN}
        )
        assert response.code == status, (method, path)
        assert header(response, "Tus-Resumable") == "1.0.0", (method, path)
        assert header(response, "Access-Control-Allow-Origin") == "*", (method, path)
        if status == 405:
            assert "OPTIONS" in (header(response, "Allow") or ""), (method, path)


# CORS: a disallowed Origin is refused, never echoed


@pytest_twisted.ensureDeferred
async def test_a_disallowed_origin_is_never_echoed(config: Config, backend: Backend) -> None:
    allowed = dataclasses.replace(config, allowed_origins=frozenset({ORIGIN}))
    evil = {"Origin": "https://evil.example"}
    async with serving(allowed) as server:
        ticket = await created(server, backend, 3)
        preflight = await treq.request(
            "OPTIONS", f"{server.base}/tus/{ticket}",
            headers={**evil, "Access-Control-Request-Method": "PATCH"},
        )  # fmt: skip
        refused = [
            preflight,
            await create(server, ticket, 3, **evil),
            await patch(server, ticket, 0, b"abc", **evil),
            await treq.head(f"{server.base}/tus/{ticket}", headers={**TUS, **evil}),
            await treq.delete(f"{server.base}/tus/{ticket}", headers={**TUS, **evil}),
        ]
        assert [r.code for r in refused[1:]] == [403, 403, 403, 403]
        for response in refused:
            assert header(response, "Access-Control-Allow-Origin") is None
            assert header(response, "Access-Control-Allow-Methods") is None
        assert files_of(server, ticket) == b""
        welcome = await treq.request(
            "OPTIONS", f"{server.base}/tus/{ticket}",
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "PATCH"},
        )  # fmt: skip
        assert header(welcome, "Access-Control-Allow-Origin") == ORIGIN
        assert header(welcome, "Vary") == "Origin"


# Numbers: 1*DIGIT and nothing else

NOT_DIGITS = ["+5", "1_0", "-0", "5\x0c", "\u0665", "0x5", "5.0", "", "9" * 5000]


@pytest_twisted.ensureDeferred
async def test_upload_length_must_be_plain_digits(server: Server, backend: Backend) -> None:
    ticket = await server.new_upload(backend.url)
    for bad in [*NOT_DIGITS, ["5", "5"]]:
        response = await treq.post(
            f"{server.base}/tus/",
            headers={**TUS, "Upload-Length": bad, "Upload-Metadata": metadata(ticket=ticket)},
        )
        assert response.code == 400, repr(bad)
    assert backend.posts.pending == []  # `-0` made no zero-byte upload
    assert (await head(server, ticket)).code == 404
    assert (await create(server, ticket, 5)).code == 201


@pytest_twisted.ensureDeferred
async def test_upload_offset_must_be_plain_digits(server: Server, backend: Backend) -> None:
    ticket = await created(server, backend, 10)
    for bad in [*NOT_DIGITS, ["0", "0"]]:
        response = await treq.request(
            "PATCH", f"{server.base}/tus/{ticket}", data=b"ab",
            headers={**TUS, "Content-Type": OFFSET_STREAM, "Upload-Offset": bad},
        )  # fmt: skip
        assert response.code == 400, repr(bad)
    # HEAD's answer has no body: no other request may turn into one, nor a HEAD into another
    probe = await treq.get(
        f"{server.base}/tus/{ticket}", headers={**TUS, "X-HTTP-Method-Override": "HEAD"}
    )
    assert (probe.code, await probe.text()) == (
        400, "X-HTTP-Method-Override must name one method (HEAD only for a HEAD)"
    )  # fmt: skip
    await server.settled()
    assert files_of(server, ticket) == b""
    assert (await patch(server, ticket, 0, b"ab")).code == 204


# Upload-Metadata


@pytest_twisted.ensureDeferred
async def test_head_gives_upload_metadata_as_created_also_after_a_crash(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    ticket = await server.new_upload(backend.url)
    raw = base64.b64encode(b"\xff\x00binary").decode()
    given = f"{metadata(ticket=ticket)},filetype aW1hZ2UvanBlZw==,empty,raw {raw}"
    response = await treq.post(
        f"{server.base}/tus/", headers={**TUS, "Upload-Length": "5", "Upload-Metadata": given}
    )
    assert response.code == 201, await response.text()
    assert header(await head(server, ticket), "Upload-Metadata") == given
    await daemon.kill(process)
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    probe = await head(server, ticket)
    assert (probe.code, header(probe, "Upload-Metadata")) == (200, given)
    assert "Upload-Metadata" in (
        header(
            await treq.head(f"{server.base}/tus/{ticket}", headers={**TUS, "Origin": ORIGIN}),
            "Access-Control-Expose-Headers",
        )
        or ""
    )
    again = await treq.post(  # a reloaded page creates again: the first metadata stay
        f"{server.base}/tus/",
        headers={**TUS, "Upload-Length": "5", "Upload-Metadata": metadata(ticket=ticket)},
    )
    assert again.code == 201
    assert header(await head(server, ticket), "Upload-Metadata") == given
    await daemon.kill(process)


@pytest_twisted.ensureDeferred
async def test_upload_metadata_keys_must_be_unique(server: Server, backend: Backend) -> None:
    ticket = await server.new_upload(backend.url)
    other = await server.new_upload(backend.url)
    twice = f"{metadata(ticket=ticket)},{metadata(ticket=other)}"
    response = await treq.post(
        f"{server.base}/tus/", headers={**TUS, "Upload-Length": "5", "Upload-Metadata": twice}
    )
    assert response.code == 400
    assert (await head(server, ticket)).code == 404
    assert (await head(server, other)).code == 404


def test_a_record_saved_before_upload_metadata_still_loads() -> None:
    upload = Upload("7e6a8b8e-0a0a-4a0a-8a0a-0a0a0a0a0a0a", "http://b/h", "", True, length=5)
    record = upload.to_record()
    del record["tus_metadata"]
    restored = Upload.from_record(record, 2)
    assert (restored.length, restored.stored, restored.tus_metadata) == (5, 2, "")


# X-HTTP-Method-Override


@pytest_twisted.ensureDeferred
async def test_method_override_is_honoured_whatever_the_method(
    server: Server, backend: Backend
) -> None:
    ticket = await created(server, backend, 4, removeFileWhenFinished="false", backendSecret="k")
    put = await treq.request(
        "PUT", f"{server.base}/tus/{ticket}", data=b"ab",
        headers={**TUS, "X-HTTP-Method-Override": "PATCH", "Content-Type": OFFSET_STREAM,
                 "Upload-Offset": "0"},
    )  # fmt: skip
    assert (put.code, header(put, "Upload-Offset")) == (204, "2")
    assert header(await head(server, ticket), "Upload-Offset") == "2"
    deleted = await treq.get(
        f"{server.base}/tus/{ticket}", headers={**TUS, "X-HTTP-Method-Override": "DELETE"}
    )
    assert deleted.code == 204
    notice = await backend.posts.get()
    assert (notice["id"], notice["cancelled"]) == (ticket, "yes")


@pytest_twisted.ensureDeferred
async def test_a_method_override_that_is_no_method_is_refused(
    server: Server, backend: Backend
) -> None:
    ticket = await created(server, backend, 4)
    for bad in ["PATCH DELETE", "P\u00c4TCH", "PATCH,DELETE", ["PATCH", "DELETE"]]:
        response = await treq.request(
            "PATCH", f"{server.base}/tus/{ticket}", data=b"ab",
            headers={**TUS, "X-HTTP-Method-Override": bad, "Content-Type": OFFSET_STREAM,
                     "Upload-Offset": "0"},
        )  # fmt: skip
        assert response.code == 400, repr(bad)
    # HEAD's answer has no body: no other request may turn into one, nor a HEAD into another
    probe = await treq.get(
        f"{server.base}/tus/{ticket}", headers={**TUS, "X-HTTP-Method-Override": "HEAD"}
    )
    assert (probe.code, await probe.text()) == (
        400, "X-HTTP-Method-Override must name one method (HEAD only for a HEAD)"
    )  # fmt: skip
    await server.settled()
    assert files_of(server, ticket) == b""
