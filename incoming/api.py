"""HTTP routes: the backend API, the browser library and the WebSocket endpoint."""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from klein import Klein
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from .manager import UploadManager
from .uploads import ErrorCode, Upload, UploadError, clipped

access_log = Logger(namespace="incoming.access")
PREFIXES = ("/incoming", "/incoming/0.1")
TEXT = "text/plain; charset=utf-8"
_BOOLEANS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}
_STATUS_FOR = {
    ErrorCode.UNKNOWN_TICKET: 400,
    ErrorCode.TOO_LATE: 412,
    ErrorCode.TICKET_CANCELLED: 412,
    ErrorCode.UNEXPECTED_MESSAGE: 412,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class IncomingApi:
    """The Klein application of one listener; it serves the routes of its roles.

    `backend`: the backend API, metrics and health. `frontend`: the browser
    library and the WebSocket. One listener may have both roles.
    """

    def __init__(
        self,
        manager: UploadManager,
        *,
        backend: bool = True,
        frontend: bool = True,
        script: IResource | None = None,
        module: IResource | None = None,
        upload_ws: IResource | None = None,
        handover_hosts: frozenset[str] = frozenset(),
    ) -> None:
        self.manager = manager
        self.script = script
        self.module = module
        self.upload_ws = upload_ws
        self.handover_hosts = handover_hosts
        self.app = app = Klein()
        app.handle_errors(ApiError)(self.api_error)
        if backend:
            self._route("/backend/new_upload", self.new_upload, "POST")
            self._route("/backend/cancel_upload", self.cancel_upload, "POST")
            self._route("/backend/finish_upload", self.finish_upload, "POST")
            app.route("/incoming/metrics", methods=["GET"])(self.metrics)
            app.route("/incoming/health", methods=["GET"])(self.health)
        if frontend:
            assert script is not None and module is not None and upload_ws is not None
            self._route("/frontend/incoming.js", lambda request: script, "GET", "HEAD")
            self._route("/frontend/incoming.mjs", lambda request: module, "GET", "HEAD")
            self._route("/frontend/upload_ws", lambda request: upload_ws, "GET")

    def _route(self, path: str, handler: Any, *methods: str) -> None:
        """Register a route under both URL prefixes."""
        for prefix in PREFIXES:
            self.app.route(prefix + path, endpoint=prefix + path, methods=list(methods))(handler)

    def resource(self) -> IResource:
        return self.app.resource()

    def api_error(self, request: IRequest, failure: Any) -> bytes:
        error: ApiError = failure.value
        request.setResponseCode(error.status)
        return _text(request, error.message)

    async def new_upload(self, request: IRequest) -> bytes:
        params = _params(request)
        url = params.get("signalFinishURL", "")
        if not url:
            raise ApiError(400, "signalFinishURL is required")
        _check_url(url, self.handover_hosts)
        if (params.get("destType") or "file") != "file":
            raise ApiError(400, "destType must be 'file'")
        remove = _BOOLEANS.get(params.get("removeFileWhenFinished") or "true")
        if remove is None:
            raise ApiError(400, "removeFileWhenFinished must be a boolean such as true or false")
        try:
            upload = await self.manager.create(url, params.get("backendSecret", ""), remove)
        except OSError:
            raise ApiError(507, "cannot store the upload's state; is the storage full?") from None
        return _text(request, upload.id)

    async def cancel_upload(self, request: IRequest) -> bytes:
        upload = self._authorised(request)
        await _as_api_error(self.manager.cancel_by_backend(upload))
        return _text(request, "ok")

    async def finish_upload(self, request: IRequest) -> bytes:
        upload = self._authorised(request)
        await _as_api_error(self.manager.finish_upload(upload))
        return _text(request, "ok")

    def metrics(self, request: IRequest) -> bytes:
        request.setHeader("content-type", "text/plain; version=0.0.4; charset=utf-8")
        return self.manager.metrics.render(self.manager.registry).encode()

    def health(self, request: IRequest) -> bytes:
        return _text(request, "ok")

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


def _text(request: IRequest, text: str) -> bytes:
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


def _check_url(url: str, allowed_hosts: frozenset[str]) -> None:
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
    if allowed_hosts and parts.hostname.lower() not in allowed_hosts:
        raise ApiError(400, f"signalFinishURL host {parts.hostname!r} is not allowed")


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
    """The HTTP site: capped request bodies, no tracebacks shown to clients.

    Form bodies are parsed by the routes (`_params`), not by twisted.web, whose
    Content-Type parsing cost more than the rest of a ticket request.
    """

    requestFactory = CappedRequest
    displayTracebacks = False

    def __init__(
        self, resource: IResource, max_body: int, timeout: float, reactor: Any = None
    ) -> None:
        # `timeout` drops connections idle before or between requests (slowloris);
        # upgraded WebSockets have their own ping timeout.
        super().__init__(resource, timeout=timeout, parsePOSTFormSubmission=False, reactor=reactor)
        self.max_body = max_body

    def log(self, request: http.Request) -> None:
        """Access-log failed requests only, by path and status: never the query string
        (old backends put `backendSecret` there) nor form values."""
        if request.code >= 400:
            client = request.getClientAddress()
            access_log.info(
                '{client} "{method} {path}" {code}',
                client=getattr(client, "host", "-"),
                method=request.method.decode("ascii", "replace"),
                path=clipped(request.path.decode("ascii", "backslashreplace")),
                code=request.code,
            )
