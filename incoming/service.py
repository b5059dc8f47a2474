"""`make_service`: composes the Incoming!! daemon from small builders."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import IResource

from .backend_api import BackendApi
from .browser_api import BrowserApi
from .cluster import Cluster
from .config import Config
from .frontend import Script
from .handover import HandoverClient, http_client
from .manager import UploadManager
from .metrics import Metrics
from .rfc6455 import WebSocketResource
from .site import IncomingSite, url_tree
from .storage import DiskStorage, Storage
from .tus import TusApi
from .websocket_protocol import UploadProtocolSession


class UploadService(Service):
    """Runs the uploads: restores saved ones at start; at stop, sends clients away
    (close code 1001), lets queued writes land, then stops the disk threads."""

    def __init__(self, manager: UploadManager, pool: ThreadPool) -> None:
        self.manager = manager
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()
        self.manager.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await self.manager.shutdown()
        self.pool.stop()


def build_manager(
    config: Config,
    reactor: Any,
    pool: ThreadPool,
    storage: Storage | None = None,
    clock: IReactorTime | None = None,
) -> UploadManager:
    """The uploads, on `storage` (by default the disk under `config.storage_dir`); their
    timers and the handover's on `clock` (by default the reactor's)."""
    clock = clock or reactor
    metrics = Metrics()
    if storage is None:
        disk = DiskStorage(config.storage_dir, reactor, pool, sha256=config.checksum == "sha256")
        disk.prepare()
        storage = disk
    handover = HandoverClient(http_client(reactor), clock, config.handover_timeout, metrics)
    cluster = None
    if config.redis is not None:  # a crashed holder's lease runs out within the WebSocket timeout
        cluster = Cluster(config.redis, reactor, lease_seconds=config.ws_timeout)
    return UploadManager(
        storage,
        handover,
        clock,
        metrics,
        max_idle=config.max_idle,
        confirm_timeout=config.handover_confirm_timeout,
        max_upload=config.max_upload_bytes,
        cluster=cluster,
        handover_timeout=config.handover_timeout,
        handover_retry=config.handover_retry,
    )


def build_site(
    manager: UploadManager,
    config: Config,
    reactor: Any,
    backend: bool = True,
    browser: bool = True,
) -> IncomingSite:
    """The HTTP site of one listener, serving the given roles."""
    owners: dict[bytes, IResource] = {}
    if backend:
        api = BackendApi(manager, manager.metrics, config.handover_hosts).app.resource()
        owners.update(dict.fromkeys((b"backend", b"metrics", b"health"), api))
    if browser:
        upload_ws = WebSocketResource(
            lambda request: UploadProtocolSession(
                manager,
                reactor,
                chunk_size_kb=config.chunk_size_kb,
                send_ahead=config.send_ahead,
                request_timeout=config.ws_timeout,
                connections=manager.metrics.websocket_connections,
            ),
            reactor,
            config.ws_timeout,
            config.chunk_size,
            config.allowed_origins,
        )
        side = BrowserApi(Script.library(), Script.library(module=True), upload_ws)
        owners[b"frontend"] = side.app.resource()
        tus = TusApi(
            manager,
            reactor,
            block_size=config.chunk_size,
            max_pending=config.chunk_size * config.send_ahead,
            allowed_origins=config.allowed_origins,
            max_upload=config.max_upload_bytes,
            patches=manager.metrics.tus_patches,
            handover_timeout=config.handover_timeout,
        )
        owners[b"tus"] = tus.app.resource()
    return IncomingSite(url_tree(owners), config.max_body_bytes, config.ws_timeout, reactor)


def make_service(config: Config, reactor: Any = global_reactor) -> IService:
    pool = ThreadPool(minthreads=1, maxthreads=8, name="incoming-storage")
    manager = build_manager(config, reactor, pool)
    top = MultiService()
    UploadService(manager, pool).setServiceParent(top)
    separate = config.backend_listen is not None
    listeners = [(config.listen, build_site(manager, config, reactor, backend=not separate))]
    if config.backend_listen is not None:
        listeners.append(
            (config.backend_listen, build_site(manager, config, reactor, browser=False))
        )
    for endpoint, site in listeners:
        StreamServerEndpointService(serverFromString(reactor, endpoint), site).setServiceParent(top)
    return top
