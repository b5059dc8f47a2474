"""The demo web app, used as a person would: click, choose, pause, resume, download."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from .conftest import Demo, random_file, sha256
from .test_uploads import SLOW

MiB = 1024 * 1024


@pytest.mark.parametrize("incoming_options", [SLOW])
@pytest.mark.parametrize("handover_mode", ["done", "wait"])
def test_demo_page_end_to_end(page: Page, demo: Demo, tmp_path: Path, handover_mode: str) -> None:
    source = random_file(tmp_path / "holiday video.mp4", 12 * MiB)
    page.goto(demo.url)
    expect(page.locator("#files")).to_have_text("No files yet.")
    with page.expect_file_chooser() as chooser:
        page.click("#drop")
    chooser.value.set_files(str(source))
    row = page.locator(".upload")
    expect(row.locator(".name")).to_have_text("holiday video.mp4")
    expect(row.locator(".rate")).to_contain_text("/s")
    expect(row.locator(".eta")).to_contain_text("left")
    if os.environ.get("INCOMING_SCREENSHOT"):
        page.screenshot(path=os.environ["INCOMING_SCREENSHOT"])
    row.locator("button.pause").click()
    expect(row.locator(".state")).to_have_text("Paused")
    expect(row.locator("button.pause")).to_have_text("Resume")
    progress = float(row.locator("progress").get_attribute("value") or 0)
    assert 0 < progress < 1
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


@pytest.mark.parametrize("incoming_options", [SLOW])
def test_demo_cancel_button(page: Page, demo: Demo, tmp_path: Path) -> None:
    page.goto(demo.url)
    page.set_input_files("#picker", str(random_file(tmp_path / "big.iso", 12 * MiB)))
    row = page.locator(".upload")
    expect(row.locator(".rate")).to_contain_text("/s")
    row.locator("button.cancel").click()
    expect(row.locator(".error")).to_have_text("Cancelled: cancelled on the demo page")
    expect(row.locator("button.pause")).to_be_disabled()
    expect(page.locator("#files")).to_have_text("No files yet.")
