"""Real servers on 127.0.0.1 for tests: Incoming!!, a Klein backend, a WebSocket client."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import treq
from klein import Klein
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.web.server import Site
from twisted.web.websocket import WebSocketClientEndpoint, WebSocketTransport
from wsproto.utilities import LocalProtocolError

from incoming.config import Config
from incoming.manager import UploadManager
from incoming.service import build_manager, build_site
from incoming.storage import Storage

ROOT = Path(__file__).resolve().parent.parent
CHUNK_KB = 4  # small chunks and window: many chunks, many acks, in every test
SEND_AHEAD = 3
TWISTD = str(Path(sys.executable).parent / "twistd")


@dataclass
class Backend:
    """A web app's backend: records every handover POST and answers as told."""

    status: int = 200
    answer: bytes = b"done"
    posts: DeferredQueue[dict[str, str]] = field(default_factory=DeferredQueue)
    port: int = 0
    app: Klein = field(default_factory=Klein)
    answers: list[tuple[int, bytes]] = field(default_factory=list)  # used first, in order
    hold: bool = False  # do not answer until `release()`: the caller hangs meanwhile
    held: list[Deferred[bytes]] = field(default_factory=list)
    # run before answering a handover (a backend's worker calling finish_upload, say)
    before_answer: Callable[[dict[str, str]], Awaitable[object]] | None = None
    notice: tuple[int, bytes] | None = None  # the answer to cancel notices (else as above)

    def __post_init__(self) -> None:
        @self.app.route("/handover", methods=["POST"])
        async def handover(request: Any) -> bytes:
            body = request.content.read().decode()
            fields = {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}
            fields["_query"] = request.uri.decode().partition("?")[2]
            self.posts.put(fields)
            if self.before_answer is not None and fields["cancelled"] == "no":
                await self.before_answer(fields)
            if self.notice is not None and fields["cancelled"] == "yes":
                request.setResponseCode(self.notice[0])
                return self.notice[1]
            if self.hold:
                held: Deferred[bytes] = Deferred()
                self.held.append(held)
                return await held
            status, answer = self.answers.pop(0) if self.answers else (self.status, self.answer)
            request.setResponseCode(status)
            return answer

    def release(self) -> None:
        """Answer the held requests (`done`) and stop holding."""
        self.hold = False
        while self.held:
            self.held.pop(0).callback(self.answer)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/handover"


async def start_backend(backend: Backend) -> Any:
    """Its listening port; on the same port number as before, if it had one (a backend
    that was stopped, `await port.stopListening()`, and comes back)."""
    endpoint = TCP4ServerEndpoint(reactor, backend.port, interface="127.0.0.1")
    port = await endpoint.listen(Site(backend.app.resource()))
    backend.port = port.getHost().port
    return port


@dataclass
class Server:
    """A running Incoming!! site on a loopback port."""

    manager: UploadManager
    port: int
    storage_dir: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/incoming"

    def ws_url(self, prefix: str = "/incoming") -> str:
        return f"ws://127.0.0.1:{self.port}{prefix}/frontend/upload_ws"

    async def new_upload(self, backend_url: str, **params: str) -> str:
        params = {"signalFinishURL": backend_url, **params}
        response = await treq.post(f"{self.base}/backend/new_upload", data=params)
        body = (await response.text()).strip()
        assert response.code == 200, body
        return body

    async def settled(self) -> None:
        """Wait until background work (handovers, cancellations) has run its course, and
        the disk work it queued (the state it saved last) too."""
        while True:
            for d in list(self.manager.running):
                await d
            await self.manager.storage.drain_all()
            if not self.manager.running:
                return

    def files(self) -> dict[str, bytes]:
        """Upload data in the storage directory (state records left out)."""
        return {
            p.name: p.read_bytes()
            for p in self.storage_dir.iterdir()
            if p.suffix not in (".json", ".journal")
        }


async def start_server(
    config: Config, storage: Storage | None = None, clock: IReactorTime | None = None
) -> tuple[Server, Any, ThreadPool]:
    """The site on a loopback port; storage on disk unless another is given."""
    pool = ThreadPool(minthreads=1, maxthreads=4, name="test-storage")
    pool.start()
    manager = build_manager(config, reactor, pool, storage, clock)
    site = build_site(manager, config, reactor)
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await endpoint.listen(site)
    return Server(manager, port.getHost().port, config.storage_dir), port, pool


