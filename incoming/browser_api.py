"""The browser's side (SPEC: URL space): the library, and the upload WebSocket."""

from __future__ import annotations

from klein import Klein
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource


class BrowserApi:
    """`PREFIX/frontend/...`: what pages load and connect to."""

    app = Klein()

    def __init__(self, script: IResource, module: IResource, upload_ws: IResource) -> None:
        self._script = script
        self._module = module
        self._upload_ws = upload_ws

    @app.route("/frontend/incoming.js", methods=["GET", "HEAD"])
    def script(self, request: IRequest) -> IResource:
        return self._script

    @app.route("/frontend/incoming.mjs", methods=["GET", "HEAD"])
    def module(self, request: IRequest) -> IResource:
        return self._module

    @app.route("/frontend/upload_ws", methods=["GET"])
    def upload_ws(self, request: IRequest) -> IResource:
        return self._upload_ws
