"""Flask and Incoming!!: the page uploads files through Incoming!!; this app gets each
one by the handover, keeps it in its own folder and serves it. See README.md."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote, urlsplit

from flask import Flask, render_template, request, send_from_directory

from incoming.backend import (
    ANSWER_CONTENT_TYPE,
    Client,
    HandoverRefused,
    answer_done,
    move_file,
    read_handover,
)

INCOMING_URL = os.environ.get("INCOMING_URL", "http://127.0.0.1:4000")  # as this app reaches it
INCOMING_PUBLIC = os.environ.get("INCOMING_PUBLIC", urlsplit(INCOMING_URL).netloc)  # as browsers do
APP_URL = os.environ.get("APP_URL", "http://127.0.0.1:5000")  # as Incoming!! reaches this app
DATA = Path(os.environ.get("DATA_DIR", "data")).resolve()
FILES, TICKETS = DATA / "files", DATA / "tickets"

app = Flask(__name__)
incoming = Client(INCOMING_URL)


# Per ticket, the app keeps its secret and, once it has the file, its verdict. A real app
# keeps them in its database; here one small JSON file per ticket.
def kept(ticket: str) -> dict[str, str]:
    path = TICKETS / f"{ticket}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def keep(ticket: str, **values: str) -> None:
    TICKETS.mkdir(parents=True, exist_ok=True)
    new = TICKETS / f"{ticket}.new"
    new.write_text(json.dumps({**kept(ticket), **values}))
    new.replace(TICKETS / f"{ticket}.json")


@app.get("/")
def page() -> str:
    return render_template("index.html", incoming=INCOMING_PUBLIC)


@app.post("/ticket")
def ticket() -> dict[str, str]:
    # A real app checks here who may upload (a signed-in user, a quota...).
    new = incoming.new_upload(f"{APP_URL}/handover", remove_file_when_finished=False)
    keep(new.id, secret=new.secret)
    return {"ticket": new.id}


@app.post("/handover")
def handover() -> tuple[bytes | str, int, dict[str, str]]:
    text = {"Content-Type": ANSWER_CONTENT_TYPE}
    try:
        upload = read_handover(request.form, lambda ticket: kept(ticket).get("secret"))
        if upload.cancelled:  # by the browser, an idle timeout or an error
            (TICKETS / f"{upload.id}.json").unlink(missing_ok=True)
            return "ok", 200, text
        verdict = kept(upload.id).get("verdict")  # handovers come at least once
        if verdict is None:
            stored = move_file(upload, FILES)  # its SHA-256 checked
            verdict = json.dumps(
                {"url": f"/files/{quote(stored.name)}", "sha256": stored.sha256,
                 "name": stored.name}
            )  # fmt: skip
            keep(upload.id, verdict=verdict)
    except HandoverRefused as e:  # not from Incoming!!, or not the announced file
        return str(e), e.status, text
    return answer_done(verdict), 200, text  # the page gets the verdict as `result`


@app.get("/files/<name>")
def download(name: str) -> object:
    return send_from_directory(FILES, name, as_attachment=True)
