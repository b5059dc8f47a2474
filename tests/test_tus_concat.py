"""tus concatenation against the real daemon (SPEC: Long fat links): tus-js-client's
`parallelUploads` under Node, and the refusals a client meets with raw requests."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.web._newclient import ResponseNeverReceived

from incoming import storage as storage_module
from incoming import tus
from incoming.config import Config

from .harness import Backend, Server, serving, start_daemon, stop_daemon
from .powercut import PowerCutDir
from .test_tus_clients import (
    LARGE,
    RETRY,
    TUS,
    assert_one_handover,
    metadata,
    node_modules,  # noqa: F401 (autouse fixture)
    offset_of,
    patch,
    random_file,
    restart_on,
    size_reaches,
    tus_js,
)

MiB = 1024 * 1024


async def partial(server: Server, ticket: str, length: int, **headers: str) -> Any:
    """A partial upload of `ticket` (a creation with `Upload-Concat: partial`)."""
    headers = {"Upload-Length": str(length), "Upload-Metadata": metadata(ticket=ticket),
               "Upload-Concat": "partial", **headers}  # fmt: skip
    response = await treq.post(f"{server.base}/tus/", headers={**TUS, **headers})
    response.text_ = await response.text()
    return response


async def final(server: Server, urls: list[str], **headers: str) -> Any:
    concat = {"Upload-Concat": "final;" + " ".join(urls), **headers}
    response = await treq.post(f"{server.base}/tus/", headers={**TUS, **concat})
    response.text_ = await response.text()
    return response


async def stored_partial(server: Server, ticket: str, data: bytes) -> str:
    """A complete partial upload of `data`; its URL."""
    response = await partial(server, ticket, len(data))
    assert response.code == 201, response.text_
    [url] = response.headers.getRawHeaders("location")
    url = absolute(server, url)
    assert (await patch(url, 0, data))[0] == 204
    return url


def absolute(server: Server, location: str) -> str:
    return f"http://127.0.0.1:{server.port}{location}" if location.startswith("/") else location


def parts_in(storage: Path, ticket: str) -> list[Path]:
    return [p for p in storage.glob("*.part") if p.name != f"{ticket}.part"]


async def parts_gone(storage: Path, ticket: str) -> None:
    """The partial uploads' files go once the final request is answered (not before it:
    its client need not wait for the removals)."""
    deadline = reactor.seconds() + 10
    while parts_in(storage, ticket):
        assert reactor.seconds() < deadline, parts_in(storage, ticket)
        await deferLater(reactor, 0.01)


@pytest_twisted.ensureDeferred
async def test_tus_js_client_parallel_uploads_are_concatenated_into_the_ticket(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper, *LARGE)
    options = await treq.request("OPTIONS", f"{server.base}/tus/")
    assert "concatenation" in options.headers.getRawHeaders("tus-extension")[0].split(",")
    data = random_file(tmp_path / "film.mp4", 10 * MiB + 7)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    backend.hold = True  # the final request is answered once the backend has the file
    client = tus_js(server, [{"file": tmp_path / "film.mp4",
                              "metadata": {"ticket": ticket, "filename": "film.mp4"},
                              "metadataForPartialUploads": {"ticket": ticket}}],
                    parallelUploads=4, retryDelays=RETRY)  # fmt: skip
    post = await backend.posts.get()
    assert_one_handover(post, ticket, storage / ticket, "film.mp4", data)
    assert (storage / ticket).read_bytes() == data
    await deferLater(reactor, 0.3)
    assert client.named("success") == []  # not before the backend has answered
    backend.release()
    events = await client.ended
    assert events[-1]["ok"] is True, events
    [success] = client.named("success")
    assert success["url"] == f"{server.base}/tus/{ticket}"
    assert (success["status"], success["offset"]) == (201, str(len(data)))
    assert client.named("retry") == []
    await parts_gone(storage, ticket)  # the partial uploads went with the copy
    assert await offset_of(success["url"]) == len(data)
    await stop_daemon(daemon, process)
    assert len(backend.posts.pending) == 0


@pytest_twisted.ensureDeferred
async def test_parallel_uploads_resume_after_the_daemon_is_sigkilled(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper, *LARGE)
    size = 160 * MiB  # (tus_client.mjs's `rate` cannot throttle partial uploads)
    data = random_file(tmp_path / "big.bin", size)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    client = tus_js(server, [{"file": tmp_path / "big.bin",
                              "metadata": {"ticket": ticket, "filename": "big.bin"},
                              "metadataForPartialUploads": {"ticket": ticket}}],
                    parallelUploads=4, retryDelays=RETRY)  # fmt: skip
    deadline = reactor.seconds() + 30
    while (
        len(parts_in(storage, ticket)) < 4
        or sum(p.stat().st_size for p in parts_in(storage, ticket)) < 8 * MiB
    ):  # every partial under way
        assert reactor.seconds() < deadline, client.events
        await deferLater(reactor, 0.002)
    await daemon.kill(process)
    kept = {p.name: p.stat().st_size for p in parts_in(storage, ticket)}
    assert len(kept) == 4 and sum(kept.values()) < size, kept  # killed mid-way
    assert client.named("success") == [] and len(backend.posts.pending) == 0

    daemon, process, server = await restart_on(server.port, storage, tmp_path, stopper, *LARGE)
    events = await client.ended
    assert events[-1]["ok"] is True, events
    assert any(r["status"] == 0 and r["retry"] for r in client.named("retry"))
    post = await backend.posts.get()
    assert_one_handover(post, ticket, storage / ticket, "big.bin", data)
    assert (storage / ticket).read_bytes() == data
    await parts_gone(storage, ticket)
    await stop_daemon(daemon, process)
    assert len(backend.posts.pending) == 0


@pytest_twisted.ensureDeferred
async def test_partial_and_final_requests_that_break_the_rules_are_refused(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    ticket = await server.new_upload(backend.url)
    other = await server.new_upload(backend.url)
    first = await stored_partial(server, ticket, b"a" * 1000)
    theirs = await stored_partial(server, other, b"b" * 1000)
    half = await partial(server, ticket, 1000)
    [half_url] = half.headers.getRawHeaders("location")
    assert (await patch(absolute(server, half_url), 0, b"c" * 500))[0] == 204
    unknown = f"{server.base}/tus/{'0' * 8}-0000-4000-8000-{'0' * 12}"

    assert (await partial(server, "no-such-ticket", 10)).code == 404
    refused = await treq.post(f"{server.base}/tus/", headers={**TUS, "Upload-Length": "10",
                              "Upload-Concat": "partial"})  # fmt: skip
    assert refused.code == 400 and "ticket" in await refused.text()
    assert (await partial(server, ticket, 10, **{"Upload-Concat": "halfway"})).code == 400
    for urls, status, words in [
        ([first, theirs], 403, "another ticket"),
        ([first, unknown], 404, "no such upload"),
        ([first, absolute(server, half_url)], 409, "500 of 1000 bytes"),
        ([first, first], 400, "listed twice"),
        ([first, "/somewhere/else"], 400, "not an upload's URL"),
        ([f"{server.base}/tus/{ticket}"], 400, "not a partial upload"),
        ([], 400, "no partial upload"),
    ]:
        response = await final(server, urls, **{"Upload-Metadata": metadata(ticket=ticket)})
        assert (response.code, words in response.text_) == (status, True), response.text_
    with_length = await final(server, [first], **{"Upload-Length": "1000"})
    assert with_length.code == 400 and "length" in with_length.text_
    # Nothing was stored for the ticket, and the partials are intact.
    assert not (storage / f"{ticket}.part").exists() and not (storage / ticket).exists()
    assert await offset_of(first) == 1000 and await offset_of(theirs) == 1000
    # A partial upload goes only into its own ticket's upload.
    mine = {"Upload-Metadata": metadata(ticket=ticket)}
    assert (await final(server, [theirs], **mine)).code == 403
    done = await final(server, [first], **mine)
    assert done.code == 201, done.text_
    post = await backend.posts.get()
    assert (post["id"], post["size"]) == (ticket, "1000")
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_delete_of_a_partial_upload_removes_it_and_a_final_then_refuses_it(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    first = await stored_partial(server, ticket, b"x" * 3000)
    second = await stored_partial(server, ticket, b"y" * 2000)
    assert len(parts_in(storage, ticket)) == 2
    head = await treq.head(first, headers=TUS)
    assert head.headers.getRawHeaders("upload-concat") == ["partial"]
    deleted = await treq.delete(first, headers=TUS)
    assert deleted.code == 204
    assert len(parts_in(storage, ticket)) == 1
    assert (await treq.head(first, headers=TUS)).code == 410
    refused = await final(server, [first, second])
    assert refused.code == 410, refused.text_
    assert len(backend.posts.pending) == 0  # the backend hears of tickets only
    # The ticket is untouched: a new partial in place of the deleted one completes it.
    again = await stored_partial(server, ticket, b"z" * 3000)
    done = await final(server, [again, second])
    assert done.code == 201, done.text_
    post = await backend.posts.get()
    assert (post["id"], post["size"], post["cancelled"]) == (ticket, "5000", "no")
    assert Path(post["filename"]).read_bytes() == b"z" * 3000 + b"y" * 2000
    await parts_gone(storage, ticket)
    await stop_daemon(daemon, process)


@pytest_twisted.ensureDeferred
async def test_a_partial_upload_of_a_cancelled_ticket_takes_no_more_bytes(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper)
    ticket = await server.new_upload(backend.url)
    response = await partial(server, ticket, 1000)
    [url] = response.headers.getRawHeaders("location")
    url = absolute(server, url)
    assert (await patch(url, 0, b"a" * 400))[0] == 204
    cancel = await treq.post(f"{server.base}/backend/cancel_upload", params={"id": ticket})
    assert cancel.code == 200, await cancel.text()
    status, _, text = await patch(url, 400, b"a" * 600)
    assert status == 410 and "cancelled" in text
    assert (await partial(server, ticket, 10)).code == 410
    await stop_daemon(daemon, process)


class CountingSha256:
    """hashlib.sha256 for the storage, counting the bytes it hashes."""

    fed = 0

    def __init__(self, digest: Any = None) -> None:
        self.digest = digest or hashlib.sha256()

    def update(self, data: Any) -> None:
        CountingSha256.fed += len(memoryview(data).cast("B"))
        self.digest.update(data)

    def copy(self) -> CountingSha256:
        return CountingSha256(self.digest.copy())

    def hexdigest(self) -> str:
        return str(self.digest.hexdigest())


@pytest_twisted.ensureDeferred
async def test_partial_uploads_are_not_hashed_and_the_ticket_gets_its_whole_files_sha256(
    server: Server, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the ticket's file is hashed (as the partials are copied into it): a partial
    upload's own SHA-256 is of no use. Partials written last-first, joined first-last."""
    monkeypatch.setattr(storage_module, "hashlib", SimpleNamespace(sha256=CountingSha256))
    CountingSha256.fed = 0
    first, second = os.urandom(3 * MiB + 5), os.urandom(2 * MiB + 7)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    second_url = await stored_partial(server, ticket, second)
    first_url = await stored_partial(server, ticket, first)
    assert CountingSha256.fed == 0  # the partials' bytes were not hashed as they came
    done = await final(server, [first_url, second_url])
    assert done.code == 201, done.text_
    post = await backend.posts.get()
    assert (post["id"], post["size"]) == (ticket, str(len(first + second)))
    assert post["sha256"] == hashlib.sha256(first + second).hexdigest()
    assert Path(post["filename"]).read_bytes() == first + second
    assert CountingSha256.fed == len(first + second)  # each byte hashed once


