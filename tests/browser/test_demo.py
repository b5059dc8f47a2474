"""The demo web app, used as a person would: click, choose, pause, resume, download.

The demo uploads over HTTP (incoming.js's default); Chromium's upload is slowed
down (4 MiB/s) until the test has acted mid-upload.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from .conftest import Demo, random_file, sha256, throttle

MiB = 1024 * 1024
SLOW_UPLOAD = 4 * MiB


def handovers(demo: Demo, ticket: str) -> list[dict[str, str]]:
    with urllib.request.urlopen(f"{demo.url}api/events") as response:
        return [e for e in json.load(response) if e["id"] == ticket]


@pytest.mark.parametrize("handover_mode", ["done", "wait"])
def test_demo_page_end_to_end(page: Page, demo: Demo, tmp_path: Path, handover_mode: str) -> None:
    source = random_file(tmp_path / "holiday video.mp4", 12 * MiB)
    page.goto(demo.url)
    throttle(page, SLOW_UPLOAD)
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
    throttle(page, None)
    row.locator("button.pause").click()
    expect(row.locator(".state")).to_have_text("Finished", timeout=60_000)
    expect(row.locator("button.cancel")).to_be_disabled()
    link = page.locator("#files a")
    expect(link).to_have_text("holiday video.mp4")
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / "downloaded"
    download.value.save_as(saved)
    assert sha256(saved) == sha256(source) == sha256(demo.files / "holiday video.mp4")


def test_demo_cancel_button(page: Page, demo: Demo, tmp_path: Path) -> None:
    page.goto(demo.url)
    throttle(page, SLOW_UPLOAD)
    page.set_input_files("#picker", str(random_file(tmp_path / "big.iso", 12 * MiB)))
    row = page.locator(".upload")
    expect(row.locator(".rate")).to_contain_text("/s")
    row.locator("button.cancel").click()
    expect(row.locator(".error")).to_have_text("Cancelled: cancelled on the demo page")
    expect(row.locator("button.pause")).to_be_disabled()
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
    if restart:
        demo.restart()  # the ticket's secret must survive it
    page.reload()  # mid-PATCH
    page.set_input_files("#picker", str(source))  # the same file, chosen again
    expect(row.locator(".note")).to_have_text("Continuing the upload this browser started before")
    assert row.get_attribute("data-ticket") == ticket  # no new ticket
    page.wait_for_function(
        "() => document.querySelector('.upload').uploader.state_msg === 'Uploading'"
    )
    resumed_at = page.evaluate("() => document.querySelector('.upload').uploader.bytes_acked")
    assert 0 < resumed_at < 24 * MiB  # the server's offset
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
