"""Several instances on one Redis and one shared storage directory (SPEC: Several instances).

Redis holds every ticket's record (the JSON its state file holds too), a lease per
upload naming the one instance that may act on it (write it, hand it over, apply a
backend's call), each upload's idle deadline (a sorted set), the uploads whose
handover a crashed instance may have left (a set), and a channel per instance for
requests aimed at an upload it holds. Leases are renewed together, every third of
their life, for all uploads an instance holds: no Redis call is made per chunk. One
instance at a time, the janitor (a lease of its own), expires idle uploads and
takes up handovers whose instance died.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()
Record = dict[str, Any]
PREFIX = "incoming:"
CALL_TIMEOUT = 2.0  # seconds a Redis call may take before Redis counts as unavailable
REQUEST_TIMEOUT = 10.0  # for the holder of an upload to answer (its disk work included)

# Renew the leases that are still ours; take back those that lapsed (Redis lost them
# while it was away); return the keys another instance holds now.
_RENEW = """
local lost = {}
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  elseif not redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    table.insert(lost, key)
  end
end
return lost
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# The record, its idle deadline, and whether a dead instance's handover may wait on it.
_SAVE = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
if ARGV[3] == '1' then redis.call('SADD', KEYS[3], ARGV[4])
else redis.call('SREM', KEYS[3], ARGV[4]) end
"""


class Unavailable(Exception):
    """Redis did not answer in time."""


class Busy(Exception):
    """Another instance holds the upload."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