@pytest_twisted.ensureDeferred
async def test_a_final_request_sent_again_after_its_answer_was_lost_gets_it_again(
    server: Server, backend: Backend
) -> None:
    """Its partial uploads were joined and are gone: the ticket's answer, not a 410 that
    would tell the client the file was lost."""
    backend.answers.append((200, b"done\nverdict: kept"))
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    first = await stored_partial(server, ticket, b"a" * 9)
    second = await stored_partial(server, ticket, b"b" * 7)
    done = await final(server, [first, second])
    assert done.code == 201, done.text_
    await backend.posts.get()
    await parts_gone(server.storage_dir, ticket)
    again = await final(server, [first, second])
    assert again.code == 201, again.text_
    assert again.headers.getRawHeaders("upload-offset") == ["16"]
    assert again.headers.getRawHeaders("location") == done.headers.getRawHeaders("location")
    assert again.headers.getRawHeaders("incoming-result") == ["verdict%3A%20kept"]
    assert backend.posts.pending == []  # handed over once
    assert (server.storage_dir / ticket).read_bytes() == b"a" * 9 + b"b" * 7


@pytest_twisted.ensureDeferred
async def test_a_tickets_partial_uploads_are_bounded_in_number_and_size_together(
    config: Config, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each partial upload fits the limits alone: together they may not pass the upload
    size limit, nor be more than MAX_PARTS."""
    monkeypatch.setattr(tus, "MAX_PARTS", 3)
    async with serving(dataclasses.replace(config, max_upload_bytes=100)) as server:
        ticket = await server.new_upload(backend.url)
        assert (await partial(server, ticket, 60)).code == 201
        over = await partial(server, ticket, 41)
        assert (over.code, over.text_) == (
            413,
            "the ticket's partial uploads would pass 100 bytes together",
        )
        assert (await partial(server, ticket, 40)).code == 201
        assert (await partial(server, ticket, 0)).code == 201
        fourth = await partial(server, ticket, 0)
        assert (fourth.code, fourth.text_) == (
            400,
            "a ticket has at most 3 partial uploads under way",
        )


@pytest_twisted.ensureDeferred
async def test_tus_js_client_started_again_after_a_sigkill_mid_copy_finishes(
    tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    """tus-js-client (4.3) does not retry a final request whose connection broke; the
    page's `start()` again sends it again (after HEAD of each partial) and it finishes."""
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper, *LARGE)
    data = random_file(tmp_path / "big.bin", 128 * MiB + 5)  # two partials of 64 MiB and a bit
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    client = tus_js(server, [{"file": tmp_path / "big.bin",
                              "metadata": {"ticket": ticket, "filename": "big.bin"},
                              "metadataForPartialUploads": {"ticket": ticket}}],
                    parallelUploads=2, retryDelays=RETRY, startAgainAfter=500)  # fmt: skip
    part = storage / f"{ticket}.part"
    await size_reaches(part, 64 * MiB + 3)  # the second partial is being copied
    await daemon.kill(process)
    assert 64 * MiB < part.stat().st_size < len(data)
    assert len(parts_in(storage, ticket)) == 2

    daemon, process, server = await restart_on(server.port, storage, tmp_path, stopper, *LARGE)
    events = await client.ended
    assert events[-1]["ok"] is True, events
    [again] = client.named("start-again")
    assert again["status"] == 0  # the connection broke
    [success] = client.named("success")
    assert (success["status"], success["offset"]) == (201, str(len(data)))
    post = await backend.posts.get()
    assert_one_handover(post, ticket, storage / ticket, "big.bin", data)
    assert (storage / ticket).read_bytes() == data
    await parts_gone(storage, ticket)
    await stop_daemon(daemon, process)
    assert len(backend.posts.pending) == 0


