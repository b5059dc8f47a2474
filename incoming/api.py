"""HTTP routes: the backend API, the browser library and the WebSocket endpoint."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from klein import Klein
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from .manager import UploadManager
from .uploads import ErrorCode, Upload, UploadError

PREFIXES = ("/incoming", "/incoming/0.1")
TEXT = "text/plain; charset=utf-8"
_BOOLEANS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}
_STATUS_FOR = {
    ErrorCode.UNKNOWN_TICKET: 400,
    ErrorCode.TOO_LATE: 412,
    ErrorCode.UNEXPECTED_MESSAGE: 412,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def route(app: Klein, path: str, **options: Any) -> Callable[[Any], Any]:
    """Register a route under both URL prefixes."""

    def register(handler: Any) -> Any:
        for prefix in PREFIXES:
            endpoint = f"{handler.__name__}:{prefix}"
            app.route(prefix + path, endpoint=endpoint, **options)(handler)
        return handler

    return register


class IncomingApi:
    """Klein application; every collaborator comes in through the constructor."""

    app = Klein()

    def __init__(
        self,
        manager: UploadManager,
        script: IResource,
        module: IResource,
        upload_ws: IResource,
    ) -> None:
        self.manager = manager
        self.script = script
        self.module = module
        self.upload_ws = upload_ws

    @app.handle_errors(ApiError)
    def api_error(self, request: IRequest, failure: Any) -> bytes:
        error: ApiError = failure.value
        request.setResponseCode(error.status)
        request.setHeader("content-type", TEXT)
        return error.message.encode("utf-8")

    @route(app, "/backend/new_upload", methods=["POST"])
    async def new_upload(self, request: IRequest) -> bytes:
        params = _params(request)
        url = params.get("signalFinishURL", "")
        if not url:
            raise ApiError(400, "signalFinishURL is required")
        _check_url(url)
        if (params.get("destType") or "file") != "file":
            raise ApiError(400, "destType must be 'file'")
        remove = _BOOLEANS.get(params.get("removeFileWhenFinished") or "true")
        if remove is None:
            raise ApiError(400, "removeFileWhenFinished must be a boolean such as true or false")
        try:
            upload = await self.manager.create(url, params.get("backendSecret", ""), remove)
        except OSError:
            raise ApiError(507, "cannot store the upload's state; is the storage full?") from None
        return _ok(request, upload.id)

    @route(app, "/backend/cancel_upload", methods=["POST"])
    async def cancel_upload(self, request: IRequest) -> bytes:
        upload = self._authorised(request)
        await _as_api_error(self.manager.cancel_by_backend(upload))
        return _ok(request, "ok")

    @route(app, "/backend/finish_upload", methods=["POST"])
    async def finish_upload(self, request: IRequest) -> bytes:
        upload = self._authorised(request)
        await _as_api_error(self.manager.finish_upload(upload))
        return _ok(request, "ok")

    @route(app, "/frontend/incoming.js", methods=["GET", "HEAD"])
    def incoming_js(self, request: IRequest) -> IResource:
        return self.script

    @route(app, "/frontend/incoming.mjs", methods=["GET", "HEAD"])
    def incoming_mjs(self, request: IRequest) -> IResource:
        return self.module

    @route(app, "/frontend/upload_ws", methods=["GET"])
    def upload_ws_route(self, request: IRequest) -> IResource:
        return self.upload_ws

    def _authorised(self, request: IRequest) -> Upload:
        params = _params(request)
        upload_id = params.get("id")
        if not upload_id:
            raise ApiError(400, "id is required")
        upload = self.manager.registry.get(upload_id)
        if upload is None:
            raise ApiError(400, "unknown upload id")
        secret = params.get("backendSecret", "")
        if not hmac.compare_digest(secret.encode(), upload.backend_secret.encode()):
            raise ApiError(403, "wrong backendSecret")
        return upload


async def _as_api_error(work: Any) -> None:
    try:
        await work
    except UploadError as e:
        raise ApiError(_STATUS_FOR.get(e.code, 400), e.message) from None


def _ok(request: IRequest, text: str) -> bytes:
    request.setHeader("content-type", TEXT)
    return text.encode("utf-8")


def _params(request: IRequest) -> dict[str, str]:
    """Form values from the query string and the body; the body's come last and win."""
    values: dict[str, str] = {}
    for key, items in (request.args or {}).items():
        try:
            values[key.decode("utf-8")] = items[-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "parameters must be UTF-8") from None
    return values


def _check_url(url: str) -> None:
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


class CappedRequest(server.Request):
    """A request whose body may not exceed the site's `max_body` bytes (413)."""

    _refused = False
    _body_size = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._max_body():
            self._refuse()
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_size += len(data)
        if self._body_size > self._max_body():
            self._refuse()
            return
        super().handleContentChunk(data)

    def _max_body(self) -> int:
        site: IncomingSite = self.channel.site  # type: ignore[attr-defined]
        return site.max_body

    def _refuse(self) -> None:
        self._refused = True
        body = b"request body too large"
        transport = self.channel.transport
        assert transport is not None
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        transport.loseConnection()

    def process(self) -> None:
        if not self._refused:
            super().process()


class IncomingSite(server.Site):
    """The HTTP site: capped request bodies, no tracebacks shown to clients."""

    requestFactory = CappedRequest
    displayTracebacks = False

    def __init__(self, resource: IResource, max_body: int, timeout: float) -> None:
        super().__init__(resource, timeout=timeout)
        self.max_body = max_body
