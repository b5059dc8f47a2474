"""`make_service`: composes the Incoming!! daemon from small builders."""

from __future__ import annotations

import grp
import os
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import IService, MultiService, Service
from twisted.internet import address
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import IResource

from . import __version__
from .access import Access
from .backend_api import BackendApi
from .browser_api import BrowserApi
from .cluster import Cluster
from .config import Config
from .frontend import Script
from .handover import HandoverClient, http_client
from .manager import UploadManager
from .metrics import Metrics
from .objectstore import MAX_OBJECT_SIZE, ObjectStore, StoreError, StoreUnavailable, make_client
from .rfc6455 import WebSocketResource
from .site import IncomingSite, url_tree
from .spool import SpoolStorage
from .storage import DiskStorage, Storage
from .tus import TusApi
from .websocket_protocol import UploadProtocolSession
from .window import SYNC_COVER, Window

log = Logger(namespace="incoming")


class StartupError(Exception):
    """The daemon cannot start; the message is the one line the operator reads."""


SYNC_THREADS = 16  # uploads' fdatasyncs under way at once (at most one per upload)
STORE_THREADS = 16  # object store calls under way at once (a few parts per upload)


class UploadService(Service):
    """Runs the uploads: restores saved ones at start; at stop, sends clients away
    (close code 1001), lets queued writes land, then stops the disk threads."""

    def __init__(self, manager: UploadManager, *pools: ThreadPool) -> None:
        self.manager = manager
        self.pools = pools

    def startService(self) -> None:
        super().startService()
        for pool in self.pools:
            pool.start()
        self.manager.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await self.manager.shutdown()
        for pool in self.pools:
            pool.stop()


