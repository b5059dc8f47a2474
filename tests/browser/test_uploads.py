"""incoming.js in headless Chromium against the real server (SPEC: Browser library).

Over HTTP (tus, the default) and over the WebSocket (`{transport: "websocket"}`,
the 2014 protocol). The WebSocket tests slow the server down (16 KiB chunks, one
in flight) to act mid-upload; the HTTP tests slow Chromium's upload down instead
(DevTools throttling), since one request (the creation) carries the whole test file.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Page

from .conftest import TEST_HOOKS, Demo, Incoming, random_file, sha256, throttle

MiB = 1024 * 1024
SLOW = ["--chunk-size-kb", "16", "--send-ahead", "1", "--max-window", "0"]  # one in flight
WS = {"transport": "websocket"}
HTTP: dict[str, str] = {}  # the default
TRANSPORTS = pytest.mark.parametrize("options", [HTTP, WS], ids=["http", "websocket"])


def demo_events(demo: Demo) -> list[dict[str, str]]:
    with urllib.request.urlopen(f"{demo.url}api/events") as response:
        events: list[dict[str, str]] = json.load(response)
        return events


def upload(
    page: Page,
    *paths: Path,
    behaviour: str | None = None,
    options: dict[str, str] | None = None,
    resume: bool = False,
) -> list[int]:
    page.set_input_files("#testfiles", [str(p) for p in paths])
    return [
        page.evaluate("([i, b, o, r]) => startUpload(i, b, o, r)", [i, behaviour, options, resume])
        for i in range(len(paths))
    ]


def handovers(demo: Demo, ticket: str) -> list[dict[str, str]]:
    return [e for e in demo_events(demo) if e["id"] == ticket]


def cancel_notice(demo: Demo, ticket: str, timeout: float = 10) -> dict[str, str]:
    """The backend's one POST for a cancelled upload: it follows the server's answer to the
    cancel (MsgCancelAck, or the DELETE's 204, once the file is removed), so it may come
    after oncancelled."""
    deadline = time.monotonic() + timeout
    while not (notices := handovers(demo, ticket)):
        assert time.monotonic() < deadline, f"no cancel notice for {ticket}"
        time.sleep(0.05)
    [notice] = notices
    return notice


def wait(page: Page, condition: str, timeout: float = 60_000) -> None:
    page.wait_for_function(f"() => {condition}", timeout=timeout)


@TRANSPORTS
def test_50_mib_file_arrives_byte_identical(
    app_page: Page, demo: Demo, tmp_path: Path, options: dict[str, str]
) -> None:
    source = random_file(tmp_path / "fifty.bin", 50 * MiB)
    upload(app_page, source, options=options)
    wait(app_page, "window.ups[0].finished")
    up = app_page.evaluate(
        "() => { const u = window.ups[0]; return {frac: u.frac_complete, acked: u.bytes_acked,"
        " total: u.bytes_total, name: u.filename, state: u.state_msg, ahead: u.chunks_ahead,"
        " can_pause: u.can_pause, can_cancel: u.can_cancel, connected: u.connected}; }"
    )
    assert up == {"frac": 1, "acked": 50 * MiB, "total": 50 * MiB, "name": "fifty.bin",
                  "state": "Finished", "ahead": 0, "can_pause": False, "can_cancel": False,
                  "connected": False}  # fmt: skip
    assert sha256(demo.files / "fifty.bin") == sha256(source)
    assert app_page.evaluate("() => window.events") == [[0, "finished", "Finished"]]
    [handover] = handovers(demo, app_page.evaluate("() => window.ups[0].ticket"))
    assert (handover["cancelled"], handover["size"]) == ("no", str(50 * MiB))
    assert (
        app_page.evaluate(
            "(i) => incoming.find_upload(i.files[0])",
            app_page.locator("#testfiles").element_handle(),
        )
        is None
    )


def test_http_frac_sent_moves_within_one_patch(app_page: Page, demo: Demo, tmp_path: Path) -> None:
    """A 20 MiB file is one request (the creation carries it): frac_complete jumps from 0
    to 1 when it is answered, while frac_sent follows Chromium's upload progress, never
    back and below 1 until the upload is finished."""
    source = random_file(tmp_path / "twenty.bin", 20 * MiB)
    patches: list[str] = []  # the requests that carry bytes
    app_page.on(
        "request",
        lambda r: (
            r.headers.get("content-type") == "application/offset+octet-stream"
            and patches.append(f"{r.method} {r.url}")
        ),
    )
    throttle(app_page, 8 * MiB)
    upload(app_page, source)
    wait(app_page, "window.ups[0].finished")
    fracs = app_page.evaluate("() => window.fracs[0]")
    assert [p.split()[0] for p in patches] == ["POST"], patches
    sent = [f[0] for f in fracs]
    assert sent == sorted(sent), "never back"
    moving = {f[0] for f in fracs if f[1] == 0 and 0 < f[0] < 1}
    assert len(moving) >= 5, fracs  # several figures before the PATCH is answered
    assert all(f[0] < 1 for f in fracs if not f[2])
    assert all(f[0] >= f[1] for f in fracs if f[1] < 1)
    assert {f[1] for f in fracs} == {0, 1}  # what frac_complete could show
    assert fracs[-1] == [1, 1, True]
    assert sha256(demo.files / "twenty.bin") == sha256(source)


@TRANSPORTS
def test_three_files_at_once(
    app_page: Page, demo: Demo, tmp_path: Path, options: dict[str, str]
) -> None:
    sources = [random_file(tmp_path / f"f{i}.bin", (i + 1) * 3 * MiB + i) for i in range(3)]
    upload(app_page, *sources, options=options)
    wait(app_page, "window.ups.length === 3 && window.ups.every(u => u.finished)")
    tickets = app_page.evaluate("() => window.ups.map(u => u.ticket)")
    assert len(set(tickets)) == 3
    for source in sources:
        assert sha256(demo.files / source.name) == sha256(source)


@pytest.mark.parametrize("incoming_options", [SLOW])
def test_pause_then_resume(app_page: Page, demo: Demo, incoming: Incoming, tmp_path: Path) -> None:
    source = random_file(tmp_path / "paused.bin", 8 * MiB)
    upload(app_page, source, behaviour="pause", options=WS)
    wait(app_page, "window.ups[0] && window.ups[0].paused && !window.ups[0].connected")
    state = app_page.evaluate(
        "() => [window.ups[0].state_msg, window.ups[0].bytes_acked, window.ups[0].can_pause]"
    )
    assert state[0] == "Paused" and 0 < state[1] < 8 * MiB and state[2] is True
    [part] = incoming.parts()
    assert part.stat().st_size >= state[1]  # at least every acknowledged byte is stored
    app_page.evaluate("() => window.ups[0].pause('unpause')")
    wait(app_page, "window.ups[0].finished")
    assert sha256(demo.files / "paused.bin") == sha256(source)


@pytest.mark.parametrize("incoming_options", [SLOW])
def test_cancel_while_transferring(
    app_page: Page, demo: Demo, incoming: Incoming, tmp_path: Path
) -> None:
    upload(app_page, random_file(tmp_path / "c.bin", 8 * MiB), behaviour="cancel", options=WS)
    wait(app_page, "window.ups[0] && window.ups[0].cancelled")
    up = app_page.evaluate(
        "() => [window.ups[0].cancel_msg, window.ups[0].cancelling, window.events]"
    )
    assert up[0] == "cancelled by the test" and up[1] is False
    assert up[2] == [[0, "cancelled", "Cancelled: cancelled by the test"]]
    ticket = app_page.evaluate("() => window.ups[0].ticket")
    notice = cancel_notice(demo, ticket)
    assert (notice["cancelled"], notice["cancelReason"]) == ("yes", "cancelled by the test")
    assert incoming.parts() == []
    assert not (demo.files / "c.bin").exists()


@pytest.mark.parametrize("incoming_options", [SLOW])
def test_cancel_while_paused(
    app_page: Page, demo: Demo, incoming: Incoming, tmp_path: Path
) -> None:
    upload(app_page, random_file(tmp_path / "p.bin", 8 * MiB), behaviour="pause", options=WS)
    wait(app_page, "window.ups[0] && window.ups[0].paused && !window.ups[0].connected")
    assert len(incoming.parts()) == 1
    # cancelling until the server confirms it, on a connection of its own
    assert app_page.evaluate(
        "() => { const u = window.ups[0]; u.cancel('changed my mind');"
        " return [u.cancelling, u.cancelled, u.state_msg, window.events]; }"
    ) == [True, False, "Cancelling", []]
    wait(app_page, "window.ups[0].cancelled")
    assert app_page.evaluate("() => [window.ups[0].cancelling, window.events]") == [
        False, [[0, "cancelled", "Cancelled: changed my mind"]],
    ]  # fmt: skip
    ticket = app_page.evaluate("() => window.ups[0].ticket")
    notice = cancel_notice(demo, ticket)
    assert (notice["cancelled"], notice["cancelReason"]) == ("yes", "changed my mind")
    assert incoming.parts() == []


@pytest.mark.parametrize("incoming_options", [SLOW])
def test_server_killed_and_restarted_mid_upload(
    app_page: Page, demo: Demo, incoming: Incoming, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "survivor.bin", 64 * MiB)
    upload(app_page, source, options=WS)
    wait(app_page, "window.ups[0] && window.ups[0].bytes_acked > 1024 * 1024")
    incoming.kill()
    wait(app_page, "window.ups[0].state_msg.includes('retrying')")
    acked = app_page.evaluate("() => window.ups[0].bytes_acked")
    assert acked < 64 * MiB  # killed mid-upload
    assert app_page.evaluate("() => window.ups[0].finished") is False
    incoming.start()
    wait(app_page, "window.ups[0].finished", timeout=120_000)
    assert sha256(demo.files / "survivor.bin") == sha256(source)


@TRANSPORTS
def test_unknown_ticket_shows_an_error(
    app_page: Page, tmp_path: Path, options: dict[str, str]
) -> None:
    app_page.set_input_files("#testfiles", str(random_file(tmp_path / "x.bin", 1000)))
    app_page.evaluate(
        """(options) => {
            const up = new incoming.Uploader("00000000-0000-4000-8000-000000000000",
                                             document.getElementById("testfiles").files[0],
                                             options);
            window.errors = [];
            up.onerror = (u) => window.errors.push([u.error_code, u.error_msg, u.state_msg]);
            window.unknown = up;
            up.start();
        }""",
        options,
    )
    wait(app_page, "window.errors.length > 0")
    assert app_page.evaluate("() => window.errors") == [
        [10, "unknown upload ticket", "Error: unknown upload ticket"]
    ]
    assert app_page.evaluate("() => [window.unknown.can_cancel, window.unknown.finished]") == [
        False,
        False,
    ]


def test_library_defines_one_global_and_loads_as_a_module(page: Page, incoming: Incoming) -> None:
    base = f"http://127.0.0.1:{incoming.port}"
    page.goto(f"{base}/incoming/frontend/incoming.js")  # any page of that origin will do
    added = page.evaluate(
        """async (url) => {
            const before = new Set(Object.getOwnPropertyNames(window));
            const script = document.createElement("script");
            script.src = url;
            await new Promise((ok, fail) => { script.onload = ok; script.onerror = fail;
                                              document.head.appendChild(script); });
            return Object.getOwnPropertyNames(window).filter(k => !before.has(k));
        }""",
        f"{base}/incoming/0.1/frontend/incoming.js",
    )
    assert added == ["incoming"]
    exported = page.evaluate(
        """async (url) => {
            const m = await import(url);
            return [typeof m.default.Uploader, typeof m.Uploader, typeof m.set_server_hostname,
                    typeof m.default.find_upload];
        }""",
        f"{base}/incoming/frontend/incoming.mjs",
    )
    assert exported == ["function", "function", "function", "function"]


# Over HTTP: one request carries the whole file; Chromium sends it at 4 MiB/s so the
# tests can act in the middle of it.
SLOW_UPLOAD = 4 * MiB


def test_http_pause_aborts_the_patch_and_resumes_from_head(
    app_page: Page, demo: Demo, incoming: Incoming, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "paused.bin", 8 * MiB)
    throttle(app_page, SLOW_UPLOAD)
    upload(app_page, source, behaviour="pause")
    wait(app_page, "window.ups[0] && window.ups[0].paused")
    state = app_page.evaluate(
        "() => { const u = window.ups[0];"
        " return [u.state_msg, u.bytes_acked, u.bytes_tx, u.connected, u.can_pause]; }"
    )
    # nothing acknowledged: the request was cut once 1 MiB had been sent
    assert state[:2] == ["Paused", 0] and state[2] >= MiB and state[3:] == [False, True]
    [part] = incoming.parts()
    kept = part.stat().st_size
    assert 0 < kept < 8 * MiB  # what arrived of the aborted request is stored all the same
    throttle(app_page, None)
    app_page.evaluate("() => window.ups[0].pause('unpause')")
    wait(app_page, "window.ups[0].finished")
    states = app_page.evaluate("() => window.states[0]")
    resumed = states[states.index(["Paused", 0]) + 1 :]
    assert resumed[0] == ["Connecting", 0]  # a plain creation asks for the offset
    assert resumed[1][0] == "Uploading" and resumed[1][1] >= kept  # from the server's offset
    assert sha256(demo.files / "paused.bin") == sha256(source)
    assert len(handovers(demo, app_page.evaluate("() => window.ups[0].ticket"))) == 1


@pytest.mark.parametrize("when", ["transferring", "paused"])
def test_http_cancel_is_a_delete(
    app_page: Page, demo: Demo, incoming: Incoming, tmp_path: Path, when: str
) -> None:
    throttle(app_page, SLOW_UPLOAD)
    upload(app_page, random_file(tmp_path / "c.bin", 8 * MiB),
           behaviour="cancel" if when == "transferring" else "pause")  # fmt: skip
    if when == "paused":
        wait(app_page, "window.ups[0] && window.ups[0].paused")
        assert app_page.evaluate(
            "() => { const u = window.ups[0]; u.cancel('changed my mind: trop lent 🐢 100%');"
            " return [u.cancelling, u.cancelled, u.state_msg, window.events]; }"
        ) == [True, False, "Cancelling", []]
    reason = (
        "cancelled by the test" if when == "transferring" else "changed my mind: trop lent 🐢 100%"
    )
    wait(app_page, "window.ups[0] && window.ups[0].cancelled")
    assert app_page.evaluate("() => [window.ups[0].cancelling, window.events]") == [
        False, [[0, "cancelled", f"Cancelled: {reason}"]],
    ]  # fmt: skip
    ticket = app_page.evaluate("() => window.ups[0].ticket")
    notice = cancel_notice(demo, ticket)
    # the page's reason reaches the backend (the DELETE's Incoming-Cancel-Reason)
    assert (notice["cancelled"], notice["cancelReason"]) == ("yes", reason)
    assert incoming.parts() == []
    assert not (demo.files / "c.bin").exists()
    assert (
        app_page.evaluate(
            "() => incoming.find_upload(document.getElementById('testfiles').files[0])"
        )
        is None
    )


def test_http_server_killed_and_restarted_mid_patch(
    app_page: Page, demo: Demo, incoming: Incoming, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "survivor.bin", 24 * MiB)
    throttle(app_page, SLOW_UPLOAD)
    upload(app_page, source)
    wait(app_page, "window.ups[0] && window.ups[0].bytes_tx > 2 * 1024 * 1024")
    incoming.kill()
    wait(app_page, "window.ups[0].state_msg.startsWith('Connection lost; retrying in')")
    assert app_page.evaluate("() => [window.ups[0].finished, window.ups[0].connected]") == [
        False, False,
    ]  # fmt: skip
    [part] = incoming.parts()
    kept = part.stat().st_size
    assert 0 < kept < 24 * MiB
    throttle(app_page, None)
    incoming.start()
    wait(app_page, "window.ups[0].finished", timeout=120_000)
    states = app_page.evaluate("() => window.states[0]")
    [uploading] = [s for s in states if s[0] == "Uploading" and s[1] > 0][:1]
    assert uploading[1] >= kept  # resumed from the server's offset
    assert sha256(demo.files / "survivor.bin") == sha256(source)
    assert len(handovers(demo, app_page.evaluate("() => window.ups[0].ticket"))) == 1


def test_http_reload_and_continue(
    app_page: Page, demo: Demo, incoming: Incoming, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "reloaded.bin", 24 * MiB)
    throttle(app_page, SLOW_UPLOAD)
    upload(app_page, source)
    ticket = app_page.evaluate("() => window.ups[0].ticket")
    wait(app_page, "window.ups[0].bytes_tx > 4 * 1024 * 1024")
    app_page.reload()  # mid-request
    app_page.evaluate(TEST_HOOKS)
    [part] = incoming.parts()
    throttle(app_page, None)
    upload(app_page, source, resume=True)  # the same file, picked again
    assert app_page.evaluate("() => window.ups[0].ticket") == ticket
    wait(app_page, "window.ups[0].finished")
    states = app_page.evaluate("() => window.states[0]")
    assert states[0] == ["Connecting", 0]
    assert states[1][0] == "Uploading" and states[1][1] > 0  # from the server's offset
    assert sha256(demo.files / "reloaded.bin") == sha256(source)
    [handover] = handovers(demo, ticket)
    assert handover["cancelled"] == "no"
    assert (
        app_page.evaluate(
            "() => incoming.find_upload(document.getElementById('testfiles').files[0])"
        )
        is None
    )
