"""Random message sequences against the real server, checking what must always hold.

Invariants: acknowledged <= stored <= on disk <= received <= sent bytes; never
past LengthBytes; the bytes on disk equal what was sent; the server always answers.
"""

from __future__ import annotations

import os
from typing import Any

import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor

from incoming.upload import Phase

from .conftest import CHUNK_KB, SEND_AHEAD
from .harness import Backend, Client, Server, connect

CHUNK = CHUNK_KB * 1024
ANSWER_TIMEOUT = 10  # seconds: only to fail instead of hanging if the server went silent

# Mostly whole chunks, so uploads get somewhere; sometimes odd sizes and oversized frames.
chunk_sizes = st.one_of(
    st.sampled_from([CHUNK, CHUNK, CHUNK, CHUNK // 2, 1, 0, CHUNK + 1]),
    st.integers(0, CHUNK + 100),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("chunk"), chunk_sizes),
        st.tuples(st.just("chunk"), chunk_sizes),
        st.tuples(
            st.just("text"),
            st.sampled_from(
                [
                    '{"MsgType":"MsgAck","MsgData":{"Ack":true}}',
                    '{"MsgType":"MsgPause","MsgData":{"Pause":true}}',
                    '{"MsgType":"MsgNope","MsgData":{}}',
                    '{"MsgType":"MsgUploadReq","MsgData":{"Id":"x","LengthBytes":1}}',
                    "{not json",
                    '"just a string"',
                    '{"MsgType":"MsgAck","MsgData":[]}',
                ]
            ),
        ),
        st.tuples(st.just("reconnect"), st.booleans()),  # True: with a wrong LengthBytes
        st.tuples(st.just("wait_acks"), st.just(0)),
    ),
    max_size=24,
)


class Run:
    def __init__(self, server: Server, ticket: str, data: bytes) -> None:
        self.server, self.ticket, self.data = server, ticket, data
        self.client: Client | None = None
        self.position = 0  # next byte this client will send
        self.sent_max = 0  # furthest byte ever sent
        self.acked = 0
        self.unacked = 0
        self.ended = False  # the upload finished or was cancelled

    async def message(self) -> Any:
        assert self.client is not None
        d = self.client.messages.get()
        d.addTimeout(ANSWER_TIMEOUT, reactor)
        return await d

    async def open(self, length: int) -> None:
        self.client = await connect(self.server.ws_url())
        self.client.send("MsgUploadReq", Id=self.ticket, LengthBytes=length, Name="p")
        answer = await self.message()
        assert answer is not None, "the server must answer MsgUploadReq"
        if answer["MsgType"] == "MsgError":
            assert await self.message() is None
            self.client = None
            if answer["MsgData"]["ErrorCode"] in (11, 12):
                self.ended = True
            return
        assert answer["MsgType"] == "MsgUploadConf"
        self.position = self.acked = answer["MsgData"]["FilePos"]
        self.unacked = 0
        self.client.send("MsgAck", Ack=True)

    async def drain(self) -> None:
        """Read what the server says until it has acked everything or hung up."""
        while self.client is not None and self.unacked:
            await self.handle(await self.message())

    async def handle(self, msg: Any) -> None:
        if msg is None:
            self.client = None
            return
        kind = msg["MsgType"]
        if kind == "MsgChunkAck":
            self.unacked -= 1
            self.acked += msg["MsgData"]["ChunkSize"]
        elif kind in ("MsgAllDone", "MsgCancel"):
            self.ended = True
        else:
            assert kind == "MsgError", msg
            if msg["MsgData"]["ErrorCode"] in (15, 20, 30):
                self.ended = True

    def check(self) -> None:
        upload = self.server.manager.get(self.ticket)
        assert upload is not None
        assert self.acked <= upload.stored <= self.sent_max <= len(self.data)
        for name in (f"{self.ticket}.part", self.ticket):
            path = self.server.storage_dir / name
            if path.exists():  # a pool thread may be writing: disk runs ahead of `stored`
                on_disk = path.read_bytes()
                assert upload.stored <= len(on_disk) <= upload.received <= self.sent_max
                assert on_disk == self.data[: len(on_disk)]


async def play(server: Server, backend: Backend, length: int, steps: list[Any]) -> None:
    data = os.urandom(length)
    run = Run(server, await server.new_upload(backend.url, removeFileWhenFinished="false"), data)
    await run.open(length)
    for op, arg in steps:
        if run.ended:
            break
        if run.client is None:
            await server.manager.storage.drain(run.ticket)
            await run.open(length)
            continue
        if op == "chunk":
            piece = data[run.position : run.position + arg]
            if not piece and arg:  # everything sent: this one would grow the file past its end
                piece = b"\0" * min(arg, CHUNK)
                run.client.send_chunk(piece)
                run.unacked += 1
                await run.drain()
                continue
            run.client.send_chunk(piece)
            run.position += len(piece)
            run.sent_max = max(run.sent_max, run.position)
            run.unacked += 1
            if run.unacked >= SEND_AHEAD or arg > CHUNK or run.position > length:
                await run.drain()
        elif op == "text":
            run.client.send_raw(arg)
        elif op == "reconnect":
            run.client.close()
            await run.client.closed
            run.client = None
            await server.manager.storage.drain(run.ticket)
            await run.open(length + 1 if arg else length)
        else:
            await run.drain()
        await server.manager.storage.drain(run.ticket)
        run.check()
    if run.client is not None:
        run.client.close()
        await run.client.closed
    await server.settled()
    await server.manager.storage.drain(run.ticket)
    run.check()
    upload = server.manager.get(run.ticket)
    assert upload is not None
    if upload.phase is Phase.FINISHED:  # kept (removeFileWhenFinished=false): all of it
        assert (server.storage_dir / run.ticket).read_bytes() == data
    elif upload.phase is Phase.CANCELLED:
        assert not (server.storage_dir / run.ticket).exists()
        assert not (server.storage_dir / f"{run.ticket}.part").exists()


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    length=st.one_of(st.sampled_from([3 * CHUNK + 7, 4 * CHUNK]), st.integers(0, 4 * CHUNK)),
    steps=ops,
)
@pytest_twisted.ensureDeferred
async def test_random_sequences_keep_the_invariants(
    server: Server, backend: Backend, length: int, steps: list[Any]
) -> None:
    await play(server, backend, length, steps)