def build_manager(
    config: Config,
    reactor: Any,
    pool: ThreadPool,
    storage: Storage | None = None,
    clock: IReactorTime | None = None,
    sync_pool: ThreadPool | None = None,
    store_pool: ThreadPool | None = None,
) -> UploadManager:
    """The uploads, on `storage`: by default the disk under `config.storage_dir`, or with
    `config.storage` the object store, by way of a spool there (its calls in
    `store_pool`, by default `pool`). Their timers and the handover's on `clock` (by
    default the reactor's); fsyncs in `sync_pool` (by default `pool`). Raises OSError if
    the directory cannot be used, StoreError if the store cannot (StoreUnavailable, if it
    does not answer, is logged)."""
    clock = clock or reactor
    metrics = Metrics()
    max_upload, max_unsized = config.max_upload_bytes, None
    if storage is None:
        group = grp.getgrnam(config.group).gr_gid if config.group is not None else None
        options: dict[str, Any] = {
            "sha256": config.checksum == "sha256",
            "sync": config.sync == "fsync",
            "sync_pool": sync_pool,
            "group": group,
        }
        disk: DiskStorage
        if config.storage is None:
            disk = DiskStorage(config.storage_dir, reactor, pool, **options)
        else:
            store = ObjectStore(
                config.storage,
                reactor,
                store_pool or pool,
                make_client(config.s3_endpoint, connections=STORE_THREADS),
                config.s3_endpoint,
            )
            try:
                store.check()
            except StoreUnavailable as e:
                log.warn("the object store does not answer yet: {e}", e=e)
            spool = SpoolStorage(
                config.storage_dir, reactor, pool, store, part_size=config.s3_part_size,
                max_upload=max_upload, cluster=config.redis is not None,
                patience=config.ws_timeout, **options,
            )  # fmt: skip
            disk, max_unsized = spool, spool.max_unsized
            max_upload = min(max_upload or MAX_OBJECT_SIZE, MAX_OBJECT_SIZE)
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
        max_upload=max_upload,
        max_unsized=max_unsized,
        cluster=cluster,
        min_free=config.chunk_size,
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
        access = Access(config.backend_networks, config.handover_hosts, config.open_access)
        api = BackendApi(manager, manager.metrics, access, guarded=browser).app.resource()
        owners.update(dict.fromkeys((b"backend", b"metrics", b"health"), api))
    if browser:
        window = Window(
            config.chunk_size,
            config.send_ahead,
            config.max_window,
            config.window_rate_mbit * 1e6 / 8,
            SYNC_COVER if config.sync == "fsync" else 0,
        )
        upload_ws = WebSocketResource(
            lambda request: UploadProtocolSession(
                manager,
                reactor,
                window=window,
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


class Listener(Service):
    """One listening endpoint serving `roles`. Not being able to listen (a busy port)
    ends the process at start, with the reason: a daemon with nothing listening would
    look alive to systemd and to whoever waits for it."""

    def __init__(
        self,
        description: str,
        endpoint: IStreamServerEndpoint,
        site: Any,
        roles: str,
        reactor: Any = global_reactor,
    ) -> None:
        self.description = description
        self.endpoint = endpoint
        self.site = site
        self.roles = roles
        self.reactor = reactor
        self.port: IListeningPort | None = None
        self.failed = False
        self._starting = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._starting = True
        self.endpoint.listen(self.site).addCallbacks(self._listening, self._failed)
        self._starting = False
        if self.failed:
            raise SystemExit(1)  # twistd has not started the reactor yet: it exits

    def _listening(self, port: IListeningPort) -> None:
        self.port = port

    def _failed(self, failure: Failure) -> None:
        error = getattr(failure.value, "socketError", None)  # CannotListenError's cause
        log.critical(
            "cannot listen on {endpoint} ({roles}): {reason}",
            endpoint=self.description,
            roles=self.roles,
            reason=getattr(error, "strerror", None) or failure.getErrorMessage(),
        )
        self.failed = True
        if not self._starting:  # an endpoint that listens later (not tcp, ssl, unix, systemd)
            self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            self.reactor.stop()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is None:
            return None
        return self.port.stopListening()

    def where(self) -> str:
        """The address it listens on (the real port when 0 was asked)."""
        if self.port is None:
            return self.description
        host = self.port.getHost()
        if isinstance(host, address.IPv6Address):
            return f"[{host.host}]:{host.port}"
        if isinstance(host, address.IPv4Address):
            return f"{host.host}:{host.port}"
        if isinstance(host, address.UNIXAddress) and host.name is not None:
            name = host.name.decode() if isinstance(host.name, bytes) else host.name
            return f"unix:{name}"
        return self.description


class StartupSummary(Service):
    """Logs once, when everything listens and the reactor runs (signals are handled),
    what an operator checks first; whoever waits for the daemon can wait for it."""

    def __init__(
        self, config: Config, listeners: list[Listener], reactor: Any = global_reactor
    ) -> None:
        self.config = config
        self.listeners = listeners
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(lambda: log.info("{summary}", summary=self.summary()))

    def summary(self) -> str:
        config = self.config
        places = []
        for listener in self.listeners:
            place = f"{listener.roles} on {listener.where()}"
            if listener.roles == "browser and backend":
                callers = ["this host", *sorted(map(str, config.backend_networks))]
                place += (
                    f" (backend API for {'anyone' if config.open_access else ', '.join(callers)})"
                )
            places.append(place)
        storage = f"storage {config.storage_dir.absolute()}"
        if config.storage is not None:
            at = f" at {config.s3_endpoint}" if config.s3_endpoint else ""
            storage = f"storage {config.storage}{at}, spool {config.storage_dir.absolute()}"
        if config.group is not None:
            storage += f" shared with group {config.group}"
        if config.redis is None:
            mode = "single process"
        else:
            redis = urlsplit(config.redis)  # never its password
            mode = f"cluster mode, Redis at {redis.hostname}:{redis.port or 6379}{redis.path}"
        return f"Incoming!! {__version__} started: {'; '.join(places)}; {storage}; {mode}"


def make_service(config: Config, reactor: Any = global_reactor) -> IService:
    """The daemon: the uploads, a listener per endpoint, the start-up summary.
    Raises StartupError when the storage or an endpoint cannot be used."""
    pool = ThreadPool(minthreads=1, maxthreads=8, name="incoming-storage")
    syncs = ThreadPool(minthreads=0, maxthreads=SYNC_THREADS, name="incoming-sync")
    pools = [pool, syncs]
    if config.storage is not None:
        pools.append(ThreadPool(minthreads=0, maxthreads=STORE_THREADS, name="incoming-s3"))
    try:
        manager = build_manager(config, reactor, pool, sync_pool=syncs, store_pool=pools[-1])
    except StoreError as e:
        raise StartupError(f"cannot use the object store {config.storage}: {e}") from None
    except OSError as e:
        raise StartupError(
            f"cannot use the storage directory {config.storage_dir}: {e.strerror or e}"
        ) from None
    top = MultiService()
    UploadService(manager, *pools).setServiceParent(top)
    separate = config.backend_listen is not None
    roles = "browser" if separate else "browser and backend"
    plan = [(config.listen, roles, build_site(manager, config, reactor, backend=not separate))]
    if config.backend_listen is not None:
        site = build_site(manager, config, reactor, browser=False)
        plan.append((config.backend_listen, "backend", site))
    listeners = []
    for description, roles, site in plan:
        try:
            endpoint = serverFromString(reactor, description)
        except (ValueError, KeyError, TypeError) as e:
            raise StartupError(f"bad endpoint {description!r} ({roles}): {e}") from None
        listener = Listener(description, endpoint, site, roles, reactor)
        listener.setServiceParent(top)
        listeners.append(listener)
    StartupSummary(config, listeners, reactor).setServiceParent(top)
    return top
