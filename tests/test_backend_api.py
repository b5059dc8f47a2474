"""The backend HTTP API over loopback (SPEC: Backend HTTP API)."""

from __future__ import annotations

import socket
import uuid
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import threads

from incoming.errors import ErrorCode
from incoming.upload import Phase

from .harness import Backend, Server, connect, send_all, upload_request, upload_small

PREFIXES = ["/incoming", "/incoming/0.1"]


async def post(
    server: Server, path: str, prefix: str = "/incoming", **kw: Any
) -> tuple[int, str, Any]:
    url = f"http://127.0.0.1:{server.port}{prefix}/backend/{path}"
    response = await treq.post(url, **kw)
    return response.code, await response.text(), response.headers


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest_twisted.ensureDeferred
async def test_new_upload_returns_a_uuid4_as_plain_text(server: Server, prefix: str) -> None:
    code, body, headers = await post(
        server, "new_upload", prefix, data={"signalFinishURL": "http://localhost/x"}
    )
    assert code == 200
    assert uuid.UUID(body).version == 4 and str(uuid.UUID(body)) == body
    assert headers.getRawHeaders("content-type")[0].startswith("text/plain")
    upload = server.manager.get(body)
    assert upload is not None
    assert (upload.signal_finish_url, upload.backend_secret) == ("http://localhost/x", "")
    assert upload.remove_file_when_finished is True


@pytest_twisted.ensureDeferred
async def test_parameters_from_query_string_and_body_wins(server: Server) -> None:
    code, ticket, _ = await post(
        server,
        "new_upload",
        params={
            "signalFinishURL": "http://127.0.0.1:9/a?x=1",
            "backendSecret": "fromquery",
            "removeFileWhenFinished": "false",
        },
        data={"backendSecret": "frombody"},
    )
    assert code == 200
    upload = server.manager.get(ticket)
    assert upload is not None
    assert upload.signal_finish_url == "http://127.0.0.1:9/a?x=1"
    assert upload.backend_secret == "frombody"
    assert upload.remove_file_when_finished is False


