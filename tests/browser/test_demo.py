"""The demo web app, used as a person would: click, choose, pause, resume, download.

The demo uploads over HTTP (incoming.js's default); Chromium's upload is slowed
down (4 MiB/s) until the test has acted mid-upload. Its backend checks the
handover's sha256 and sends the page its verdict, which the page shows. What the
row showed is recorded at each change (`watch`).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from .conftest import Demo, random_file, sha256, throttle

MiB = 1024 * 1024
SLOW_UPLOAD = 4 * MiB
UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}  # as the page writes them
WATCH = """() => {
    window.shown = [];  // [state, rate, eta] of the first row, at each change
    new MutationObserver(() => {
        const row = document.querySelector(".upload");
        if (row) {
            const text = (name) => row.querySelector(name).textContent;
            window.shown.push([text(".state"), text(".rate"), text(".eta")]);
        }
    }).observe(document.getElementById("uploads"),
               {subtree: true, childList: true, characterData: true});
}"""


def watch(page: Page) -> None:
    """Records what the row shows from now on (window.shown)."""
    page.evaluate(WATCH)


def shown(page: Page) -> list[list[str]]:
    rows: list[list[str]] = page.evaluate("() => window.shown")
    return rows


def bytes_per_s(rate: str) -> float:
    number, unit = rate.removesuffix("/s").split()
    return float(number) * UNITS[unit]


def handovers_of(demo: Demo) -> list[dict[str, str]]:
    with urllib.request.urlopen(f"{demo.url}api/events") as response:
        events: list[dict[str, str]] = json.load(response)
        return events


def handovers(demo: Demo, ticket: str) -> list[dict[str, str]]:
    return [e for e in handovers_of(demo) if e["id"] == ticket]


@pytest.mark.parametrize("handover_mode", ["done", "wait"])
def test_demo_page_end_to_end(page: Page, demo: Demo, tmp_path: Path, handover_mode: str) -> None:
    source = random_file(tmp_path / "holiday video.mp4", 12 * MiB)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    asked: list[str] = []  # what the page asks the web app for
    page.on("request", lambda r: r.url.startswith(demo.url) and asked.append(r.url))
    page.goto(demo.url)
    throttle(page, SLOW_UPLOAD)
    watch(page)
    expect(page.locator("#files")).to_have_text("No files yet.")
    with page.expect_file_chooser() as chooser:
        page.click("#drop")
    chooser.value.set_files(str(source))
    row = page.locator(".upload")
    expect(row.locator(".name")).to_have_text("holiday video.mp4")
    expect(row.locator(".rate")).to_contain_text("/s")
    expect(row.locator(".eta")).to_contain_text("left")
    expect(row.locator(".note")).to_be_hidden()
    if os.environ.get("INCOMING_SCREENSHOT"):
        page.screenshot(path=os.environ["INCOMING_SCREENSHOT"])
    row.locator("button.pause").click()
    expect(row.locator(".state")).to_have_text("Paused")
    expect(row.locator("button.pause")).to_have_text("Resume")
    progress = float(row.locator("progress").get_attribute("value") or 0)
    assert 0 < progress < 1
    throttle(page, 4 * SLOW_UPLOAD)  # faster, still moving for a while before the handover
    row.locator("button.pause").click()
    expect(row.locator(".state")).to_have_text("Finished", timeout=60_000)
    # sent, handed over: no speed nor time left while bytes do not move
    handing_over = [r for r in shown(page) if r[0] == "Handing over"]
    assert handing_over and all(r[1:] == ["", ""] for r in handing_over), handing_over
    # nothing left to pause or cancel; the size stays
    expect(row.locator("button.pause")).to_be_hidden()
    expect(row.locator("button.cancel")).to_be_hidden()
    expect(row.locator(".size")).to_have_text("12.6 MB")
    expect(row.locator(".rate")).to_have_text("")
    expect(row.locator(".eta")).to_have_text("")
    assert row.locator("progress").get_attribute("value") == "1"
    # the web app's verdict (done + JSON, or finish_upload's result after wait), shown
    result = page.evaluate("() => document.querySelector('.upload').uploader.result")
    assert json.loads(result) == {
        "url": "/files/holiday%20video.mp4", "size": 12 * MiB, "sha256": digest,
        "name": "holiday video.mp4",
    }  # fmt: skip
    received = row.locator(".received")
    expect(received).to_contain_text("(12.6 MB)")
    expect(received.locator(".sha256")).to_have_text(digest)
    link = received.locator("a")
    expect(link).to_have_text("holiday video.mp4")
    assert link.get_attribute("href") == "/files/holiday%20video.mp4"
    expect(page.locator("#files a")).to_have_text("holiday video.mp4")  # listed from it too
    assert page.locator("#files a").get_attribute("href") == "/files/holiday%20video.mp4"
    # not from the web app's list of files: that was asked for once, when the page loaded
    assert [u for u in asked if "/api/files" in u] == [f"{demo.url}api/files"]
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / "downloaded"
    download.value.save_as(saved)
    assert sha256(saved) == digest == sha256(demo.files / "holiday video.mp4")
    [handover] = [e for e in handovers_of(demo) if e["cancelled"] == "no"]
    assert handover["sha256"] == digest


def test_demo_cancel_button(page: Page, demo: Demo, tmp_path: Path) -> None:
    page.goto(demo.url)
    throttle(page, SLOW_UPLOAD)
    page.set_input_files("#picker", str(random_file(tmp_path / "big.iso", 12 * MiB)))
    row = page.locator(".upload")
    expect(row.locator(".rate")).to_contain_text("/s")
    row.locator("button.cancel").click()
    expect(row.locator(".error")).to_have_text("Cancelled: cancelled on the demo page")
    expect(row.locator("button.pause")).to_be_hidden()
    expect(row.locator("button.cancel")).to_be_hidden()
    expect(row.locator(".rate")).to_have_text("")
    expect(page.locator("#files")).to_have_text("No files yet.")


@pytest.mark.parametrize("restart", [False, True], ids=["reload", "reload-and-backend-restart"])
def test_demo_continues_an_upload_after_a_reload(
    page: Page, demo: Demo, tmp_path: Path, restart: bool
) -> None:
    source = random_file(tmp_path / "film.mkv", 24 * MiB)
    page.goto(demo.url)
    throttle(page, SLOW_UPLOAD)
    page.set_input_files("#picker", str(source))
    row = page.locator(".upload")
    expect(row.locator(".rate")).to_contain_text("/s")
    ticket = row.get_attribute("data-ticket")
    assert ticket
    page.wait_for_function("() => document.querySelector('.upload').uploader.bytes_tx > 6 << 20")
    if restart:
        demo.restart()  # the ticket's secret must survive it
    page.reload()  # mid-PATCH
    watch(page)
    page.set_input_files("#picker", str(source))  # the same file, chosen again
    expect(row.locator(".note")).to_have_text("Continuing the upload this browser started before")
    assert row.get_attribute("data-ticket") == ticket  # no new ticket
    page.wait_for_function(
        "() => document.querySelector('.upload').uploader.state_msg === 'Uploading'"
    )
    resumed_at = page.evaluate("() => document.querySelector('.upload').uploader.bytes_acked")
    assert 6 * MiB < resumed_at < 24 * MiB  # the server's offset
    # still at 4 MiB/s: the speed counts the bytes sent since, not the offset resumed from
    page.wait_for_function("() => window.shown.filter((r) => r[1]).length >= 10")
    rates = [bytes_per_s(r[1]) for r in shown(page) if r[1]]
    assert max(rates) < 1.5 * SLOW_UPLOAD, rates
    throttle(page, None)
    expect(row.locator(".state")).to_have_text("Finished", timeout=60_000)
    expect(page.locator("#files a")).to_have_text("film.mkv")
    assert sha256(demo.files / "film.mkv") == sha256(source)
    [handover] = handovers(demo, ticket)
    assert handover["cancelled"] == "no"
    # finished: a third choice of the file is a new upload with a new ticket
    page.reload()
    page.set_input_files("#picker", str(source))
    expect(row.locator(".state")).to_have_text("Finished")
    assert row.get_attribute("data-ticket") not in (None, ticket)
    expect(row.locator(".note")).to_be_hidden()


def post_handover(demo: Demo, form: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(
        f"{demo.url}handover", data=urllib.parse.urlencode(form).encode()
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_demo_backend_refuses_a_file_whose_sha256_differs(demo: Demo, tmp_path: Path) -> None:
    """A handover as Incoming!! sends it, but with another file's SHA-256: the handover
    fails (not `done` nor `wait`), the file is not kept and the mismatch is logged. Without
    a sha256 (Incoming!! with --checksum none) the demo's own digest is the verdict's."""
    with urllib.request.urlopen(
        urllib.request.Request(f"{demo.url}api/ticket", method="POST")
    ) as r:
        ticket = json.load(r)["ticket"]
    secret = json.loads((tmp_path / "secrets.json").read_text())["secrets"][ticket]
    stored = random_file(tmp_path / "stored", 100_000)
    form = {
        "id": ticket,
        "filename": str(stored),
        "filenameFromBrowser": "x.bin",
        "backendSecret": secret,
        "cancelled": "no",
        "cancelReason": "",
        "size": "100000",
    }
    digest = sha256(stored)
    status, text = post_handover(demo, {**form, "sha256": "0" * 64})
    assert (status, text) == (422, "the file's SHA-256 does not match")
    assert list(demo.files.iterdir()) == []
    assert demo.output is not None
    demo.output.wait_for(rf"upload {ticket} refused: SHA-256 {digest} of the file ".encode())
    stored = random_file(tmp_path / "stored", 100_000)
    digest = sha256(stored)
    status, text = post_handover(demo, form)  # no sha256
    assert status == 200 and text.startswith("done\n")
    assert json.loads(text.partition("\n")[2]) == {
        "url": "/files/x.bin", "size": 100_000, "sha256": digest, "name": "x.bin",
    }  # fmt: skip
    assert sha256(demo.files / "x.bin") == digest
    again_status, again = post_handover(demo, form)  # the same handover again: at least once
    assert (again_status, again) == (status, text)
    assert [p.name for p in demo.files.iterdir()] == ["x.bin"]
