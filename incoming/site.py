"""The HTTP site: the URL tree of a listener, capped request bodies, the access log."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource

from .errors import clipped

access_log = Logger(namespace="incoming.access")
MAX_DROPPED = 1024 * 1024  # body bytes read (and dropped) after an early answer


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


# Given a request whose headers have arrived, its method and path: a stream for its body.
BodyStreams = Callable[["IncomingRequest", bytes, bytes], BodyStream | None]


class IncomingRequest(server.Request):
    """A request whose body is streamed to a `BodyStream` when the site has one for it,
    and otherwise may not exceed the site's `max_body` bytes (413).

    `X-HTTP-Method-Override` (tus) replaces the method of a POST.
    """

    body_stream: BodyStream | None = None
    _body_ended = False
    answered = False  # an answer went out before the body had ended (`answer_now`)
    _body_size = 0  # bytes of the body so far (buffered, or dropped after `answer_now`)

    def gotLength(self, length: int | None) -> None:
        site: IncomingSite = self.channel.site  # type: ignore[attr-defined]
        # The request line is known here only to the channel (Twisted is pinned <27).
        method = self._effective_method(self.channel._command)
        path = self.channel._path
        self.method, self.path = method, path.partition(b"?")[0]  # for an early answer's log
        if site.body_streams is not None:
            self.body_stream = site.body_streams(self, method, path)
        if self.body_stream is not None:
            super().gotLength(0)  # nothing is buffered
            return
        if length is not None and length > site.max_body:
            self.answer_now(413, "Payload Too Large", {}, "request body too large")
            length = 0
        super().gotLength(length)

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
        self.method = self._effective_method(self.method)
        super().process()

    def connectionLost(self, reason: Any) -> None:
        if self.body_stream is not None and not self.answered and not self.finished:
            self.body_stream.connection_lost()  # mid-body, or while its answer is awaited
        super().connectionLost(reason)

    def _hang_up(self) -> None:
        transport = self.channel.transport
        if transport is not None:
            transport.loseConnection()

    def _effective_method(self, method: bytes) -> bytes:
        override = self.requestHeaders.getRawHeaders(b"x-http-method-override")
        if method == b"POST" and override:
            return override[0].strip().upper()
        return method

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
        body_streams: BodyStreams | None = None,
    ) -> None:
        # `timeout` drops connections idle before, between or within requests
        # (slowloris); upgraded WebSockets have their own ping timeout.
        super().__init__(resource, timeout=timeout, parsePOSTFormSubmission=False, reactor=reactor)
        self.max_body = max_body
        self.body_streams = body_streams

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