class RequestFailed(Exception):
    """The instance holding an upload refused a request (an UploadError there)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Cluster:
    """This instance's view of the cluster's Redis."""

    def __init__(
        self, url: str, reactor: IReactorTime, *, lease_seconds: float, instance: str = ""
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ValueError(f"not a redis://host[:port][/db] URL: {url!r}")
        self.host, self.port = parts.hostname, parts.port or 6379
        self.db = int(parts.path.strip("/") or 0)
        self.password = parts.password
        self.reactor = reactor
        self.lease_ms = int(lease_seconds * 1000)
        self.instance = instance or f"{uuid.uuid4().hex[:12]}-{os.getpid()}"
        self._redis: Any = None
        self._listener: Any = None
        self._replies: dict[str, Deferred[dict[str, Any]]] = {}
        # set by the manager: apply a request (`op`, upload id, arguments) to an upload it holds
        self.serve: Callable[[str, str, list[Any]], Awaitable[None]] | None = None

    def _key(self, kind: str, upload_id: str = "") -> str:
        return f"{PREFIX}{kind}:{upload_id}" if upload_id else f"{PREFIX}{kind}"

    # Connections

    def start(self) -> None:
        self._redis = txredisapi.lazyConnectionPool(
            self.host, self.port, dbid=self.db, poolsize=4, password=self.password,
            replyTimeout=CALL_TIMEOUT, convertNumbers=False,
        )  # fmt: skip
        factory = txredisapi.SubscriberFactory(isLazy=True)
        factory.protocol = _Listener
        factory.password, factory.dbid = self.password, None
        factory.cluster = self
        factory.reconnect = True
        factory.startConnecting(TCP4ClientEndpoint(self.reactor, self.host, self.port))
        self._listener = factory

    async def stop(self) -> None:
        for factory in (self._listener,):
            if factory is not None:
                factory.stopTrying()
                factory.disconnect()
        if self._redis is not None:
            await self._redis.disconnect()

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """A Redis command, or Unavailable if Redis does not answer in time."""
        try:
            d: Deferred[Any] = getattr(self._redis, name)(*args, **kwargs)
            return await d.addTimeout(CALL_TIMEOUT, self.reactor)
        except (defer.TimeoutError, txredisapi.ConnectionError, defer.CancelledError):
            raise Unavailable(f"Redis at {self.host}:{self.port} did not answer") from None

    async def reachable(self) -> bool:
        """Whether Redis answers a PING in time."""
        try:
            await self._call("ping")
        except Unavailable:
            return False
        return True

    # Records

    async def create(self, record: Record, deadline: float) -> None:
        await self._save(record, deadline, handing_over=False)

    async def save(self, record: Record, deadline: float, handing_over: bool) -> None:
        await self._save(record, deadline, handing_over)

    async def _save(self, record: Record, deadline: float, handing_over: bool) -> None:
        upload_id = record["id"]
        keys = [self._key("upload", upload_id), self._key("deadlines"), self._key("handovers")]
        args = [json.dumps(record), repr(deadline), "1" if handing_over else "0", upload_id]
        await self._call("eval", _SAVE, keys, args)

    async def read(self, upload_id: str) -> Record | None:
        text = await self._call("get", self._key("upload", upload_id))
        return json.loads(text) if text else None

    async def forget(self, upload_id: str) -> None:
        await self._call("delete", self._key("upload", upload_id))
        await self._call("zrem", self._key("deadlines"), upload_id)
        await self._call("srem", self._key("handovers"), upload_id)

    # Leases

    async def acquire(self, upload_id: str) -> None:
        """Hold the upload's lease, or raise Busy (or Unavailable)."""
        key = self._key("lease", upload_id)
        done = await self._call(
            "set", key, self.instance, pexpire=self.lease_ms, only_if_not_exists=True
        )
        if done:
            return
        holder = await self._call("get", key)
        if holder != self.instance:
            if holder is None:  # it lapsed just now: try once more
                return await self.acquire(upload_id)
            raise Busy(holder)

    async def release(self, upload_id: str) -> None:
        await self._call("eval", _RELEASE, [self._key("lease", upload_id)], [self.instance])

    async def holder(self, upload_id: str) -> str | None:
        holder: str | None = await self._call("get", self._key("lease", upload_id))
        return holder

    async def renew(self, upload_ids: list[str], deadlines: dict[str, float]) -> list[str]:
        """Renew the leases of the uploads held here (and their idle deadlines, which
        activity moved without a Redis call); returns those another instance holds now."""
        if not upload_ids:
            return []
        keys = [self._key("lease", i) for i in upload_ids]
        lost = await self._call("eval", _RENEW, keys, [self.instance, str(self.lease_ms)])
        if deadlines:
            pairs = [x for i, when in deadlines.items() for x in (when, i)]
            await self._call("zadd", self._key("deadlines"), *pairs)
        prefix = len(self._key("lease", "x")) - 1
        return [key[prefix:] for key in lost or []]

    # The janitor: one instance at a time

    async def janitor(self) -> bool:
        """Whether this instance is (still, or now) the janitor."""
        lost = await self._call(
            "eval", _RENEW, [self._key("janitor")], [self.instance, str(self.lease_ms)]
        )
        return not lost

    async def due(self, now: float, limit: int = 100) -> list[str]:
        """Uploads whose idle deadline has passed."""
        found: list[str] = await self._call(
            "zrangebyscore", self._key("deadlines"), "-inf", repr(now), offset=0, count=limit
        )
        return found

    async def populated(self) -> bool:
        """Whether Redis holds the cluster's records (False: it is new, or lost its data)."""
        return bool(await self._call("exists", self._key("populated")))

    async def mark_populated(self) -> None:
        await self._call("set", self._key("populated"), self.instance)

    async def handovers(self) -> list[str]:
        """Uploads in a handover (or waiting for finish_upload)."""
        return list(await self._call("smembers", self._key("handovers")))

    # Requests to the instance holding an upload

    async def request(self, holder: str, op: str, upload_id: str, args: list[Any]) -> None:
        """Have `holder` apply `op` to the upload it holds; raises RequestFailed with its
        refusal, or Unavailable if it does not answer in time."""
        rid = uuid.uuid4().hex
        answer: Deferred[dict[str, Any]] = Deferred()
        self._replies[rid] = answer
        message = {"op": op, "id": upload_id, "args": args, "from": self.instance, "rid": rid}
        try:
            listeners = await self._call("publish", self._key("to", holder), json.dumps(message))
            if not int(listeners or 0):  # the holder is gone; its lease runs out soon
                raise Unavailable(f"instance {holder} is not listening")
            reply = await answer.addTimeout(REQUEST_TIMEOUT, self.reactor)
        except defer.TimeoutError:
            raise Unavailable(f"instance {holder} did not answer") from None
        finally:
            self._replies.pop(rid, None)
        if not reply.get("ok"):
            raise RequestFailed(int(reply.get("code", 99)), str(reply.get("message", "")))

    def _received(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            log.error("unreadable cluster message {m!r}", m=text[:200])
            return
        if "op" not in message:  # a reply to one of our requests
            answer = self._replies.get(message.get("rid", ""))
            if answer is not None and not answer.called:
                answer.callback(message)
            return
        defer.ensureDeferred(self._serve(message))

    async def _serve(self, message: dict[str, Any]) -> None:
        from .errors import UploadError

        reply: dict[str, Any] = {"rid": message.get("rid"), "ok": True}
        try:
            assert self.serve is not None
            await self.serve(str(message["op"]), str(message["id"]), list(message["args"]))
        except UploadError as e:
            reply.update(ok=False, code=int(e.code), message=e.message)
        except Exception as e:  # noqa: BLE001 - the requester must hear of it
            log.failure("cluster request {m!r} failed", m=message)
            reply.update(ok=False, code=99, message=f"internal error: {e.__class__.__name__}")
        try:
            await self._call("publish", self._key("to", str(message["from"])), json.dumps(reply))
        except Unavailable:
            log.error("cannot answer a cluster request: Redis is unavailable")


class _Listener(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """Subscribes (again, after every reconnection) to this instance's channel."""

    @defer.inlineCallbacks
    def connectionMade(self) -> Any:
        yield txredisapi.SubscriberProtocol.connectionMade(self)
        cluster: Cluster = self.factory.cluster
        yield self.subscribe(cluster._key("to", cluster.instance))

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.cluster._received(message)


async def rebuild(cluster: Cluster, records: list[Record]) -> int:
    """Put every record saved in a storage directory back into Redis (after Redis lost
    its data); returns how many. Their idle deadlines are their own."""
    from .upload import Upload

    for record in records:
        upload = Upload.from_record(record, 0)
        await cluster.save(record, upload.idle_deadline, upload.with_backend)
    return len(records)


def main(argv: list[str] | None = None) -> None:
    """`python -m incoming.cluster --redis URL --storage-dir DIR`: rebuild Redis from the
    directory the instances share (run it with the instances stopped)."""
    import argparse
    from pathlib import Path

    from twisted.internet import task
    from twisted.python.threadpool import ThreadPool

    from .storage import DiskStorage

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--storage-dir", required=True, type=Path)
    args = parser.parse_args(argv)

    async def run(reactor: Any) -> None:
        pool = ThreadPool(minthreads=0, maxthreads=1)
        records = [saved.record for saved in DiskStorage(args.storage_dir, reactor, pool).load()]
        cluster = Cluster(args.redis, reactor, lease_seconds=60)
        cluster.start()
        try:
            count = await rebuild(cluster, records)
        finally:
            await cluster.stop()
        print(f"{count} uploads put back into {args.redis}")

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
