"""Serving incoming.js and incoming.mjs (SPEC: Browser library; URL space)."""

from __future__ import annotations

import pytest
import pytest_twisted
import treq

from incoming.frontend import frontend_dir

from .harness import Server


@pytest.mark.parametrize("prefix", ["/incoming", "/incoming/0.1"])
@pytest_twisted.ensureDeferred
async def test_script_is_served_with_type_validators_and_cache_headers(
    server: Server, prefix: str
) -> None:
    url = f"http://127.0.0.1:{server.port}{prefix}/frontend/incoming.js"
    response = await treq.get(url)
    body = await response.content()
    assert response.code == 200
    assert body == (frontend_dir() / "incoming.js").read_bytes()
    headers = response.headers
    assert headers.getRawHeaders("content-type") == ["text/javascript; charset=utf-8"]
    assert headers.getRawHeaders("cache-control") == ["public, max-age=300"]
    assert headers.getRawHeaders("access-control-allow-origin") == ["*"]
    etag = headers.getRawHeaders("etag")[0]
    modified = headers.getRawHeaders("last-modified")[0]
    again = await treq.get(url, headers={"If-None-Match": etag})
    assert again.code == 304 and await again.content() == b""
    again = await treq.get(url, headers={"If-Modified-Since": modified})
    assert again.code == 304
    stale = await treq.get(url, headers={"If-None-Match": '"something-else"'})
    assert stale.code == 200 and await stale.content() == body
    for garbage in ("yesterday", "Tue, 99 Foo 2023 99:99:99 GMT", "", "é"):
        response = await treq.get(url, headers={"If-Modified-Since": garbage})
        assert response.code == 200, garbage


@pytest_twisted.ensureDeferred
async def test_module_is_the_script_then_the_exports_of_incoming_mjs(server: Server) -> None:
    """One source: the npm package's incoming.mjs imports incoming.js; served, the script
    comes first in the same file and the import goes."""
    response = await treq.get(f"{server.base}/frontend/incoming.mjs")
    body = await response.text()
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/javascript; charset=utf-8"]
    script = (frontend_dir() / "incoming.js").read_text()
    wrapper = (frontend_dir() / "incoming.mjs").read_text()
    assert 'import "./incoming.js";\n' in wrapper
    assert body == script + "\n" + wrapper.replace('import "./incoming.js";\n', "")
    assert 'import "' not in body.removeprefix(script)
    assert "export default incoming;" in body
    assert "export const { set_server_hostname, Uploader, find_upload } = incoming;" in body


@pytest_twisted.ensureDeferred
async def test_unknown_paths_are_404(server: Server) -> None:
    for path in ("/incoming/frontend/../backend/new_upload", "/incoming/frontend/x.js", "/"):
        response = await treq.get(f"http://127.0.0.1:{server.port}{path}")
        assert response.code == 404, path