@pytest.mark.parametrize("when", ["copying", "handing over"])
@pytest_twisted.ensureDeferred
async def test_a_final_request_cut_short_by_sigkill_is_sent_again_and_finishes(
    tmp_path: Path, backend: Backend, stopper: list[Any], when: str
) -> None:
    """SIGKILL while the partials are copied into the ticket's file (it holds some of
    them), or once the backend has the file, unanswered; after the restart the client
    sends the same final request again: the file is whole, its SHA-256 right, the
    partial files go, and nobody hears a 5xx."""
    storage = tmp_path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper, *LARGE)
    # the last piece small: the ticket's file is shorter than the whole until the end
    pieces = [os.urandom(64 * MiB), os.urandom(64 * MiB), os.urandom(MiB + 3)]
    data = b"".join(pieces)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    urls = [await stored_partial(server, ticket, piece) for piece in pieces]
    named = {"Upload-Metadata": metadata(ticket=ticket, filename="big.bin")}
    backend.hold = when == "handing over"
    cut_short = ensureDeferred(final(server, urls, **named))
    part = storage / f"{ticket}.part"
    if when == "copying":
        await size_reaches(part, len(pieces[0]) + 1)
    else:
        assert_one_handover(await backend.posts.get(), ticket, storage / ticket, "big.bin", data)
    await daemon.kill(process)
    with pytest.raises(ResponseNeverReceived):
        await cut_short
    if when == "copying":
        assert len(pieces[0]) < part.stat().st_size < len(data)  # killed mid-copy
        assert len(backend.posts.pending) == 0
    backend.hold = False
    backend.release()  # (to a connection that is gone)

    daemon, process, server = await restart_on(server.port, storage, tmp_path, stopper, *LARGE)
    if when == "copying":  # the ticket's bytes come from its partials only, even now
        held = part.stat().st_size
        ticket_url = f"{server.base}/tus/{ticket}"
        status, _, text = await patch(ticket_url, await offset_of(ticket_url), b"own bytes")
        assert status == 403 and "partial uploads only" in text, text
        assert part.stat().st_size == held
    again = await final(server, urls, **named)
    assert again.code == 201, again.text_
    assert again.headers.getRawHeaders("location") == [f"/incoming/tus/{ticket}"]
    assert again.headers.getRawHeaders("upload-offset") == [str(len(data))]
    assert again.headers.getRawHeaders("incoming-result") == [""]
    post = await backend.posts.get()  # (after a kill in its handover: again, at least once)
    assert_one_handover(post, ticket, storage / ticket, "big.bin", data)
    assert (storage / ticket).read_bytes() == data
    await parts_gone(storage, ticket)
    for url in urls:
        assert (await treq.head(url, headers=TUS)).code == 410
    await stop_daemon(daemon, process)
    assert len(backend.posts.pending) == 0


