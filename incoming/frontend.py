"""Serves the browser library: `incoming.js` as a script, `incoming.mjs` as a module."""

from __future__ import annotations

import hashlib
from pathlib import Path

from twisted.web.http import datetimeToString, stringToDatetime
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

# incoming.mjs imports incoming.js (as in the npm package); served, the script comes first
# in the same file instead: one request.
MODULE_IMPORT = b'import "./incoming.js";\n'


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
        """incoming.js, or as a module: incoming.js, then incoming.mjs without its import."""
        script = frontend_dir() / "incoming.js"
        if not module:
            return cls(script.read_bytes(), script.stat().st_mtime)
        wrapper = frontend_dir() / "incoming.mjs"
        exports = wrapper.read_bytes()
        if exports.count(MODULE_IMPORT) != 1:
            raise ValueError(f"{wrapper} must import incoming.js once: {MODULE_IMPORT!r}")
        body = script.read_bytes() + b"\n" + exports.replace(MODULE_IMPORT, b"")
        return cls(body, max(script.stat().st_mtime, wrapper.stat().st_mtime))

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
