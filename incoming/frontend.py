"""Serves the browser library: `incoming.js` as a script, `incoming.mjs` as a module."""

from __future__ import annotations

import hashlib
from pathlib import Path

from twisted.web.http import datetimeToString, stringToDatetime
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

MODULE_EXPORTS = b"""
const incoming = globalThis.incoming;
export default incoming;
export const { set_server_hostname, Uploader, find_upload } = incoming;
"""


def frontend_dir() -> Path:
    """`incoming/frontend` once installed, `frontend/` in a source checkout."""
    here = Path(__file__).parent
    installed = here / "frontend"
    return installed if installed.is_dir() else here.parent / "frontend"


class Script(Resource):
    """One file, read once, served with validators, caching and CORS headers."""

    isLeaf = True

    def __init__(self, body: bytes, modified: float) -> None:
        super().__init__()
        self.body = body
        self.modified = int(modified)
        self.etag = f'"{hashlib.sha256(body).hexdigest()[:20]}"'

    @classmethod
    def library(cls, module: bool = False) -> Script:
        path = frontend_dir() / "incoming.js"
        body = path.read_bytes() + (MODULE_EXPORTS if module else b"")
        return cls(body, path.stat().st_mtime)

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader("content-type", "text/javascript; charset=utf-8")
        request.setHeader("etag", self.etag)
        request.setHeader("last-modified", datetimeToString(self.modified))
        request.setHeader("cache-control", "public, max-age=300")
        request.setHeader("access-control-allow-origin", "*")
        if self._not_modified(request):
            request.setResponseCode(304)
            return b""
        return self.body

    render_HEAD = render_GET

    def _not_modified(self, request: IRequest) -> bool:
        tags = request.getHeader("if-none-match")
        if tags is not None:
            return self.etag in (t.strip() for t in tags.split(",")) or tags.strip() == "*"
        since = request.getHeader("if-modified-since")
        if since is None:
            return False
        try:
            return bool(stringToDatetime(since.split(";")[0].encode()) >= self.modified)
        except (ValueError, IndexError, KeyError, UnicodeError):
            return False  # a malformed date: send the script