@pytest_twisted.ensureDeferred
async def test_a_power_cut_mid_copy_loses_no_acknowledged_partial(
    powercut_dir: PowerCutDir, tmp_path: Path, backend: Backend, stopper: list[Any]
) -> None:
    """SIGKILL mid-copy, then a power cut: what the ticket's file held and was not synced
    is lost, the partials (acknowledged) are not; the final request sent again finishes."""
    storage = powercut_dir.path / "s"
    daemon, process, server = await start_daemon(storage, tmp_path, stopper, *LARGE)
    pieces = [os.urandom(32 * MiB), os.urandom(32 * MiB), os.urandom(MiB + 3)]
    data = b"".join(pieces)
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    urls = [await stored_partial(server, ticket, piece) for piece in pieces]
    cut_short = ensureDeferred(final(server, urls))
    part = storage / f"{ticket}.part"
    await size_reaches(part, len(pieces[0]) + 1)
    await daemon.kill(process)
    with pytest.raises(ResponseNeverReceived):
        await cut_short
    assert len(pieces[0]) < part.stat().st_size < len(data)
    await powercut_dir.power_cut()

    daemon, process, server = await restart_on(server.port, storage, tmp_path, stopper, *LARGE)
    for url, piece in zip(urls, pieces, strict=True):
        assert await offset_of(url) == len(piece)
    again = await final(server, urls)
    assert again.code == 201, again.text_
    assert_one_handover(await backend.posts.get(), ticket, storage / ticket, "", data)
    assert (storage / ticket).read_bytes() == data
    await parts_gone(storage, ticket)
    await stop_daemon(daemon, process)
    assert len(backend.posts.pending) == 0