@contextlib.asynccontextmanager
async def serving(
    config: Config, storage: Storage | None = None, clock: IReactorTime | None = None
) -> AsyncIterator[Server]:
    """A server on a loopback port for the block's length; then its work ends, it stops.
    `clock`: for its timers and its handovers' (a `task.Clock` where minutes pass)."""
    server, port, pool = await start_server(config, storage, clock)
    try:
        yield server
    finally:
        await port.stopListening()
        server.manager.retrier.stop_all()  # a backend still away: its POSTs end (as at stop)
        await server.settled()
        await ensureDeferred(server.manager.shutdown())
        pool.stop()


@contextlib.contextmanager
def log_line(text: str) -> Iterator[Deferred[None]]:
    """Fires once this process logs a line holding `text` (while in the block)."""
    seen: Deferred[None] = Deferred()

    def observe(event: dict[str, Any]) -> None:
        if not seen.called and text in formatEvent(event):
            seen.callback(None)

    globalLogPublisher.addObserver(observe)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observe)


class Daemon(ProcessProtocol):
    """Watches a server's log for the line saying it is ready (for twistd: the start-up
    summary, logged once the reactor runs and signals are handled, and its first port),
    and for its exit."""

    def __init__(self, ready: bytes = rb"Incoming!! \S+ started: [^;]*? on [^;\s]*:(\d+)") -> None:
        self.ready = ready
        self.output = b""
        self.listening: Deferred[int] = Deferred()
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()
        self._waiting: list[tuple[bytes, Deferred[None]]] = []

    def logged(self, pattern: bytes) -> Deferred[None]:
        """Fires once the log has a line matching `pattern`."""
        d: Deferred[None] = Deferred()
        self._waiting.append((pattern, d))
        self.outReceived(b"")
        return d

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = re.search(self.ready, self.output)
        if match and not self.listening.called:
            self.listening.callback(int(match.group(1)) if match.groups() else 0)
        for pattern, d in list(self._waiting):
            if re.search(pattern, self.output):
                self._waiting.remove((pattern, d))
                d.callback(None)

    errReceived = outReceived

    def kill(self, process: Any) -> Deferred[tuple[int | None, int | None]]:
        process.signalProcess(signal.SIGKILL)
        return self.ended

    def processEnded(self, reason: Any) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback((reason.value.exitCode, reason.value.signal))


async def run_daemon(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, max_files: int | None = None
) -> tuple[Daemon, Any, int]:
    """`twistd -n ARGS`; `max_files` lowers its limit of open files (RLIMIT_NOFILE)."""
    daemon = Daemon()
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    command = [TWISTD, "-n", "--pidfile=", *args]
    if max_files is not None:
        limit = (
            f"import os, resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({max_files},) * 2)"
        )
        command = [sys.executable, "-c", f"{limit}; os.execv({TWISTD!r}, {command!r})"]
    process = reactor.spawnProcess(  # type: ignore[attr-defined]
        daemon, command[0], command, env=environment, path=str(cwd)
    )
    port = await daemon.listening
    return daemon, process, port


