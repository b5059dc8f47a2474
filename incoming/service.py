"""`makeService`: composes the Incoming!! daemon from small builders."""

from __future__ import annotations

import gc
from typing import Any

from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent, HTTPConnectionPool

from .api import IncomingApi, IncomingSite
from .config import Config
from .frontend import Script
from .handover import Backend
from .manager import UploadManager
from .metrics import Metrics
from .storage import Storage
from .uploads import Registry
from .websocket import WebSocketResource
from .ws import UploadSession


class UploadService(Service):
    """Runs the uploads: restores saved ones at start; at stop, sends browsers away
    (close code 1001), lets queued writes land, then stops the disk threads."""

    def __init__(self, manager: UploadManager, pool: ThreadPool) -> None:
        self.manager = manager
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()
        self.manager.restore()
        # The start-up objects (modules, restored uploads) live as long as the
        # process: keep them out of the garbage collector's full passes, which
        # otherwise cost a ticket ~20 % more CPU once 20,000 tickets are open.
        gc.freeze()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await self.manager.shutdown()
        self.pool.stop()


def handover_client(reactor: Any) -> HTTPClient:
    """A fresh connection per handover: backends often drop idle keep-alives."""
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


def build_manager(
    config: Config, reactor: Any, pool: ThreadPool, storage_class: type[Storage] = Storage
) -> UploadManager:
    metrics = Metrics()
    storage = storage_class(config.storage_dir, reactor, pool)
    storage.prepare()
    backend = Backend(handover_client(reactor), reactor, config.handover_timeout, metrics)
    return UploadManager(config, Registry(), storage, backend, reactor, metrics)


def build_site(
    manager: UploadManager, reactor: Any, backend: bool = True, frontend: bool = True
) -> IncomingSite:
    """The HTTP site of one listener, serving the given roles."""
    config = manager.config
    upload_ws = WebSocketResource(
        lambda request: UploadSession(manager),
        reactor,
        config.ws_timeout,
        config.chunk_size,
        config.allowed_origins,
    )
    api = IncomingApi(
        manager,
        backend=backend,
        frontend=frontend,
        script=Script.library(),
        module=Script.library(module=True),
        upload_ws=upload_ws,
        handover_hosts=config.handover_hosts,
    )
    return IncomingSite(api.resource(), config.max_body_bytes, config.ws_timeout, reactor)


def make_service(config: Config, reactor: Any = global_reactor) -> IService:
    pool = ThreadPool(minthreads=1, maxthreads=8, name="incoming-storage")
    manager = build_manager(config, reactor, pool)
    top = MultiService()
    UploadService(manager, pool).setServiceParent(top)
    separate = config.backend_listen is not None
    listeners = [(config.listen, build_site(manager, reactor, backend=not separate))]
    if config.backend_listen is not None:
        listeners.append((config.backend_listen, build_site(manager, reactor, frontend=False)))
    for endpoint, site in listeners:
        StreamServerEndpointService(serverFromString(reactor, endpoint), site).setServiceParent(top)
    return top
