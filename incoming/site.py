"""The HTTP site: the URL tree of a listener, request bodies routed (streamed or capped),
the access log."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote_to_bytes

from klein import Klein
from klein._resource import URLDecodeError, extractURLparts  # how Klein reads a path
from klein.interfaces import IKleinRequest
from klein.resource import KleinResource
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import HTTPException

from .errors import clipped

access_log = Logger(namespace="incoming.access")
MAX_DROPPED = 1024 * 1024  # body bytes read (and dropped) after an early answer
METHOD = re.compile(rb"[A-Za-z]{1,20}")  # what X-HTTP-Method-Override may name


def url_tree(owners: dict[bytes, IResource]) -> Resource:
    """`/incoming/...` and `/incoming/0.1/...` (SPEC: URL space): each path below the
    prefix goes to the role that owns its first segment (`backend`, `frontend`...)."""
    root, incoming = _Prefix({}), _Prefix(owners)
    root.putChild(b"incoming", incoming)
    incoming.putChild(b"0.1", _Prefix(owners))
    return root


class _Prefix(Resource):
    """Hands the rest of the path, first segment included, to the role that owns it;
    each role's Klein app routes the paths below the prefix."""

    def __init__(self, owners: dict[bytes, IResource]) -> None:
        super().__init__()
        self._owners = owners

    def getChild(self, path: bytes, request: Any) -> IResource:
        owner = self._owners.get(path)
        if owner is None:
            return notFound()
        request.postpath.insert(0, request.prepath.pop())
        return owner


class BodyStream(Protocol):
    """Takes a request's body as it arrives (a tus PATCH), where twisted.web would
    otherwise hold all of it (spooled to a file past 100 KB) before the route runs."""

    def body_received(self, data: bytes) -> None: ...

    def body_ended(self) -> None: ...

    def connection_lost(self) -> None: ...


Handler = TypeVar("Handler", bound=Callable[..., Any])


def streamed_body(opener: Callable[..., BodyStream | None]) -> Callable[[Handler], Handler]:
    """Declares that a `StreamingKlein` route takes its body as it arrives: once the
    headers are in, `opener(self, request, **route_values)` gives the
    stream (None: the body is buffered, capped, as any other). The route finds it as
    `request.body_stream`."""

    def declare(handler: Handler) -> Handler:
        handler.body_opener = opener  # type: ignore[attr-defined]
        return handler

    return declare


class StreamingKlein(Klein):
    """A Klein app whose routes may stream request bodies (`streamed_body`). The route
    that will answer a request also decides, from its headers, where its body goes: the
    same declared routes, matched the same way, so a path nobody serves takes no body."""

    def resource(self) -> KleinResource:
        return _StreamingResource(self)

    def body_stream(self, request: IncomingRequest) -> BodyStream | None:
        try:
            scheme, host, _, path_info, script_name = extractURLparts(request)
        except URLDecodeError:
            return None  # the route answers 400
        mapper = self.url_map.bind(
            host, script_name, path_info=path_info,
            default_method=request.method.decode("latin-1"), url_scheme=scheme,
        )  # fmt: skip
        try:
            rule, values = mapper.match(return_rule=True)
        except HTTPException:
            return None  # no route, or not for this method: its answer takes no body
        handler = inspect.unwrap(self.endpoints[rule.endpoint])  # under klein's wrapper
        opener = getattr(handler, "body_opener", None)
        if opener is None:
            return None
        IKleinRequest(request).mapper = mapper  # for `url_for` before the route runs
        stream: BodyStream | None = opener(self._instance, request, **values)
        return stream


class _StreamingResource(KleinResource):
    def __init__(self, app: StreamingKlein) -> None:
        super().__init__(app)
        self.app = app