@pytest.mark.parametrize(
    "params, message",
    [
        ({}, "signalFinishURL is required"),
        ({"signalFinishURL": "/relative/path"}, "absolute http or https"),
        ({"signalFinishURL": "http:///nohost"}, "no host"),
        ({"signalFinishURL": "ftp://example.com/x"}, "absolute http or https"),
        ({"signalFinishURL": "javascript:alert(1)"}, "absolute http or https"),
        ({"signalFinishURL": "http://example.com:99999/"}, "not a valid URL"),
        ({"signalFinishURL": "http://example.com/a b"}, "whitespace"),
        ({"signalFinishURL": "http://e.com/", "destType": "ceph"}, "destType"),
        ({"signalFinishURL": "http://e.com/", "removeFileWhenFinished": "yes"}, "boolean"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_new_upload_refuses_bad_parameters(
    server: Server, params: dict[str, str], message: str
) -> None:
    code, body, _ = await post(server, "new_upload", data=params)
    assert code == 400
    assert message in body
    assert len(server.manager) == 0


@pytest.mark.parametrize(
    "value, expected",
    [(v, True) for v in ("1", "t", "T", "TRUE", "true", "True")]
    + [(v, False) for v in ("0", "f", "F", "FALSE", "false", "False")],
)
@pytest_twisted.ensureDeferred
async def test_remove_file_when_finished_takes_go_booleans(
    server: Server, value: str, expected: bool
) -> None:
    code, ticket, _ = await post(
        server,
        "new_upload",
        data={
            "signalFinishURL": "https://localhost/",
            "removeFileWhenFinished": value,
            "destType": "file",
        },
    )
    assert code == 200
    upload = server.manager.get(ticket)
    assert upload is not None and upload.remove_file_when_finished is expected


@pytest.mark.parametrize("path", ["cancel_upload", "finish_upload"])
@pytest_twisted.ensureDeferred
async def test_id_and_secret_are_checked(server: Server, backend: Backend, path: str) -> None:
    ticket = await server.new_upload(backend.url, backendSecret="right")
    assert (await post(server, path, data={"backendSecret": "right"}))[:2] == (
        400,
        "id is required",
    )
    code, body, _ = await post(
        server, path, data={"id": str(uuid.uuid4()), "backendSecret": "right"}
    )
    assert (code, body) == (400, "unknown upload id")
    code, body, _ = await post(server, path, data={"id": ticket, "backendSecret": "wrong"})
    assert (code, body) == (403, "wrong backendSecret")
    code, body, _ = await post(server, path, data={"id": ticket})
    assert code == 403
    upload = server.manager.get(ticket)
    assert upload is not None and upload.phase is Phase.RECEIVING


@pytest_twisted.ensureDeferred
async def test_cancel_upload_deletes_partial_file_and_tells_frontend(
    server: Server, backend: Backend
) -> None:
    ticket = await server.new_upload(backend.url, backendSecret="k")
    client, _ = await upload_request(server, ticket, 10_000)
    client.send("MsgAck", Ack=True)
    await send_all(client, b"x" * 4096, 4096, 3)
    assert (server.storage_dir / f"{ticket}.part").stat().st_size == 4096
    code, body, _ = await post(server, "cancel_upload", data={"id": ticket, "backendSecret": "k"})
    assert (code, body) == (200, "ok")
    assert await client.expect("MsgCancel") == {"Reason": "cancelled by the backend"}
    assert await client.next() is None
    assert server.files() == {}
    # a finished or cancelled ticket stays known: 412, and the browser is refused
    code, _, _ = await post(server, "cancel_upload", data={"id": ticket, "backendSecret": "k"})
    assert code == 412
    again = await connect(server.ws_url())
    again.send("MsgUploadReq", Id=ticket, LengthBytes=10_000, Name="f")
    await again.expect_error(ErrorCode.TICKET_CANCELLED)
    assert backend.posts.pending == []  # the backend's own cancel is not echoed to it


@pytest_twisted.ensureDeferred
async def test_finish_upload_is_412_unless_waiting(server: Server, backend: Backend) -> None:
    ticket = await server.new_upload(backend.url)
    code, body, _ = await post(server, "finish_upload", data={"id": ticket})
    assert code == 412
    assert "not waiting" in body


@pytest.mark.parametrize("remove", ["true", "false"])
@pytest_twisted.ensureDeferred
async def test_wait_then_finish_upload(server: Server, backend: Backend, remove: str) -> None:
    backend.answer = b"wait"
    ticket, client = await upload_small(
        server, backend.url, b"hello", backendSecret="k", removeFileWhenFinished=remove
    )
    post_fields = await backend.posts.get()
    assert post_fields["cancelled"] == "no"
    await server.settled()
    upload = server.manager.get(ticket)
    assert upload is not None and upload.phase is Phase.AWAITING_FINISH
    # cancelling is too late now
    code, _, _ = await post(server, "cancel_upload", data={"id": ticket, "backendSecret": "k"})
    assert code == 412
    code, body, _ = await post(server, "finish_upload", data={"id": ticket, "backendSecret": "k"})
    assert (code, body) == (200, "ok")
    assert await client.expect("MsgAllDone") == {"Success": True, "Result": ""}
    assert server.files() == ({} if remove == "true" else {ticket: b"hello"})
    code, _, _ = await post(server, "finish_upload", data={"id": ticket, "backendSecret": "k"})
    assert code == 412


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_refused_with_413(server: Server) -> None:
    code, body, _ = await post(
        server, "new_upload", data={"signalFinishURL": "http://e.com/", "pad": "x" * 100_000}
    )
    assert (code, body) == (413, "request body too large")
    assert len(server.manager) == 0


@pytest_twisted.ensureDeferred
async def test_oversized_chunked_body_is_refused_with_413(server: Server) -> None:
    """Without a Content-Length the cap applies as the body streams in."""

    def send() -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(
                b"POST /incoming/backend/new_upload HTTP/1.1\r\nHost: x\r\n"
                b"Transfer-Encoding: chunked\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
            )
            s.sendall((b"%x\r\n" % 70_000) + b"a" * 70_000 + b"\r\n")
            return s.recv(4096)

    answer = await threads.deferToThread(send)
    assert answer.startswith(b"HTTP/1.1 413")
    assert len(server.manager) == 0


@pytest_twisted.ensureDeferred
async def test_backend_routes_take_only_post(server: Server) -> None:
    response = await treq.get(f"{server.base}/backend/new_upload")
    assert response.code == 405


@pytest.mark.parametrize("answer", [b"wait", b"done"])
@pytest_twisted.ensureDeferred
async def test_finish_upload_racing_the_handovers_answer_is_accepted(
    server: Server, backend: Backend, answer: bytes
) -> None:
    """A backend whose worker calls finish_upload before the handover POST is answered."""
    finished: list[tuple[int, str]] = []

    async def worker(fields: dict[str, str]) -> None:
        code, body, _ = await post(
            server, "finish_upload", data={"id": fields["id"], "backendSecret": "k"}
        )
        finished.append((code, body))

    backend.before_answer = worker
    backend.answer = answer
    ticket, client = await upload_small(
        server, backend.url, b"hello", backendSecret="k", removeFileWhenFinished="false"
    )
    assert await client.expect("MsgAllDone") == {"Success": True, "Result": ""}
    assert finished == [(200, "ok")]
    await server.settled()
    upload = server.manager.get(ticket)
    assert upload is not None and upload.phase is Phase.FINISHED
    assert server.files() == {ticket: b"hello"}
