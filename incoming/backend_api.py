"""The backend's side (SPEC: Backend HTTP API): tickets, cancel and finish, and monitoring."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from klein import Klein
from twisted.web.iweb import IRequest

from .access import Access, Caller, caller_of
from .errors import ErrorCode, UploadError
from .handover import MAX_RESULT_BYTES
from .manager import UploadManager
from .metrics import CONTENT_TYPE, Metrics
from .upload import Upload

TEXT = "text/plain; charset=utf-8"
_BOOLEANS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}
_STATUS_FOR = {
    ErrorCode.REGISTRY_UNAVAILABLE: 503,
    ErrorCode.STORAGE_FULL: 507,
    ErrorCode.ALREADY_CONNECTED: 503,  # an instance holding it did not answer: try again
    ErrorCode.UNKNOWN_TICKET: 400,
    ErrorCode.TOO_LATE: 412,
    ErrorCode.TICKET_CANCELLED: 412,
    ErrorCode.NOT_WAITING: 412,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BackendApi:
    """`PREFIX/backend/...`: what a web app's backend calls; also metrics and health.

    `guarded`: the listener serves browsers too, so the API and the metrics answer only
    the callers `access` allows (a listener of the backend's own answers all).
    """

    app = Klein()

    def __init__(
        self, manager: UploadManager, metrics: Metrics, access: Access, guarded: bool
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self.access = access
        self.guarded = guarded

    @app.handle_errors(ApiError)
    def api_error(self, request: IRequest, failure: Any) -> bytes:
        error: ApiError = failure.value
        request.setResponseCode(error.status)
        return text(request, error.message)

    @app.route("/backend/new_upload", methods=["POST"])
    async def new_upload(self, request: IRequest) -> bytes:
        caller = self._check_caller(request)
        params = _params(request)
        url = params.get("signalFinishURL", "")
        if not url:
            raise ApiError(400, "signalFinishURL is required")
        host = _checked_host(url)
        if (params.get("destType") or "file") != "file":
            raise ApiError(400, "destType must be 'file'")
        remove = _BOOLEANS.get(params.get("removeFileWhenFinished") or "true")
        if remove is None:
            raise ApiError(400, "removeFileWhenFinished must be a boolean such as true or false")
        refusal = await self.access.handover_refusal(host, caller)
        if refusal is not None:
            raise ApiError(400, refusal)
        try:
            with _as_api_error():
                upload = await self.manager.create(url, params.get("backendSecret", ""), remove)
        except OSError:
            raise ApiError(507, "cannot store the upload's state; is the storage full?") from None
        return text(request, upload.id)

    @app.route("/backend/cancel_upload", methods=["POST"])
    async def cancel_upload(self, request: IRequest) -> bytes:
        self._check_caller(request)
        upload = await self._authorised(request)
        with _as_api_error():  # answered once the file is gone
            await self.manager.command(upload.id, "cancel_by_backend")
        return text(request, "ok")

    @app.route("/backend/finish_upload", methods=["POST"])
    async def finish_upload(self, request: IRequest) -> bytes:
        self._check_caller(request)
        upload = await self._authorised(request)
        result = _params(request).get("result", "")
        if len(result.encode("utf-8")) > MAX_RESULT_BYTES:
            raise ApiError(400, f"result is longer than {MAX_RESULT_BYTES} bytes")
        with _as_api_error():
            await self.manager.command(upload.id, "finish_upload", result)
        return text(request, "ok")

    @app.route("/metrics", methods=["GET"])
    def metrics_text(self, request: IRequest) -> bytes:
        self._check_caller(request)
        request.setHeader("content-type", CONTENT_TYPE)
        return self.metrics.render()

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        if not self.manager.registry_reachable:  # cluster: new uploads are refused here
            request.setResponseCode(503)
            return text(request, "redis unavailable")
        return text(request, "ok")

    def _check_caller(self, request: IRequest) -> Caller:
        caller = caller_of(request)
        if self.guarded and not self.access.may_call(caller):
            raise ApiError(
                403,
                f"not open to {caller.describe()}: the backend API answers this host and "
                "--backend-networks",
            )
        return caller

    async def _authorised(self, request: IRequest) -> Upload:
        params = _params(request)
        upload_id = params.get("id")
        if not upload_id:
            raise ApiError(400, "id is required")
        with _as_api_error():
            upload = await self.manager.find(upload_id)
        if upload is None:
            raise ApiError(400, "unknown upload id")
        secret = params.get("backendSecret", "")
        if not hmac.compare_digest(secret.encode(), upload.backend_secret.encode()):
            raise ApiError(403, "wrong backendSecret")
        return upload


@contextmanager
def _as_api_error() -> Iterator[None]:
    """An UploadError raised by an upload's life, as the API's HTTP answer."""
    try:
        yield
    except UploadError as e:
        raise ApiError(_STATUS_FOR.get(e.code, 400), e.message) from None


def text(request: IRequest, text: str) -> bytes:
    body = text.encode("utf-8")
    request.setHeader("content-type", TEXT)
    request.setHeader("content-length", str(len(body)))
    return body


def _params(request: IRequest) -> dict[str, str]:
    """Form values from the query string and an urlencoded body; the body's win."""
    query = request.uri.partition(b"?")[2]
    body = b""
    content_type = request.getHeader("content-type") or ""
    if content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        request.content.seek(0)
        body = request.content.read()
    try:
        pairs = [*parse_qsl(query.decode(), True, True), *parse_qsl(body.decode(), True, True)]
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "parameters must be UTF-8 form values") from None
    return dict(pairs)


def _checked_host(url: str) -> str:
    """The host of a valid signalFinishURL."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ApiError(400, "signalFinishURL is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise ApiError(400, "signalFinishURL must be an absolute http or https URL")
    if not parts.hostname:
        raise ApiError(400, "signalFinishURL has no host")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ApiError(400, "signalFinishURL contains whitespace or control characters")
    return parts.hostname