class IncomingRequest(server.Request):
    """A request whose body goes, as it arrives, to the `BodyStream` its route opens for
    it (`StreamingKlein`), and otherwise may not exceed the site's `max_body` bytes (413).

    `X-HTTP-Method-Override` (tus) replaces the method of any request.
    """

    body_stream: BodyStream | None = None
    _method = b""  # as overridden
    body_length: int | None = None  # of the body, as framed (Content-Length); None: chunked
    _body_ended = False
    answered = False  # an answer went out before the body had ended (`answer_now`)
    _body_size = 0  # bytes of the body so far (buffered, or dropped after `answer_now`)

    def gotLength(self, length: int | None) -> None:
        site: IncomingSite = self.channel.site  # type: ignore[attr-defined]
        self.body_length = length
        # The request line is known here only to the channel (Twisted is pinned <27).
        self.method, self.path = self.channel._command, self.channel._path.partition(b"?")[0]
        method = self._overridden(self.method)
        if method is None:
            text = "X-HTTP-Method-Override must name one method (HEAD only for a HEAD)"
            self.answer_now(400, "Bad Request", {}, text)
            super().gotLength(0)
            return
        self.method = self._method = method
        route = self._resource()
        if isinstance(route, _StreamingResource):
            self.body_stream = route.app.body_stream(self)
        if self.body_stream is not None:
            super().gotLength(0)  # nothing is buffered
            return
        if length is not None and length > site.max_body:
            self.answer_now(413, "Payload Too Large", {}, "request body too large")
            length = 0
        super().gotLength(length)

    def _overridden(self, method: bytes) -> bytes | None:
        """The method `X-HTTP-Method-Override` names, if any; None if it names no method,
        or would make a HEAD answer carry a body or another request's answer lose it."""
        values = self.requestHeaders.getRawHeaders(b"x-http-method-override", [b""])
        override = values[0].upper()
        if len(values) == 1 and not override:
            return method
        if len(values) > 1 or not METHOD.fullmatch(override):
            return None
        return override if (override == b"HEAD") == (method == b"HEAD") else None

    def _resource(self) -> IResource:
        """The resource that will answer, found as `process` will find it."""
        self.prepath, self.postpath = [], list(map(unquote_to_bytes, self.path[1:].split(b"/")))
        site: IncomingSite = self.channel.site  # type: ignore[attr-defined]
        resource: IResource = site.getResourceFor(self)
        return resource

    def handleContentChunk(self, data: bytes) -> None:
        if self.answered:
            self._body_size += len(data)
            if self._body_size > MAX_DROPPED:  # the client does not stop: give up on it
                self._hang_up()
            return
        if self.body_stream is not None:
            self.body_stream.body_received(data)
            return
        self._body_size += len(data)
        site: IncomingSite = self.channel.site  # type: ignore[attr-defined]
        if self._body_size > site.max_body:
            self.answer_now(413, "Payload Too Large", {}, "request body too large")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.answered:
            self._hang_up()  # the body has all arrived; its answer went out before
            return
        if self.body_stream is not None:
            self._body_ended = True
            self.body_stream.body_ended()
        super().requestReceived(command, path, version)

    def process(self) -> None:
        if self.answered:
            return
        self.method = self._method or self.method  # as overridden (`gotLength`)
        super().process()

    def connectionLost(self, reason: Any) -> None:
        if self.body_stream is not None and not self.answered and not self.finished:
            self.body_stream.connection_lost()  # mid-body, or while its answer is awaited
        super().connectionLost(reason)

    def _hang_up(self) -> None:
        transport = self.channel.transport
        if transport is not None:
            transport.loseConnection()

    def answer_now(self, status: int, reason: str, headers: dict[str, str], text: str) -> None:
        """Answer before the body has arrived (a refused upload), then drop what comes of
        the body and hang up at its end: closing at once would make the client's kernel
        reset the connection, answer unread, while it still sends."""
        self.answered, self._body_size = True, 0
        body = text.encode("utf-8")
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}"]
        lines += ["Connection: close", "", ""]
        transport = self.channel.transport
        assert transport is not None
        transport.write("\r\n".join(lines).encode("latin-1") + body)
        self.code = status
        site: IncomingSite = self.channel.site  # type: ignore[attr-defined]
        site.log(self)


class IncomingSite(server.Site):
    """Streamed or capped request bodies, no tracebacks shown, failures access-logged.

    Form bodies are parsed by the routes, not by twisted.web, whose Content-Type
    parsing cost more than the rest of a ticket request.
    """

    requestFactory = IncomingRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        max_body: int,
        timeout: float,
        reactor: Any = None,
    ) -> None:
        # `timeout` drops connections idle before, between or within requests
        # (slowloris); upgraded WebSockets have their own ping timeout.
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
                method=clipped(request.method.decode("ascii", "backslashreplace"), 20),
                path=clipped(request.path.decode("ascii", "backslashreplace")),
                code=request.code,
            )
