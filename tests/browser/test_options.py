"""incoming.js's options in headless Chromium against the real server, from the demo's page
(another origin than the server, so CORS applies): `headers`, `retryDelays`."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Page

from .conftest import Demo, Incoming, random_file, sha256, throttle
from .test_uploads import handovers, upload, wait

MiB = 1024 * 1024


def test_headers_go_with_every_request_through_the_preflight(
    app_page: Page, demo: Demo, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "three.bin", 3 * MiB + 1)
    seen: list[tuple[str, str | None]] = []
    app_page.on(
        "request",
        lambda r: (
            "/incoming/tus/" in r.url and seen.append((r.method, r.headers.get("authorization")))
        ),
    )
    upload(app_page, source, options={"headers": {"Authorization": "Bearer t0k"}, "chunkSize": MiB})
    wait(app_page, "window.ups[0].finished")
    # the creation carries the first MiB (creation-with-upload), 3 PATCHes the rest
    assert seen == [("POST", "Bearer t0k")] + [("PATCH", "Bearer t0k")] * 3
    assert sha256(demo.files / "three.bin") == sha256(source)


def test_a_header_the_preflight_refuses_ends_in_onerror_not_the_websocket(
    app_page: Page, demo: Demo, incoming: Incoming, tmp_path: Path
) -> None:
    """The server allows Authorization, X-Request-ID and X-Requested-With from another
    origin; the browser hides the refused preflight, a WebSocket to the server opens."""
    source = random_file(tmp_path / "a.bin", MiB)
    frames: list[str | bytes] = []
    app_page.on("websocket", lambda ws: ws.on("framesent", lambda frame: frames.append(frame)))
    upload(app_page, source, options={"headers": {"X-App-Token": "t0k"}})
    wait(app_page, "window.events.length > 0")
    [[_, event, state]] = app_page.evaluate("() => window.events")
    assert event == "error 0"
    assert "CORS preflight refused the request's headers" in state
    assert frames == [], "nothing sent over the WebSocket: it could not carry the header"
    assert incoming.parts() == []
    ticket = app_page.evaluate("() => window.ups[0].ticket")
    assert handovers(demo, ticket) == []


def test_retry_delays_used_up_end_in_onerror(
    app_page: Page, incoming: Incoming, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "slow.bin", 4 * MiB)
    throttle(app_page, MiB)
    upload(app_page, source, options={"retryDelays": [100, 300]})
    wait(app_page, "window.ups[0].bytes_sent >= 1 << 20")
    incoming.kill()
    wait(app_page, "window.events.length > 0")
    assert app_page.evaluate("() => window.events") == [[0, "error 0", "Error: Connection lost"]]
    states = [s for s, _ in app_page.evaluate("() => window.states[0]")]
    assert [s for s in states if "retrying" in s] == [
        "Connection lost; retrying in 0 s",
        "Connection lost; retrying in 0 s",
    ]
    up = app_page.evaluate("() => [window.ups[0].can_pause, window.ups[0].error_msg]")
    assert up == [False, "Connection lost"]