async def start_daemon(
    storage: Path,
    cwd: Path,
    stopper: list[Any],
    *extra: str,
    max_files: int | None = None,
    env: dict[str, str] | None = None,
) -> tuple[Daemon, Any, Server]:
    """`twistd -n incoming` on a free loopback port, with the tests' chunk settings."""
    daemon, process, port = await run_daemon(
        ["incoming", "--listen", "tcp:0:interface=127.0.0.1", "--storage-dir", str(storage),
         "--chunk-size-kb", str(CHUNK_KB), "--send-ahead", str(SEND_AHEAD), *extra],
        cwd,
        env=env,
        max_files=max_files,
    )  # fmt: skip
    stopper.append(process)
    return daemon, process, Server(manager=None, port=port, storage_dir=storage)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Redis:
    """Debian's redis-server on a free loopback port, its data (AOF, fsynced at every
    write) in a directory of the test's, so that it can be restarted without loss."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.daemon: Daemon | None = None
        self.process: Any = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.daemon = Daemon(ready=rb"Ready to accept connections")
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "", "--daemonize", "no", "--protected-mode", "yes",
        ]  # fmt: skip
        self.process = reactor.spawnProcess(  # type: ignore[attr-defined]
            self.daemon, "/usr/bin/redis-server", command, env=dict(os.environ)
        )
        await self.daemon.listening

    async def stop(self) -> None:
        if self.process is not None and self.process.pid is not None:
            assert self.daemon is not None
            self.process.signalProcess(signal.SIGTERM)
            await self.daemon.ended
        self.process = None


# The nginx configurations of docs/deployment, as the docs show them: one instance
# (nginx.conf) and the load balancer of several (nginx-cluster.conf: round robin, the
# default, over the instances, no stickiness). Both pass the browser routes (script,
# WebSocket, tus) streamed both ways, with room for the longest Incoming-Result header
# (nginx refuses a proxy_buffer_size above 14k without larger proxy_buffers, even
# unbuffered), and keep the backend API off the public side. The tests listen on loopback
# ports instead of 443 with TLS, and their instances' ports replace the documented ones.
NGINX_SINGLE = ROOT / "docs" / "deployment" / "nginx.conf"
NGINX_CLUSTER = ROOT / "docs" / "deployment" / "nginx-cluster.conf"


def nginx_site(conf: Path, public: str, backend: str, upstreams: list[str]) -> str:
    """`conf` as documented, on the test's addresses: its public `listen 443 ssl` (TLS
    would need a certificate), its backend listener, and the instances it proxies to, in
    the order the file names them."""
    text, listeners = re.subn(r"listen 443 ssl;[^\n]*", f"listen {public};", conf.read_text())
    assert listeners == 1, conf
    text = text.replace("listen 127.0.0.1:4000;", f"listen {backend};")
    documented = list(dict.fromkeys(re.findall(r"(?:server |http://)(127\.0\.0\.1:\d+);", text)))
    assert len(documented) == len(upstreams), (conf, documented)
    for address, upstream in zip(documented, upstreams, strict=True):
        text = re.sub(rf"(server |http://){re.escape(address)};", rf"\g<1>{upstream};", text)
    return text


class Nginx:
    """Debian's nginx on free loopback ports, as a load balancer in front of `upstreams`:
    its configuration, pid file, logs and temporary files in a directory of the test's
    (nothing of /etc/nginx is read). The access log names the instance of every request."""

    def __init__(self, directory: Path, conf: Path = NGINX_CLUSTER) -> None:
        self.directory = directory
        self.conf = conf  # one of docs/deployment's
        self.port = free_port()  # browsers
        self.backend_port = free_port()  # the backend API
        self.daemon: Daemon | None = None
        self.process: Any = None

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    def requests(self) -> list[tuple[str, str, int, str]]:
        """(method, URI, status, instance's address) of every request answered so far."""
        lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
        found = []
        for line in lines:
            method, uri, status, upstream = line.split(" ")
            found.append((method, uri, int(status), upstream))
        return found

    def problems(self) -> list[str]:
        """Its error log's lines of level `error` or worse (a worker that could not write
        a temporary file, an instance it could not reach...)."""
        log = self.directory / "error.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return [line for line in lines if re.search(r"\[(error|crit|alert|emerg)\]", line)]

    def config(self, upstreams: list[int]) -> str:
        d = self.directory
        site = nginx_site(
            self.conf, f"127.0.0.1:{self.port}", f"127.0.0.1:{self.backend_port}",
            [f"127.0.0.1:{port}" for port in upstreams],
        )  # fmt: skip
        # As root, the workers run as nginx's built-in user (nobody) if it exists.
        user = "user root;" if os.geteuid() == 0 and not _has_user("nobody") else ""
        return f"""
daemon off;
master_process on;
worker_processes 1;
{user}
pid {d}/nginx.pid;
lock_file {d}/nginx.lock;
error_log {d}/error.log notice;
error_log stderr notice;
events {{
    worker_connections 256;
}}
http {{
    log_format upstream "$request_method $request_uri $status $upstream_addr";
    access_log {d}/access.log upstream;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{site}
}}
"""

    async def start(self, upstreams: list[int]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "nginx.conf"
        conf.write_text(self.config(upstreams))
        # the master logs this once its sockets listen and it starts the worker
        self.daemon = Daemon(ready=rb"start worker process")
        command = [NGINX, "-p", str(self.directory), "-c", str(conf),
                   "-e", str(self.directory / "error.log")]  # fmt: skip
        self.process = reactor.spawnProcess(  # type: ignore[attr-defined]
            self.daemon, NGINX, command, env=dict(os.environ)
        )
        await self.daemon.listening

    async def stop(self) -> None:
        if self.process is not None and self.process.pid is not None:
            assert self.daemon is not None
            self.process.signalProcess(signal.SIGTERM)  # fast shutdown
            await self.daemon.ended
        self.process = None


NGINX = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin") or "/usr/sbin/nginx"


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


async def stop_daemon(daemon: Daemon, process: Any) -> None:
    """SIGTERM: twistd shuts down cleanly, then re-raises the signal as its exit status."""
    process.signalProcess(signal.SIGTERM)
    assert await daemon.ended == (None, signal.SIGTERM)
    assert b"Server Shut Down." in daemon.output


class Client:
    """A WebSocket client speaking the upload protocol, one message at a time."""

    def __init__(self) -> None:
        self.messages: DeferredQueue[Any] = DeferredQueue()
        self.closed: Deferred[None] = Deferred()
        self.transport: WebSocketTransport | None = None

    # twisted.web.websocket.WebSocketProtocol

    def negotiationStarted(self, transport: WebSocketTransport) -> None:
        self.transport = transport

    def negotiationFinished(self) -> None:
        pass

    def textMessageReceived(self, text: str) -> None:
        self.messages.put(json.loads(text))

    def bytesMessageReceived(self, data: bytes) -> None:
        self.messages.put(data)

    def pongReceived(self, payload: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        self.messages.put(None)
        self.closed.callback(None)

    # test helpers

    def send(self, msg_type: str, **data: Any) -> None:
        self.send_raw(json.dumps({"MsgType": msg_type, "MsgData": data}))

    def send_raw(self, text: str) -> None:
        assert self.transport is not None
        with contextlib.suppress(LocalProtocolError):  # closed: dropped, as a browser would
            self.transport.sendTextMessage(text)

    def send_chunk(self, data: bytes) -> None:
        assert self.transport is not None
        with contextlib.suppress(LocalProtocolError):
            self.transport.sendBytesMessage(data)

    async def next(self) -> Any:
        """The next message; None once the connection is closed."""
        return await self.messages.get()

    async def expect(self, msg_type: str) -> dict[str, Any]:
        msg = await self.next()
        assert msg is not None, f"connection closed, expected {msg_type}"
        assert msg["MsgType"] == msg_type, msg
        data: dict[str, Any] = msg["MsgData"]
        return data

    async def expect_error(self, code: int) -> dict[str, Any]:
        data = await self.expect("MsgError")
        assert data["ErrorCode"] == code, data
        assert await self.next() is None  # the server hangs up after an error
        return data

    def close(self) -> None:
        if self.transport is not None and not self.closed.called:
            with contextlib.suppress(LocalProtocolError):  # the server's close came first
                self.transport.loseConnection()


class _Factory:
    def __init__(self, client: Client) -> None:
        self.client = client

    def buildProtocol(self, url: str) -> Client:
        return self.client


async def connect(url: str) -> Client:
    client = Client()
    await WebSocketClientEndpoint.new(reactor, url).connect(_Factory(client))
    return client


async def upload_request(
    server: Server, ticket: str, length: int, name: str = "f.bin", prefix: str = "/incoming"
) -> tuple[Client, dict[str, Any]]:
    """Connect and send MsgUploadReq; returns the client and its MsgUploadConf data."""
    client = await connect(server.ws_url(prefix))
    client.send("MsgUploadReq", Id=ticket, LengthBytes=length, Name=name)
    conf = await client.expect("MsgUploadConf")
    return client, conf


async def acked_upload(
    server: Server, backend_url: str, length: int, **params: str
) -> tuple[str, Client, dict[str, Any]]:
    """A new ticket, connected and acknowledged: ready for chunks."""
    ticket = await server.new_upload(backend_url, **params)
    client, conf = await upload_request(server, ticket, length)
    client.send("MsgAck", Ack=True)
    return ticket, client, conf


async def upload_small(
    server: Server, backend_url: str, data: bytes, **params: str
) -> tuple[str, Client]:
    """A whole upload in one chunk, up to that chunk's MsgChunkAck."""
    ticket, client, _ = await acked_upload(server, backend_url, len(data), **params)
    if data:
        client.send_chunk(data)
        await client.expect("MsgChunkAck")
    return ticket, client


async def complete_upload(client: Client, rest: bytes, chunk_size: int, send_ahead: int) -> None:
    """After MsgUploadConf: ack, send the rest of the file, and get MsgAllDone."""
    client.send("MsgAck", Ack=True)
    await send_all(client, rest, chunk_size, send_ahead)
    await client.expect("MsgAllDone")


async def send_all(client: Client, data: bytes, chunk_size: int, send_ahead: int) -> None:
    """Send `data` in chunks within the send-ahead window, awaiting every ack."""
    offsets = range(0, len(data), chunk_size)
    unacked = 0
    for offset in offsets:
        if unacked == send_ahead:
            ack = await client.expect("MsgChunkAck")
            unacked -= 1
            assert ack["ChunkSize"] > 0
        client.send_chunk(data[offset : offset + chunk_size])
        unacked += 1
    for _ in range(unacked):
        await client.expect("MsgChunkAck")
