"""What `/incoming/metrics` counts of uploads (issue 16): sizes, durations, handover
latency, how uploads end and why, errors sent by code, by transport."""

from __future__ import annotations

import base64
import os

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families

from incoming.errors import ErrorCode
from incoming.metrics import Metrics

from .fakes import RecordingHandover
from .harness import (
    CHUNK_KB,
    SEND_AHEAD,
    Backend,
    Server,
    acked_upload,
    complete_upload,
    connect,
    send_all,
    upload_request,
)
from .test_lifecycle import begin, make_manager, new_ticket

CHUNK = CHUNK_KB * 1024
TUS = {"Tus-Resumable": "1.0.0"}
STREAM = {**TUS, "Content-Type": "application/offset+octet-stream"}
Figures = dict[tuple[str, frozenset[tuple[str, str]]], float]


def figures(text: str) -> Figures:
    """Every sample: (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def rendered(metrics: Metrics) -> Figures:
    return figures(metrics.render().decode())


def value(found: Figures, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


async def tus_upload(server: Server, backend: Backend, data: bytes) -> str:
    ticket = await server.new_upload(backend.url)
    encoded = base64.b64encode(ticket.encode()).decode()
    response = await treq.post(
        f"{server.base}/tus/",
        headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": f"ticket {encoded}"},
    )
    assert response.code == 201
    half = len(data) // 2
    for offset, part in ((0, data[:half]), (half, data[half:])):
        response = await treq.request(
            "PATCH", f"{server.base}/tus/{ticket}", data=part,
            headers={**STREAM, "Upload-Offset": str(offset)},
        )  # fmt: skip
        assert response.code == 204
    return ticket


@pytest_twisted.ensureDeferred
async def test_uploads_are_counted_by_how_they_end_and_their_transport(
    server: Server, backend: Backend
) -> None:
    over_websocket, over_tus = os.urandom(3 * CHUNK + 1), os.urandom(5 * CHUNK)
    client, _ = await upload_request(
        server, await server.new_upload(backend.url), len(over_websocket)
    )
    await complete_upload(client, over_websocket, CHUNK, SEND_AHEAD)
    await tus_upload(server, backend, over_tus)

    cancelled, client, _ = await acked_upload(server, backend.url, 4 * CHUNK)
    await send_all(client, b"c" * CHUNK, CHUNK, SEND_AHEAD)
    second = await connect(server.ws_url())
    second.send("MsgUploadReq", Id=cancelled, LengthBytes=4 * CHUNK, Name="x")
    await second.expect_error(ErrorCode.ALREADY_CONNECTED)
    client.send("MsgCancel", Reason="no")
    await client.expect("MsgCancelAck")
    for ticket, status in ((cancelled, 410), ("7e6a8b8e-0a0a-4a0a-8a0a-0a0a0a0a0a0a", 404)):
        response = await treq.request(
            "PATCH", f"{server.base}/tus/{ticket}", data=b"x",
            headers={**STREAM, "Upload-Offset": "0"},
        )  # fmt: skip
        assert response.code == status
    await server.settled()

    response = await treq.get(f"{server.base}/metrics")
    found = figures(await response.text())
    assert [name for name, _ in found if name.endswith("_created")] == []
    assert value(found, "incoming_uploads_started_total", transport="websocket") == 2
    assert value(found, "incoming_uploads_started_total", transport="tus") == 1
    assert value(found, "incoming_uploads_finished_total", transport="websocket") == 1
    assert value(found, "incoming_uploads_finished_total", transport="tus") == 1
    by_client = {"reason": "by_client", "transport": "websocket"}
    assert value(found, "incoming_uploads_cancelled_total", **by_client) == 1
    assert value(found, "incoming_uploads_cancelled_total", reason="idle", transport="none") == 0
    assert value(found, "incoming_errors_sent_total", code="13", transport="websocket") == 1
    assert value(found, "incoming_errors_sent_total", code="12", transport="tus") == 1
    assert value(found, "incoming_errors_sent_total", code="10", transport="tus") == 1
    assert len([name for name, _ in found if name == "incoming_errors_sent_total"]) == 3
    sizes = len(over_websocket) + len(over_tus)
    assert value(found, "incoming_upload_size_bytes_count") == 2
    assert value(found, "incoming_upload_size_bytes_sum") == sizes
    assert value(found, "incoming_upload_size_bytes_bucket", le="16384.0") == 1
    assert value(found, "incoming_upload_size_bytes_bucket", le="65536.0") == 2
    assert value(found, "incoming_upload_duration_seconds_count") == 2
    assert value(found, "incoming_handover_duration_seconds_count") == 2


def test_durations_and_reasons_follow_the_clock_and_the_table() -> None:
    manager, clock, storage, handover, upload, transport = begin(length=10, hold=True)
    clock.advance(7)
    upload.life.receive(b"x" * 10)  # complete 7 s after its first connection
    clock.advance(3)
    handover.answer("done")  # 3 s later
    found = rendered(manager.metrics)
    assert value(found, "incoming_upload_duration_seconds_sum") == 7
    assert value(found, "incoming_upload_duration_seconds_bucket", le="5.0") == 0
    assert value(found, "incoming_upload_duration_seconds_bucket", le="15.0") == 1
    assert value(found, "incoming_handover_duration_seconds_sum") == 3

    manager, clock, storage, handover = make_manager(RecordingHandover("fail"))
    new_ticket(manager, True)  # never used: expires without a connection
    clock.advance(100)
    found = rendered(manager.metrics)
    assert value(found, "incoming_uploads_cancelled_total", reason="idle", transport="none") == 1
    manager, clock, storage, handover, upload, transport = begin("fail")
    upload.life.receive(b"abc")
    found = rendered(manager.metrics)
    failed = {"reason": "handover_failed", "transport": "websocket"}
    assert value(found, "incoming_uploads_cancelled_total", **failed) == 1
    assert value(found, "incoming_handover_duration_seconds_count") == 0  # answered ones only
