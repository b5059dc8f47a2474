"""incoming.js in headless Chromium against the real server (SPEC: Browser library)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Page

from .conftest import Demo, Incoming, random_file, sha256

MiB = 1024 * 1024
SLOW = ["--chunk-size-kb", "16", "--send-ahead", "1"]  # many round trips: time to act mid-way


def demo_events(demo: Demo) -> list[dict[str, str]]:
    with urllib.request.urlopen(f"{demo.url}api/events") as response:
        events: list[dict[str, str]] = json.load(response)
        return events


def upload(page: Page, *paths: Path, behaviour: str | None = None) -> list[int]:
    page.set_input_files("#testfiles", [str(p) for p in paths])
    return [
        page.evaluate("([i, b]) => startUpload(i, b)", [i, behaviour]) for i in range(len(paths))
    ]


def wait(page: Page, condition: str, timeout: float = 60_000) -> None:
    page.wait_for_function(f"() => {condition}", timeout=timeout)


def test_50_mib_file_arrives_byte_identical(app_page: Page, demo: Demo, tmp_path: Path) -> None:
    source = random_file(tmp_path / "fifty.bin", 50 * MiB)
    upload(app_page, source)
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


def test_three_files_at_once(app_page: Page, demo: Demo, tmp_path: Path) -> None:
    sources = [random_file(tmp_path / f"f{i}.bin", (i + 1) * 3 * MiB + i) for i in range(3)]
    upload(app_page, *sources)
    wait(app_page, "window.ups.length === 3 && window.ups.every(u => u.finished)")
    tickets = app_page.evaluate("() => window.ups.map(u => u.ticket)")
    assert len(set(tickets)) == 3
    for source in sources:
        assert sha256(demo.files / source.name) == sha256(source)


@pytest.mark.parametrize("incoming_options", [SLOW])
def test_pause_then_resume(app_page: Page, demo: Demo, incoming: Incoming, tmp_path: Path) -> None:
    source = random_file(tmp_path / "paused.bin", 8 * MiB)
    upload(app_page, source, behaviour="pause")
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
    upload(app_page, random_file(tmp_path / "c.bin", 8 * MiB), behaviour="cancel")
    wait(app_page, "window.ups[0] && window.ups[0].cancelled")
    up = app_page.evaluate(
        "() => [window.ups[0].cancel_msg, window.ups[0].cancelling, window.events]"
    )
    assert up[0] == "cancelled by the test" and up[1] is False
    assert up[2] == [[0, "cancelled", "Cancelled: cancelled by the test"]]
    ticket = app_page.evaluate("() => window.ups[0].ticket")
    [notice] = [e for e in demo_events(demo) if e["id"] == ticket]
    assert (notice["cancelled"], notice["cancelReason"]) == ("yes", "cancelled by the test")
    assert incoming.parts() == []
    assert not (demo.files / "c.bin").exists()


@pytest.mark.parametrize("incoming_options", [SLOW])
def test_cancel_while_paused(
    app_page: Page, demo: Demo, incoming: Incoming, tmp_path: Path
) -> None:
    upload(app_page, random_file(tmp_path / "p.bin", 8 * MiB), behaviour="pause")
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
    [notice] = [e for e in demo_events(demo) if e["id"] == ticket]
    assert (notice["cancelled"], notice["cancelReason"]) == ("yes", "changed my mind")
    assert incoming.parts() == []


@pytest.mark.parametrize("incoming_options", [SLOW])
def test_server_killed_and_restarted_mid_upload(
    app_page: Page, demo: Demo, incoming: Incoming, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "survivor.bin", 64 * MiB)
    upload(app_page, source)
    wait(app_page, "window.ups[0] && window.ups[0].bytes_acked > 1024 * 1024")
    incoming.kill()
    wait(app_page, "window.ups[0].state_msg.includes('retrying')")
    acked = app_page.evaluate("() => window.ups[0].bytes_acked")
    assert acked < 64 * MiB  # killed mid-upload
    assert app_page.evaluate("() => window.ups[0].finished") is False
    incoming.start()
    wait(app_page, "window.ups[0].finished", timeout=120_000)
    assert sha256(demo.files / "survivor.bin") == sha256(source)


def test_unknown_ticket_shows_an_error(app_page: Page, tmp_path: Path) -> None:
    app_page.set_input_files("#testfiles", str(random_file(tmp_path / "x.bin", 1000)))
    app_page.evaluate(
        """() => {
            const up = new incoming.Uploader("00000000-0000-4000-8000-000000000000",
                                             document.getElementById("testfiles").files[0]);
            window.errors = [];
            up.onerror = (u) => window.errors.push([u.error_code, u.error_msg, u.state_msg]);
            window.unknown = up;
            up.start();
        }"""
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
            return [typeof m.default.Uploader, typeof m.Uploader, typeof m.set_server_hostname];
        }""",
        f"{base}/incoming/frontend/incoming.mjs",
    )
    assert exported == ["function", "function", "function"]
