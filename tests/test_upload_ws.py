"""The WebSocket upload protocol over real loopback sockets (SPEC: WebSocket upload protocol)."""

from __future__ import annotations

import hashlib
import os

import pytest
import pytest_twisted

from incoming.uploads import ErrorCode

from .conftest import CHUNK_KB, SEND_AHEAD
from .harness import Backend, Server, connect, send_all, upload_request

CHUNK = CHUNK_KB * 1024


@pytest.mark.parametrize("size", [0, 1, CHUNK, 3 * CHUNK + 7])
@pytest.mark.parametrize("prefix", ["/incoming", "/incoming/0.1"])
@pytest_twisted.ensureDeferred
async def test_upload_is_stored_and_handed_over(
    server: Server, backend: Backend, size: int, prefix: str
) -> None:
    data = os.urandom(size)
    backend.answer = b"done"
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false",
                                     backendSecret="s3cret")
    client, conf = await upload_request(server, ticket, size, name="../../etc/passwd", prefix=prefix)
    assert conf == {"ChunkSizeKB": CHUNK_KB, "FilePos": 0, "SendAhead": SEND_AHEAD}
    client.send("MsgAck", Ack=True)
    await send_all(client, data, CHUNK, SEND_AHEAD)
    post = await backend.posts.get()
    path = server.storage_dir / ticket
    assert post["id"] == ticket
    assert post["filename"] == str(path)
    assert post["filenameFromBrowser"] == "../../etc/passwd"
    assert post["backendSecret"] == "s3cret"
    assert post["cancelled"] == "no"
    assert post["cancelReason"] == ""
    assert post["size"] == str(size)
    assert await client.expect("MsgAllDone") == {"Success": True}
    assert await client.next() is None
    assert server.files() == {ticket: data}
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
