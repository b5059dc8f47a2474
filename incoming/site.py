"""The HTTP site: the URL tree of a listener, capped request bodies, the access log."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource

from .errors import clipped

access_log = Logger(namespace="incoming.access")


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
    """Capped request bodies, no tracebacks shown to clients, failures access-logged.

    Form bodies are parsed by the routes, not by twisted.web, whose Content-Type
    parsing cost more than the rest of a ticket request.
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
