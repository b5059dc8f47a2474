"""Django and Incoming!!, in one file: the page uploads files through Incoming!!; this
app gets each one by the handover, keeps it in its own folder and serves it. See
README.md; run it with `python app.py runserver`."""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from urllib.parse import quote, urlsplit

from django.conf import settings

from incoming.backend import (
    ANSWER_CONTENT_TYPE,
    Client,
    HandoverRefused,
    answer_done,
    move_file,
    read_handover,
    safe_name,
)

INCOMING_URL = os.environ.get("INCOMING_URL", "http://127.0.0.1:4000")  # as this app reaches it
INCOMING_PUBLIC = os.environ.get("INCOMING_PUBLIC", urlsplit(INCOMING_URL).netloc)  # as browsers do
APP_URL = os.environ.get("APP_URL", "http://127.0.0.1:8000")  # as Incoming!! reaches this app
DATA = Path(os.environ.get("DATA_DIR", "data")).resolve()
FILES, TICKETS = DATA / "files", DATA / "tickets"

settings.configure(
    ROOT_URLCONF=__name__,
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(40),
    ALLOWED_HOSTS=[urlsplit(APP_URL).hostname, "127.0.0.1", "localhost"],
    MIDDLEWARE=["django.middleware.common.CommonMiddleware",
                "django.middleware.csrf.CsrfViewMiddleware"],
    TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates",
                "DIRS": [Path(__file__).resolve().parent / "templates"]}],
)  # fmt: skip

from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.shortcuts import render  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402
from django.views.decorators.http import require_GET, require_POST  # noqa: E402

incoming = Client(INCOMING_URL)


# Per ticket, the app keeps its secret and, once it has the file, its verdict. A real app
# keeps them in a model; here one small JSON file per ticket.
def kept(ticket: str) -> dict[str, str]:
    file = TICKETS / f"{ticket}.json"
    return json.loads(file.read_text()) if file.exists() else {}


def keep(ticket: str, **values: str) -> None:
    TICKETS.mkdir(parents=True, exist_ok=True)
    new = TICKETS / f"{ticket}.new"
    new.write_text(json.dumps({**kept(ticket), **values}))
    new.replace(TICKETS / f"{ticket}.json")


@require_GET
def page(request: HttpRequest) -> HttpResponse:
    return render(request, "index.html", {"incoming": INCOMING_PUBLIC})


@require_POST
def ticket(request: HttpRequest) -> JsonResponse:  # the page sends the CSRF token
    # A real app checks here who may upload (request.user, a quota...).
    new = incoming.new_upload(f"{APP_URL}/handover", remove_file_when_finished=False)
    keep(new.id, secret=new.secret)
    return JsonResponse({"ticket": new.id})


@csrf_exempt  # Incoming!! calls it, not a browser: the backendSecret is the check
@require_POST
def handover(request: HttpRequest) -> HttpResponse:
    try:
        upload = read_handover(request.POST, lambda ticket: kept(ticket).get("secret"))
        if upload.cancelled:  # by the browser, an idle timeout or an error
            (TICKETS / f"{upload.id}.json").unlink(missing_ok=True)
            return HttpResponse("ok", content_type=ANSWER_CONTENT_TYPE)
        verdict = kept(upload.id).get("verdict")  # handovers come at least once
        if verdict is None:
            stored = move_file(upload, FILES)  # its SHA-256 checked
            verdict = json.dumps(
                {"url": f"/files/{quote(stored.name)}", "sha256": stored.sha256,
                 "name": stored.name}
            )  # fmt: skip
            keep(upload.id, verdict=verdict)
    except HandoverRefused as e:  # not from Incoming!!, or not the announced file
        return HttpResponse(str(e), status=e.status, content_type=ANSWER_CONTENT_TYPE)
    # the page gets the verdict as the uploader's `result`
    return HttpResponse(answer_done(verdict), content_type=ANSWER_CONTENT_TYPE)


@require_GET
def download(request: HttpRequest, name: str) -> FileResponse:
    file = FILES / name
    if safe_name(name) != name or not file.is_file():  # only names move_file gives
        raise Http404("no such file")
    return FileResponse(file.open("rb"), as_attachment=True, filename=name)


urlpatterns = [
    path("", page),
    path("ticket", ticket),
    path("handover", handover),
    path("files/<str:name>", download),
]

if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