@pytest.mark.parametrize("gone", ["deleted", "expired"])
@pytest_twisted.ensureDeferred
async def test_a_partial_gone_as_a_final_request_begins_leaves_the_tickets_length_open(
    server: Server, backend: Backend, monkeypatch: pytest.MonkeyPatch, gone: str
) -> None:
    """A partial deleted or expired after the final request looked at it, before it was
    held: 410, and the ticket is as it was (no length fixed), so that a final request of
    other partials, of another total, completes it."""
    manager = server.manager
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    first = await stored_partial(server, ticket, b"a" * 3000)
    second = await stored_partial(server, ticket, b"b" * 2000)
    resume_position = manager.resume_position

    async def meanwhile(upload: Any) -> int:  # the final request's first wait for the disk
        monkeypatch.setattr(manager, "resume_position", resume_position)
        if gone == "deleted":
            assert (await treq.delete(second, headers=TUS)).code == 204
        else:
            manager.get(second.rsplit("/", 1)[1]).life.idle_timeout(manager.max_idle)
        return await resume_position(upload)

    monkeypatch.setattr(manager, "resume_position", meanwhile)
    refused = await final(server, [first, second])
    assert refused.code == 410, refused.text_
    assert manager.resume_position == resume_position  # (the partial went meanwhile)
    assert manager.get(ticket).length is None
    third = await stored_partial(server, ticket, b"c" * 1000)
    done = await final(server, [first, third])
    assert done.code == 201, done.text_
    post = await backend.posts.get()
    assert (post["id"], post["size"]) == (ticket, "4000")
    assert Path(post["filename"]).read_bytes() == b"a" * 3000 + b"c" * 1000
    await parts_gone(server.storage_dir, ticket)


