"""The example integrations (examples/flask, examples/django, examples/express), each run
as its README says, beside the real server, and used from headless Chromium: a file
chosen on the page is uploaded through Incoming!!, handed over, moved into the example's
folder with its SHA-256 checked, and the page shows the example's verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from .conftest import ROOT, Incoming, Output, free_port, random_file, sha256, stop

MiB = 1024 * 1024
EXAMPLES = ["flask", "django", "express"]
# the page's own request for a ticket (Django's wants the CSRF token the page carries)
ASK_FOR_TICKET = """async () => {
    const headers = {"X-CSRFToken": document.body.dataset.csrf || ""};
    const answer = await fetch("/ticket", {method: "POST", headers});
    return (await answer.json()).ticket;
}"""


@dataclass
class Example:
    """One example app, started the way its README says, on a free loopback port."""

    name: str
    port: int
    data: Path  # its DATA_DIR: files/ and tickets/
    output: Output

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def files(self) -> Path:
        return self.data / "files"

    def kept(self, ticket: str) -> dict[str, str]:
        path = self.data / "tickets" / f"{ticket}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def post_handover(self, form: dict[str, str]) -> tuple[int, str]:
        """A handover POST as Incoming!! sends it."""
        request = urllib.request.Request(
            self.url + "handover", data=urllib.parse.urlencode(form).encode()
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read().decode()


def command(name: str, port: int) -> tuple[list[str], bytes]:
    """The README's command for the example, and what it prints once it listens."""
    if name == "flask":
        flask = [sys.executable, "-m", "flask", "--app", "app", "run"]
        return [*flask, "--host", "127.0.0.1", "--port", str(port)], rb"Running on http://127"
    if name == "django":
        return [sys.executable, "app.py", "runserver", "--noreload",
                f"127.0.0.1:{port}"], rb"Starting development server"  # fmt: skip
    return ["node", "server.js"], rb"listening on http://127\.0\.0\.1"


@pytest.fixture(params=EXAMPLES)
def example(
    request: pytest.FixtureRequest, tmp_path: Path, incoming: Incoming
) -> Iterator[Example]:
    name: str = request.param
    port = free_port()
    args, ready = command(name, port)
    data = tmp_path / f"{name}-data"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # `incoming.backend`, as `pip install incoming-server` gives
        "INCOMING_URL": f"http://127.0.0.1:{incoming.port}",
        "APP_URL": f"http://127.0.0.1:{port}",
        "DATA_DIR": str(data),
        "PORT": str(port),
    }
    process = subprocess.Popen(
        args, cwd=ROOT / "examples" / name, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    output = Output(process)
    try:
        output.wait_for(ready)
        yield Example(name, port, data, output)
    finally:
        stop(process)


def test_a_file_chosen_on_the_page_ends_in_the_examples_folder(
    page: Page, example: Example, incoming: Incoming, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "Résumé 2026 (final).pdf", 3 * MiB)
    digest = sha256(source)
    page.goto(example.url)
    page.set_input_files("#picker", str(source))
    row = page.locator("#uploads li")
    expect(row.locator("code")).to_have_text(digest, timeout=60_000)  # the verdict, shown
    link = row.locator("a")
    expect(link).to_have_text("Résumé 2026 (final).pdf")
    stored = example.files / "Résumé 2026 (final).pdf"
    assert stored.read_bytes() == source.read_bytes()
    assert list(example.files.iterdir()) == [stored]
    # moved out of Incoming!!'s storage (where only state files remain)
    assert [p.name for p in incoming.storage.iterdir() if "." not in p.name] == []
    # the example serves it back, under the URL of its verdict
    href = link.get_attribute("href")
    assert href is not None
    assert urllib.parse.unquote(href) == "/files/Résumé 2026 (final).pdf"
    downloaded = page.request.get(example.url.rstrip("/") + href)
    assert downloaded.status == 200 and downloaded.body() == source.read_bytes()
    # and kept the verdict it answered, for a handover that comes again
    [ticket_file] = (example.data / "tickets").glob("*.json")
    verdict = json.loads(example.kept(ticket_file.stem)["verdict"])
    assert verdict == {"url": href, "sha256": digest, "name": "Résumé 2026 (final).pdf"}


def test_the_examples_handover_checks_the_secret_the_file_and_answers_again(
    page: Page, example: Example, tmp_path: Path
) -> None:
    """Handovers as Incoming!! sends them: a wrong secret is refused (403), a file whose
    SHA-256 differs stays where it is (422: the handover fails), the right one is moved
    and answered `done` with the verdict, again the same when it comes again, and a
    cancel notice makes the example forget the ticket."""
    page.goto(example.url)
    ticket = page.evaluate(ASK_FOR_TICKET)
    secret = example.kept(ticket)["secret"]
    storage = tmp_path / "elsewhere"
    storage.mkdir()
    source = random_file(storage / ticket, 100_000)
    digest = sha256(source)
    form = {
        "id": ticket, "filename": str(source), "filenameFromBrowser": "../../etc/x.bin",
        "backendSecret": secret, "cancelled": "no", "cancelReason": "", "size": "100000",
        "sha256": digest,
    }  # fmt: skip
    assert example.post_handover({**form, "backendSecret": secret + "x"})[0] == 403
    assert example.post_handover({**form, "id": "../" + ticket})[0] in (400, 403)
    assert example.post_handover({**form, "sha256": "0" * 64})[0] == 422
    assert source.exists() and not any(example.files.glob("*"))
    status, answer = example.post_handover(form)
    assert status == 200 and answer.startswith("done\n"), answer
    assert json.loads(answer.partition("\n")[2]) == {
        "url": "/files/x.bin", "sha256": digest, "name": "x.bin",
    }  # fmt: skip
    assert sha256(example.files / "x.bin") == digest and not source.exists()
    assert example.post_handover(form) == (status, answer)  # at least once: the same answer
    assert [p.name for p in example.files.iterdir()] == ["x.bin"]
    # another upload, cancelled (by the browser, say): its ticket is forgotten
    other = page.evaluate(ASK_FOR_TICKET)
    other_form = {**form, "id": other, "backendSecret": example.kept(other)["secret"]}
    cancelled = {**other_form, "cancelled": "yes", "filename": "", "cancelReason": "by the user"}
    assert example.post_handover(cancelled) == (200, "ok")
    assert example.kept(other) == {}
    assert example.post_handover(other_form)[0] == 403
