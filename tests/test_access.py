"""Who may call the backend API and where handovers may go (docs/deployment/access.rst): this host
by default, configured networks and hosts besides, everyone with --open-access.

A request from another host is made for real: a socket bound to this machine's own
non-loopback address, connecting to the server on 127.0.0.1, reaches it from an
address that is neither loopback nor the one it called."""

from __future__ import annotations

import dataclasses
import http.client
import socket
from ipaddress import ip_network
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted
from twisted.internet import threads

from incoming.config import Config

from .harness import NGINX, Backend, Nginx, Server, serving

BACKEND_ROUTES = ["backend/new_upload", "backend/cancel_upload", "backend/finish_upload"]


def other_address() -> str:
    """This host's address on its network (not loopback): where another host's
    requests would come from."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent; the route picks the address
        except OSError:
            pytest.skip("this host has no network address besides loopback")
        address: str = s.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("this host has no network address besides loopback")
    return address


def request(
    port: int,
    method: str,
    path: str,
    form: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    source: str = "127.0.0.1",
) -> tuple[int, str]:
    """One HTTP request to 127.0.0.1:port from the address `source` (blocking: run it in
    a thread)."""
    connection = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=10, source_address=(source, 0)
    )
    body = urlencode(form).encode() if form is not None else None
    sent = {**(headers or {})}
    if body is not None:
        sent["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        connection.request(method, f"/incoming/{path}", body=body, headers=sent)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


async def call(port: int, method: str, path: str, **kw: Any) -> tuple[int, str]:
    result: tuple[int, str] = await threads.deferToThread(request, port, method, path, **kw)
    return result


@pytest_twisted.ensureDeferred
async def test_the_backend_api_and_metrics_answer_only_this_host_by_default(
    server: Server, backend: Backend
) -> None:
    remote = other_address()
    for path in BACKEND_ROUTES:
        code, text = await call(
            server.port, "POST", path, form={"signalFinishURL": backend.url}, source=remote
        )
        assert code == 403, path
        assert text == (
            f"not open to {remote}: the backend API answers this host and --backend-networks"
        )
    assert (await call(server.port, "GET", "metrics", source=remote))[0] == 403
    assert len(server.manager) == 0
    # what browsers and load balancers use stays open
    assert (await call(server.port, "GET", "health", source=remote)) == (200, "ok")
    assert (await call(server.port, "GET", "frontend/incoming.js", source=remote))[0] == 200
    # this host, by loopback
    code, ticket = await call(
        server.port, "POST", "backend/new_upload", form={"signalFinishURL": backend.url}
    )
    assert code == 200 and server.manager.get(ticket) is not None
    assert (await call(server.port, "GET", "metrics"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_backend_networks_open_the_api_to_their_hosts_whose_handovers_go_home(
    config: Config, backend: Backend
) -> None:
    remote = other_address()
    config = dataclasses.replace(config, backend_networks=frozenset({ip_network(remote)}))
    async with serving(config) as server:
        own_url = f"http://{remote}:{backend.port}/handover"  # the caller's own host
        code, ticket = await call(
            server.port, "POST", "backend/new_upload", form={"signalFinishURL": own_url},
            source=remote,
        )  # fmt: skip
        assert code == 200
        upload = server.manager.get(ticket)
        assert upload is not None and upload.signal_finish_url == own_url
        assert (await call(server.port, "GET", "metrics", source=remote))[0] == 200
        # not this server's loopback, nor anybody else's host
        for url in (backend.url, "http://203.0.113.7/handover", "http://localhost/h"):
            code, text = await call(
                server.port, "POST", "backend/new_upload", form={"signalFinishURL": url},
                source=remote,
            )  # fmt: skip
            assert code == 400, url
            assert "is not the caller's" in text and "--handover-hosts" in text
        assert len(server.manager) == 1


@pytest_twisted.ensureDeferred
async def test_handovers_go_to_the_callers_host_or_to_handover_hosts(
    config: Config, backend: Backend
) -> None:
    async with serving(config) as server:
        for url, host in [("http://203.0.113.7/h", "203.0.113.7"),
                          ("http://[2001:DB8::1]:8080/h", "2001:db8::1")]:  # fmt: skip
            response = await call(
                server.port, "POST", "backend/new_upload", form={"signalFinishURL": url}
            )
            assert response == (
                400,
                f"signalFinishURL host {host!r} is not the caller's (127.0.0.1); "
                "allow it with --handover-hosts",
            )
        code, text = await call(
            server.port, "POST", "backend/new_upload",
            form={"signalFinishURL": "http://nowhere.invalid/h"},
        )  # fmt: skip
        assert (code, text) == (400, "signalFinishURL host 'nowhere.invalid' does not resolve")
        # this host's loopback, by address or by name
        for url in (backend.url, f"http://localhost:{backend.port}/h", "http://127.0.0.2/h"):
            code, _ = await call(
                server.port, "POST", "backend/new_upload", form={"signalFinishURL": url}
            )
            assert code == 200, url
        assert len(server.manager) == 3
    listed = frozenset({"203.0.113.7", "uploads.invalid"})
    async with serving(dataclasses.replace(config, handover_hosts=listed)) as server:
        for url in ("http://203.0.113.7/h", "https://UPLOADS.invalid/h"):  # never resolved
            code, _ = await call(
                server.port, "POST", "backend/new_upload", form={"signalFinishURL": url}
            )
            assert code == 200, url


@pytest_twisted.ensureDeferred
async def test_open_access_is_the_2014_servers(config: Config) -> None:
    remote = other_address()
    async with serving(dataclasses.replace(config, open_access=True)) as server:
        code, ticket = await call(
            server.port, "POST", "backend/new_upload",
            form={"signalFinishURL": "http://203.0.113.7/h"}, source=remote,
        )  # fmt: skip
        assert code == 200 and server.manager.get(ticket) is not None
        assert (await call(server.port, "GET", "metrics", source=remote))[0] == 200


@pytest.mark.parametrize(
    "headers, allowed",
    [
        ({"X-Forwarded-For": "203.0.113.9"}, False),
        ({"X-Forwarded-For": "127.0.0.1, 203.0.113.9"}, False),  # the nearest proxy's: last
        ({"X-Forwarded-For": "203.0.113.9, 127.0.0.1"}, True),
        ({"X-Real-IP": "203.0.113.9"}, False),
        ({"Forwarded": 'for="[2001:db8::1]:4711";proto=https'}, False),
        ({"Forwarded": "for=unknown"}, False),
        ({"Forwarded": "for=127.0.0.1", "X-Forwarded-For": "203.0.113.9"}, False),
        ({"X-Forwarded-For": "garbage"}, False),
        ({"X-Real-IP": "127.0.0.1:5000"}, True),
        ({"X-Forwarded-For": "10.1.2.3"}, True),  # in --backend-networks
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_proxy_on_this_host_is_judged_by_the_client_it_names(
    config: Config, backend: Backend, headers: dict[str, str], allowed: bool
) -> None:
    config = dataclasses.replace(config, backend_networks=frozenset({ip_network("10.0.0.0/8")}))
    async with serving(config) as server:
        code, _ = await call(server.port, "GET", "metrics", headers=headers)
        assert code == (200 if allowed else 403)


class RelayingNginx(Nginx):
    """nginx relaying all of /incoming/ to one instance, naming its client in
    X-Forwarded-For as the docs (deployment/access) recommend (or not, with `name_client=False`)."""

    def __init__(self, directory: Path, name_client: bool) -> None:
        super().__init__(directory)
        self.name_client = name_client

    def config(self, upstreams: list[int]) -> str:
        d = self.directory
        forwarded = "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"
        return f"""
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log notice;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        location /incoming/ {{
            proxy_pass http://127.0.0.1:{upstreams[0]};
            proxy_set_header Host $host;
            {forwarded if self.name_client else ""}
        }}
    }}
}}
"""


@pytest.mark.skipif(not Path(NGINX).exists(), reason="needs nginx (make test installs it)")
@pytest.mark.parametrize("name_client", [True, False])
@pytest_twisted.ensureDeferred
async def test_nginx_relaying_the_backend_api_must_name_its_client(
    tmp_path: Path, server: Server, backend: Backend, name_client: bool
) -> None:
    remote = other_address()
    nginx = RelayingNginx(tmp_path / "nginx", name_client)
    await nginx.start([server.port])
    try:
        form = {"signalFinishURL": backend.url}
        code, _ = await call(nginx.port, "POST", "backend/new_upload", form=form, source=remote)
        # relayed without naming its client, a request from anywhere is this host's
        assert code == (403 if name_client else 200)
        code, _ = await call(nginx.port, "POST", "backend/new_upload", form=form)
        assert code == 200
        assert (await call(nginx.port, "GET", "frontend/incoming.js", source=remote))[0] == 200
    finally:
        await nginx.stop()
