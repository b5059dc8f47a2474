"""The WebSocket upload protocol over real loopback sockets (SPEC: WebSocket upload protocol)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import pytest
import pytest_twisted
import treq

from incoming.config import Config
from incoming.errors import ErrorCode

from .conftest import CHUNK_KB, SEND_AHEAD
from .harness import (
    Backend,
    Server,
    acked_upload,
    complete_upload,
    connect,
    send_all,
    serving,
    upload_request,
)

CHUNK = CHUNK_KB * 1024


@pytest.mark.parametrize("size", [0, 1, CHUNK, 3 * CHUNK + 7])
@pytest.mark.parametrize("prefix", ["/incoming", "/incoming/0.1"])
@pytest_twisted.ensureDeferred
async def test_upload_is_stored_and_handed_over(
    server: Server, backend: Backend, size: int, prefix: str
) -> None:
    data = os.urandom(size)
    backend.answer = b"done"
    ticket = await server.new_upload(
        backend.url, removeFileWhenFinished="false", backendSecret="s3cret"
    )
    client, conf = await upload_request(
        server, ticket, size, name="../../etc/passwd", prefix=prefix
    )
    assert conf.keys() == {"ChunkSizeKB", "FilePos", "SendAhead"}
    assert (conf["ChunkSizeKB"], conf["FilePos"]) == (CHUNK_KB, 0)
    assert conf["SendAhead"] >= SEND_AHEAD  # grown with the round trip (test_window.py)
    client.send("MsgAck", Ack=True)
    await send_all(client, data, CHUNK, conf["SendAhead"])
    post = await backend.posts.get()
    path = server.storage_dir / ticket
    assert post["id"] == ticket
    assert post["filename"] == str(path)
    assert post["filenameFromBrowser"] == "../../etc/passwd"
    assert post["backendSecret"] == "s3cret"
    assert post["cancelled"] == "no"
    assert post["cancelReason"] == ""
    assert post["size"] == str(size)
    assert await client.expect("MsgAllDone") == {"Success": True, "Result": ""}
    assert await client.next() is None
    assert server.files() == {ticket: data}
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()


@pytest.mark.parametrize(
    "first_message, code",
    [
        ('{"MsgType": "MsgUploadReq", "MsgData": {"Id": "%s"}}', ErrorCode.BAD_LENGTH),
        (
            '{"MsgType": "MsgUploadReq", "MsgData": {"Id": "%s", "LengthBytes": "12"}}',
            ErrorCode.BAD_LENGTH,
        ),
        (
            '{"MsgType": "MsgUploadReq", "MsgData": {"Id": "%s", "LengthBytes": -1}}',
            ErrorCode.BAD_LENGTH,
        ),
        (
            '{"MsgType": "MsgUploadReq", "MsgData": {"Id": "%s", "LengthBytes": 1.5}}',
            ErrorCode.BAD_LENGTH,
        ),
        (
            '{"MsgType": "MsgUploadReq", "MsgData": {"Id": "%s", "LengthBytes": true}}',
            ErrorCode.BAD_LENGTH,
        ),
        (
            '{"MsgType": "MsgUploadReq", "MsgData": {"LengthBytes": 5, "x": "%s"}}',
            ErrorCode.BAD_TICKET_ID,
        ),
        (
            '{"MsgType": "MsgUploadReq", "MsgData": {"Id": 7, "LengthBytes": 5, "x": "%s"}}',
            ErrorCode.BAD_TICKET_ID,
        ),
        ('{"MsgType": "MsgUploadReq", "MsgData": ["%s"]}', ErrorCode.MALFORMED_MESSAGE),
        (
            '{"MsgType": "MsgUploadReq", "MsgData": {"Id": "%s", "LengthBytes": 5, "Name": 3}}',
            ErrorCode.MALFORMED_MESSAGE,
        ),
        (
            '{"MsgType": "MsgAck", "MsgData": {"Ack": true, "x": "%s"}}',
            ErrorCode.UNEXPECTED_MESSAGE,
        ),
        ('{"MsgType": "MsgBogus", "MsgData": {"x": "%s"}}', ErrorCode.UNKNOWN_MESSAGE_TYPE),
        ('{"MsgType": "MsgUploadReq", "MsgData": {"Id": "%s", ', ErrorCode.MALFORMED_MESSAGE),
        ('["MsgUploadReq", "%s"]', ErrorCode.MALFORMED_MESSAGE),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_upload_requests_get_their_error(
    server: Server, backend: Backend, first_message: str, code: int
) -> None:
    ticket = await server.new_upload(backend.url)
    client = await connect(server.ws_url())
    client.send_raw(first_message % ticket)
    data = await client.expect_error(code)
    assert data["Msg"]
    upload = server.manager.get(ticket)
    assert upload is not None and upload.length is None and upload.transport is None


@pytest_twisted.ensureDeferred
async def test_unknown_ticket(server: Server) -> None:
    client = await connect(server.ws_url())
    client.send("MsgUploadReq", Id="../../etc/passwd", LengthBytes=5, Name="x")
    await client.expect_error(ErrorCode.UNKNOWN_TICKET)
    assert not server.storage_dir.exists() or server.files() == {}


@pytest_twisted.ensureDeferred
async def test_finished_ticket_is_refused(server: Server, backend: Backend) -> None:
    ticket, client, _ = await acked_upload(server, backend.url, 2)
    client.send_chunk(b"ab")
    await client.expect("MsgChunkAck")
    await client.expect("MsgAllDone")
    again = await connect(server.ws_url())
    again.send("MsgUploadReq", Id=ticket, LengthBytes=2, Name="x")
    await again.expect_error(ErrorCode.TICKET_FINISHED)


@pytest_twisted.ensureDeferred
async def test_second_live_connection_is_refused_until_first_is_gone(
    server: Server, backend: Backend
) -> None:
    data = os.urandom(3 * CHUNK)
    ticket, first, _ = await acked_upload(server, backend.url, len(data))
    first.send_chunk(data[:CHUNK])
    await first.expect("MsgChunkAck")
    second = await connect(server.ws_url())
    second.send("MsgUploadReq", Id=ticket, LengthBytes=len(data), Name="x")
    await second.expect_error(ErrorCode.ALREADY_CONNECTED)
    first.close()
    await first.closed
    await server.settled()
    third, conf = await upload_request(server, ticket, len(data))
    assert conf["FilePos"] == CHUNK
    await complete_upload(third, data[CHUNK:], CHUNK, SEND_AHEAD)
    assert server.files() == {}  # removeFileWhenFinished defaults to true
    post = await backend.posts.get()
    assert post["size"] == str(len(data))


@pytest_twisted.ensureDeferred
async def test_resume_with_other_length_is_refused_and_upload_stays_resumable(
    server: Server, backend: Backend
) -> None:
    data = os.urandom(2 * CHUNK)
    ticket, client, _ = await acked_upload(
        server, backend.url, len(data), removeFileWhenFinished="false"
    )
    client.send_chunk(data[:CHUNK])
    await client.expect("MsgChunkAck")
    client.close()
    await client.closed
    liar = await connect(server.ws_url())
    liar.send("MsgUploadReq", Id=ticket, LengthBytes=len(data) + 1, Name="x")
    await liar.expect_error(ErrorCode.LENGTH_MISMATCH)
    resumed, conf = await upload_request(server, ticket, len(data))
    assert conf["FilePos"] == CHUNK
    await complete_upload(resumed, data[CHUNK:], CHUNK, SEND_AHEAD)
    assert server.files() == {ticket: data}


@pytest_twisted.ensureDeferred
async def test_pause_then_resume_continues_at_file_pos(server: Server, backend: Backend) -> None:
    data = os.urandom(5 * CHUNK + 3)
    ticket, client, _ = await acked_upload(
        server, backend.url, len(data), removeFileWhenFinished="false"
    )
    await send_all(client, data[: 2 * CHUNK], CHUNK, SEND_AHEAD)
    client.send("MsgPause", Pause=True)
    client.close()
    await client.closed
    resumed, conf = await upload_request(server, ticket, len(data))
    assert conf["FilePos"] == 2 * CHUNK
    await complete_upload(resumed, data[2 * CHUNK :], CHUNK, SEND_AHEAD)
    assert server.files() == {ticket: data}


@pytest_twisted.ensureDeferred
async def test_abrupt_disconnect_resumes_from_bytes_on_disk(
    server: Server, backend: Backend
) -> None:
    data = os.urandom(6 * CHUNK)
    ticket, client, _ = await acked_upload(
        server, backend.url, len(data), removeFileWhenFinished="false"
    )
    for i in range(SEND_AHEAD):  # chunks in flight, then the line drops
        client.send_chunk(data[i * CHUNK : (i + 1) * CHUNK])
    client.close()
    await client.closed
    resumed, conf = await upload_request(server, ticket, len(data))
    position = conf["FilePos"]
    part = (server.storage_dir / f"{ticket}.part").read_bytes()
    assert position == len(part) and part == data[:position]
    await complete_upload(resumed, data[position:], CHUNK, SEND_AHEAD)
    assert server.files() == {ticket: data}


@pytest_twisted.ensureDeferred
async def test_chunk_past_length_cancels_upload(server: Server, backend: Backend) -> None:
    ticket, client, _ = await acked_upload(server, backend.url, 10, backendSecret="k")
    client.send_chunk(b"12345")
    await client.expect("MsgChunkAck")
    client.send_chunk(b"678901")
    await client.expect_error(ErrorCode.PAST_END)
    notice = await backend.posts.get()
    assert notice["cancelled"] == "yes" and notice["id"] == ticket
    assert notice["backendSecret"] == "k" and notice["filename"] == ""
    assert "past LengthBytes" in notice["cancelReason"]
    assert server.files() == {}


@pytest_twisted.ensureDeferred
async def test_chunk_before_ack_and_too_many_chunks_ahead(config: Config, backend: Backend) -> None:
    async with serving(replace(config, max_window=0)) as server:  # a window of SEND_AHEAD
        ticket = await server.new_upload(backend.url)
        client, _ = await upload_request(server, ticket, 100 * CHUNK)
        client.send_chunk(b"early")
        await client.expect_error(ErrorCode.UNEXPECTED_MESSAGE)
        client, conf = await upload_request(server, ticket, 100 * CHUNK)
        assert conf["SendAhead"] == SEND_AHEAD
        client.send("MsgAck", Ack=True)
        for _ in range(SEND_AHEAD + 1):
            client.send_chunk(b"z" * CHUNK)
        messages = []
        while (msg := await client.next()) is not None:
            messages.append(msg)
        assert messages[-1]["MsgType"] == "MsgError"
        assert messages[-1]["MsgData"]["ErrorCode"] == ErrorCode.SEND_AHEAD_EXCEEDED
        await server.manager.storage.drain(ticket)
        upload = server.manager.get(ticket)
        assert upload is not None and not upload.phase.final  # still resumable
        assert upload.stored == SEND_AHEAD * CHUNK


@pytest_twisted.ensureDeferred
async def test_frontend_cancel(server: Server, backend: Backend) -> None:
    ticket, client, _ = await acked_upload(server, backend.url, 3 * CHUNK)
    client.send_chunk(b"a" * CHUNK)
    await client.expect("MsgChunkAck")
    client.send("MsgCancel", Reason="user changed their mind")
    assert await client.expect("MsgCancelAck") == {"Ack": True}
    assert await client.next() is None
    notice = await backend.posts.get()  # told once the file is gone
    assert server.files() == {}
    assert (notice["cancelled"], notice["cancelReason"]) == ("yes", "user changed their mind")
    again = await connect(server.ws_url())
    again.send("MsgUploadReq", Id=ticket, LengthBytes=3 * CHUNK, Name="x")
    await again.expect_error(ErrorCode.TICKET_CANCELLED)


@pytest_twisted.ensureDeferred
async def test_connection_during_handover_gets_final_result(
    server: Server, backend: Backend
) -> None:
    backend.answer = b"wait"
    ticket, client, _ = await acked_upload(server, backend.url, 4, backendSecret="k")
    client.send_chunk(b"data")
    await client.expect("MsgChunkAck")
    await backend.posts.get()
    await server.settled()
    client.send("MsgCancel", Reason="too late")
    await client.expect_error(ErrorCode.TOO_LATE)
    late, conf = await upload_request(server, ticket, 4)
    assert conf["FilePos"] == 4
    late.send("MsgAck", Ack=True)
    response = await treq.post(
        f"{server.base}/backend/finish_upload", data={"id": ticket, "backendSecret": "k"}
    )
    assert response.code == 200
    assert await late.expect("MsgAllDone") == {"Success": True, "Result": ""}


@pytest_twisted.ensureDeferred
async def test_cancel_of_an_upload_already_cancelled_says_so(
    server: Server, backend: Backend
) -> None:
    ticket, client, _ = await acked_upload(server, backend.url, 10, backendSecret="k")
    upload = server.manager.get(ticket)
    assert upload is not None
    session = upload.transport
    upload.transport = None  # the backend's cancel lands before the browser hears of it
    response = await treq.post(
        f"{server.base}/backend/cancel_upload", data={"id": ticket, "backendSecret": "k"}
    )
    assert response.code == 200
    upload.transport = session
    client.send("MsgCancel", Reason="me too")
    await client.expect_error(ErrorCode.TICKET_CANCELLED)


@pytest_twisted.ensureDeferred
async def test_backend_cancel_while_chunks_stream_reaches_the_browser_as_msgcancel(
    server: Server, backend: Backend
) -> None:
    ticket, client, _ = await acked_upload(server, backend.url, 400 * CHUNK, backendSecret="k")
    for _ in range(SEND_AHEAD):
        client.send_chunk(b"c" * CHUNK)
    cancelled = None
    messages = []
    while (msg := await client.next()) is not None:
        messages.append(msg["MsgType"])
        if msg["MsgType"] == "MsgChunkAck":
            client.send_chunk(b"c" * CHUNK)  # the window stays full: chunks are on the wire
            if cancelled is None:
                cancelled = treq.post(
                    f"{server.base}/backend/cancel_upload",
                    data={"id": ticket, "backendSecret": "k"},
                )
    assert (await cancelled).code == 200
    assert messages[-1] == "MsgCancel"  # never MsgError 3 for chunks that were in flight
    assert set(messages[:-1]) == {"MsgChunkAck"}
    await server.settled()
    assert server.files() == {}


@pytest_twisted.ensureDeferred
async def test_chunks_behind_a_past_end_chunk_do_not_hide_its_error(
    server: Server, backend: Backend
) -> None:
    ticket, client, _ = await acked_upload(server, backend.url, CHUNK)
    client.send_chunk(b"a" * CHUNK)
    client.send_chunk(b"b")  # past the end: the upload is cancelled
    client.send_chunk(b"c")  # already on the wire: dropped quietly
    messages = []
    while (msg := await client.next()) is not None:
        messages.append(msg)
    assert messages[-1]["MsgType"] == "MsgError"
    assert messages[-1]["MsgData"]["ErrorCode"] == ErrorCode.PAST_END


@pytest_twisted.ensureDeferred
async def test_cancel_is_acknowledged_before_the_backend_answers_its_notice(
    server: Server, backend: Backend
) -> None:
    ticket, client, _ = await acked_upload(server, backend.url, 3 * CHUNK)
    backend.hold = True  # the backend never answers the cancellation notice
    client.send("MsgCancel", Reason="x" * 20_000)
    assert await client.expect("MsgCancelAck") == {"Ack": True}
    notice = await backend.posts.get()
    assert notice["cancelled"] == "yes"
    assert notice["cancelReason"] == "x" * 500  # a browser's reason is kept short
    assert server.manager.running  # the notice is still waiting for its answer
    backend.release()