@pytest_twisted.ensureDeferred
async def test_a_final_request_cannot_join_partials_into_a_ticket_with_bytes_of_its_own(
    server: Server, backend: Backend
) -> None:
    """A ticket that took bytes in PATCHes is no final upload: a final request would have
    copied the partials in after them, skipping as many of theirs."""
    ticket = await server.new_upload(backend.url, removeFileWhenFinished="false")
    created = await treq.post(f"{server.base}/tus/", headers={**TUS, "Upload-Length": "16",
                              "Upload-Metadata": metadata(ticket=ticket)})  # fmt: skip
    assert created.code == 201
    ticket_url = f"{server.base}/tus/{ticket}"
    assert (await patch(ticket_url, 0, b"own!"))[0] == 204
    urls = [await stored_partial(server, ticket, b"p" * 8) for _ in range(2)]
    refused = await final(server, urls, **{"Upload-Metadata": metadata(ticket=ticket)})
    assert refused.code == 409 and "4 bytes of its own" in refused.text_, refused.text_
    assert await offset_of(ticket_url) == 4
    assert (server.storage_dir / f"{ticket}.part").read_bytes() == b"own!"
    assert await offset_of(urls[0]) == 8 and await offset_of(urls[1]) == 8
    # The ticket goes on as it began.
    assert (await patch(ticket_url, 4, b"x" * 12))[0] == 204
    post = await backend.posts.get()
    assert (post["id"], post["size"]) == (ticket, "16")
    assert Path(post["filename"]).read_bytes() == b"own!" + b"x" * 12
