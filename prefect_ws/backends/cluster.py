"""``redis+cluster://host:port,host:port``: the Redis backend on a Redis Cluster (Redis 7+).

The same keys, script and history reads as :mod:`~.redis`, placed so that a run lives on one
shard and its events touch only that shard:

- every key of a run and its channel carry the run id as a hash tag (``prefix:{run}:seq``,
  ``:events``, ``:batches``, channel ``prefix:{run}``), so they share one hash slot and the
  publish script (one ``EVALSHA`` per batch) runs atomically on the run's master;
- events go out with ``SPUBLISH`` (sharded pub/sub): only the run's shard carries them, where
  classic ``PUBLISH`` would be copied to every node of the cluster;
- the recent-runs index is not one hot key and not in the script (a script may only touch its
  run's slot): each publishing process adds a run to one of :data:`INDEX_BUCKETS` sorted sets
  (hash-tagged apart, so spread over the shards) at most once per :data:`INDEX_INTERVAL`
  seconds per run; the index page merges the buckets' newest entries;
- the server listens with one connection per master (``SSUBSCRIBE`` is served by the channel's
  master only). After a connection loss, a node restart, a failover or a slot migration (the
  old owner sends ``sunsubscribe``), it refreshes the slot map, subscribes each run on its
  current master and emits :data:`~.base.RESYNC` for it once confirmed, so the hub replays
  what was missed from the run's history, as after a single Redis's restart.

redis-py's cluster client follows ``MOVED``/``ASK`` and retries ``TRYAGAIN`` for commands; a
slot left uncovered (its master down, no replica) surfaces as
:class:`~.base.BackendUnavailable`, which the server answers with 1013/503 "reconnect with
since", never 1011.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from prefect_ws.backends.base import BackendUnavailable, RecentRun, RunInfo
from prefect_ws.backends.redis import (
    _NETWORK_ERRORS,
    PUBLISH_SCRIPT,
    PubSubListener,
    RedisBackend,
)

logger = logging.getLogger("prefect_ws.transport")

SCHEMES: Final = ("redis+cluster", "rediss+cluster")
INDEX_BUCKETS: Final = 16
INDEX_INTERVAL: Final = 1.0  # seconds between index updates of one run from one process
INDEX_KEPT: Final = 1000  # newest runs kept per bucket

# The single-Redis script with SPUBLISH for PUBLISH, and without its recent-runs index: the
# script updates the index only `if KEYS[3]`, and the index lives outside the run's slot, so
# KEYS[3] (the run's own seq key here, to stay in the slot) is blanked before it runs.
_PUBLISH = "redis.call('PUBLISH', ARGV[1],"
if _PUBLISH not in PUBLISH_SCRIPT or "if KEYS[3] then" not in PUBLISH_SCRIPT:
    raise ImportError("prefect_ws.backends.redis.PUBLISH_SCRIPT changed: update cluster.py")
CLUSTER_PUBLISH_SCRIPT: Final = "KEYS[3] = false\n" + PUBLISH_SCRIPT.replace(
    _PUBLISH, "redis.call('SPUBLISH', ARGV[1],"
)

T = TypeVar("T")
K = TypeVar("K")
R = TypeVar("R")


class ClusterUnreachable(BackendUnavailable):
    """Cluster nodes that do not answer; the message names them."""


@dataclass(frozen=True)
class ClusterUrl:
    """A parsed ``redis+cluster://[user:password@]host:port,host:port`` URL."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> ClusterUrl:
        scheme, sep, _ = url.partition("://")
        if not sep or scheme.lower() not in SCHEMES:
            raise ValueError(f"not a cluster URL: use {SCHEMES[0]}://host:port,host:port")
        rest = url[len(scheme) + 3 :]
        credentials, _, hosts = rest.rpartition("@")
        hosts = hosts.split("/", 1)[0].split("?", 1)[0]
        nodes = []
        for item in hosts.split(","):
            if not item.strip():
                continue
            parts = urlsplit(f"//{item.strip()}")
            try:
                port = parts.port or 6379
            except ValueError:
                raise ValueError(f"invalid port in cluster node {item.strip()!r}") from None
            if not parts.hostname:
                raise ValueError(f"invalid cluster node {item.strip()!r}: expected host:port")
            nodes.append((parts.hostname, port))
        if not nodes:
            raise ValueError("a cluster URL names at least one node: host:port,host:port")
        username, _, password = credentials.partition(":") if credentials else ("", "", "")
        return cls(
            tuple(nodes),
            unquote(username) or None,
            unquote(password) or None,
            scheme.lower() == "rediss+cluster",
        )

    @property
    def client_options(self) -> dict[str, Any]:
        return {"username": self.username, "password": self.password, "ssl": self.tls}

    def names(self) -> list[str]:
        return [f"{host}:{port}" for host, port in self.nodes]


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SCHEMES


async def check_cluster(url: str, timeout: float = 3.0) -> None:
    """Raise :class:`ClusterUnreachable` naming every node of ``url`` that does not answer
    PING, or naming the cluster when its slots are not all served. For start-up."""
    parsed = ClusterUrl.parse(url)

    async def ping(host: str, port: int) -> str | None:
        client = aioredis.Redis(
            host=host,
            port=port,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # report the first failure as it is
            **parsed.client_options,
        )
        try:
            await asyncio.wait_for(client.ping(), timeout)
            info = await asyncio.wait_for(client.execute_command("CLUSTER", "INFO"), timeout)
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return f"{host}:{port} (cluster state not ok)"
            return None
        except Exception as exc:
            return f"{host}:{port} ({str(exc) or type(exc).__name__})"
        finally:
            await client.aclose()

    failures = [f for f in await asyncio.gather(*(ping(h, p) for h, p in parsed.nodes)) if f]
    if failures:
        raise ClusterUnreachable("Redis Cluster node(s) unreachable: " + ", ".join(failures))


async def _each_alone(read: Callable[[list[K]], Awaitable[list[R]]], items: list[K]) -> list[R]:
    """``read(items)`` made as one call per item, all at once."""
    replies = await asyncio.gather(*(read([item]) for item in items))
    return [result for reply in replies for result in reply]


class ClusterBackend(RedisBackend):
    """:class:`RedisBackend` on a Redis Cluster: see the module's docstring."""

    name = "redis-cluster"
    publish_script = CLUSTER_PUBLISH_SCRIPT

    def __init__(self, url: str, **options: Any) -> None:
        self._parsed = ClusterUrl.parse(url)
        super().__init__(url, **options)
        self._display_url = f"{SCHEMES[1] if self._parsed.tls else SCHEMES[0]}://" + ",".join(
            self._parsed.names()
        )
        self._listeners: dict[str, PubSubListener] = {}  # master name -> its listener
        self._owner: dict[str, str] = {}  # run id -> name of the listener it is subscribed on
        self._topology_changed = asyncio.Event()
        self._indexed: OrderedDict[str, float] = OrderedDict()  # run id -> last index update

    def _clients(self, url: str) -> tuple[Any, Any]:
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in self._parsed.nodes],
            require_full_coverage=False,  # the other shards serve while one is down
            socket_connect_timeout=2.0,
            socket_timeout=5.0,
            max_connections=100,
            **self._parsed.client_options,
        )
        return client, None  # pub/sub: one connection per master (_listener_on)

    def _script_keys(self, run_id: str) -> list[str]:
        keys = super()._script_keys(run_id)
        # KEYS[3] must share the run's slot; the script ignores it (see CLUSTER_PUBLISH_SCRIPT).
        keys[2] = keys[0]
        return keys

    # A script's keys must share one slot: one call per run, the calls at once.
    async def _read_infos(self, run_ids: list[str]) -> list[RunInfo]:
        return await _each_alone(super()._read_infos, run_ids)

    async def _read_history(self, pages: list[tuple[str, int, int]]) -> list[list[str]]:
        return await _each_alone(super()._read_history, pages)

    async def connect(self) -> None:
        self._topology_changed = asyncio.Event()
        await super().connect()

    async def disconnect(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        for listener in list(self._listeners.values()):
            await listener.close()
        self._listeners.clear()
        self._owner.clear()
        self._confirmed.clear()
        await self._redis.aclose()

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, channel: str, message: Any) -> None:
        await super().publish(channel, message)
        if message:
            await self._touch_index(channel)

    def _index_key(self, run_id: str) -> str:
        bucket = zlib.crc32(run_id.encode()) % INDEX_BUCKETS
        return f"{self._prefix}:recent-runs:{{{bucket}}}"

    async def _touch_index(self, run_id: str) -> None:
        """Add the run to its index bucket, at most once per INDEX_INTERVAL from this process.

        Not atomic with the publish, and never fails it: an update lost to a crash or to the
        bucket's shard being down is redone by the run's next batch. The index only lists
        runs; streams never read it.
        """
        now = time.time()
        if now - self._indexed.get(run_id, 0.0) < INDEX_INTERVAL:
            return
        self._indexed[run_id] = now
        self._indexed.move_to_end(run_id)
        if len(self._indexed) > 10_000:
            self._indexed.popitem(last=False)
        key = self._index_key(run_id)

        async def write() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zadd(key, {self.channel_name(run_id): now})
                pipe.zremrangebyrank(key, 0, -INDEX_KEPT - 1)
                pipe.expire(key, self._ttl)
                await pipe.execute()

        try:
            await write()
        except (RedisError, RedisClusterException, OSError) as exc:
            # The bucket's shard is down: the events are stored, so the publish succeeded;
            # the run's next batch tries the index again.
            del self._indexed[run_id]
            logger.debug("recent-runs index update of run %s failed (%s)", run_id, exc)

    async def recent_runs(self, limit: int) -> list[RecentRun]:
        """Newest first, merged from the index buckets; each run's head read on its shard."""
        if limit <= 0:
            return []
        buckets = [f"{self._prefix}:recent-runs:{{{b}}}" for b in range(INDEX_BUCKETS)]

        async def read() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in buckets:
                    pipe.zrevrange(key, 0, limit - 1, withscores=True)
                return list(await pipe.execute())

        merged: list[tuple[bytes, float]] = []
        for members in await self._once_more_on_stale_connection(read):
            merged.extend(members)
        merged.sort(key=lambda item: item[1], reverse=True)
        merged = merged[:limit]
        channels = [member.decode("utf-8", "replace") for member, _ in merged]

        async def heads() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for channel in channels:
                    pipe.get(f"{channel}:seq")
                return list(await pipe.execute())

        values = await self._once_more_on_stale_connection(heads) if channels else []
        return [
            RecentRun(channel[len(self._prefix) + 2 : -1], float(score), int(head or 0))
            for channel, (_, score), head in zip(channels, merged, values, strict=True)
        ]

    async def ping(self) -> None:
        """PING every master; raise naming the ones that do not answer."""
        try:
            if not self._redis.get_primaries():  # no command yet: read the slot map first
                await asyncio.wait_for(self._redis.initialize(), 5.0)
            primaries = self._redis.get_primaries()
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            raise ClusterUnreachable(f"Redis Cluster {self._display_url}: {reason}") from None

        async def ping(node: ClusterNode) -> str | None:
            try:
                await asyncio.wait_for(self._redis.execute_command("PING", target_nodes=node), 2.0)
                return None
            except Exception as exc:
                return f"{node.name} ({str(exc) or type(exc).__name__})"

        failures = [f for f in await asyncio.gather(*(ping(n) for n in primaries)) if f]
        if failures:
            raise ClusterUnreachable("Redis Cluster node(s) unreachable: " + ", ".join(failures))

    async def _once_more_on_stale_connection(self, command: Callable[[], Awaitable[T]]) -> T:
        """Run a command; redis-py has followed MOVED/ASK and retried TRYAGAIN already.

        What still fails (a master down with no replica to take over, a slot map being
        rebuilt) is retried once after a slot-map refresh, then raised as
        :class:`BackendUnavailable` so the server answers "reconnect with since" rather than an
        internal error.
        """
        try:
            return await command()
        except (*_NETWORK_ERRORS, RedisClusterException):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._redis.nodes_manager.initialize(), 5.0)
        try:
            return await command()
        except (*_NETWORK_ERRORS, RedisClusterException) as exc:
            raise ClusterUnreachable(f"Redis Cluster {self._display_url}: {exc}") from exc

    # -- listening ----------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)
        self._started.set()
        if self._listener is not None and self._listeners_ready:
            await self._place(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        self._confirmed.discard(channel)
        name = self._owner.pop(channel, None)
        listener = self._listeners.get(name) if name else None
        if listener is not None:
            await listener.remove(channel)

    @property
    def _listeners_ready(self) -> bool:
        return bool(self._redis.nodes_manager.slots_cache)

    def _node_of(self, run_id: str) -> ClusterNode:
        slot = key_slot(self.channel_name(run_id).encode())
        return self._redis.nodes_manager.get_node_from_slot(slot)

    async def _place(self, run_id: str) -> None:
        """Subscribe the run on the master that serves its slot now (moving it if needed)."""
        try:
            node = self._node_of(run_id)
        except RedisClusterException:
            self._topology_changed.set()  # slot not covered: retried after the next refresh
            return
        current = self._owner.get(run_id)
        if current == node.name:
            return
        if current is not None and current in self._listeners:
            await self._listeners[current].remove(run_id)
        listener = self._listeners.get(node.name)
        if listener is None:
            listener = self._listeners[node.name] = self._listener_on(node)
        self._owner[run_id] = node.name
        await listener.add(run_id)

    def _listener_on(self, node: ClusterNode) -> PubSubListener:
        """A started sharded pub/sub listener on ``node``: a run's SSUBSCRIBE is served by the
        master of its slot only."""
        client = aioredis.Redis(
            host=node.host,
            port=int(node.port),
            socket_connect_timeout=2.0,
            health_check_interval=10,
            **self._parsed.client_options,
        )
        name = f"Redis Cluster node {node.name}"
        listener = PubSubListener(self, client, name=name, channels=set(), sharded=True)
        listener.start()
        return listener

    def _slots_may_have_moved(self) -> None:
        self._topology_changed.set()

    async def _listen(self) -> None:
        """Keep every subscribed run placed on its master; re-place all after a topology event.

        The per-master listeners deliver; this task only refreshes the slot map when one of
        them reports a failure, an unexpected ``sunsubscribe`` or a ``MOVED``, and moves the
        runs whose slot changed master (the new subscription's RESYNC replays what was missed).
        """
        await self._started.wait()
        delay = 0.05
        while True:
            try:
                self._topology_changed.clear()
                await asyncio.wait_for(self._redis.nodes_manager.initialize(), 10.0)
                for run_id in list(self._channels):
                    await self._place(run_id)
                for name, listener in list(self._listeners.items()):
                    if not listener.channels:  # e.g. a master replaced in a failover
                        del self._listeners[name]
                        await listener.close()
                delay = 0.05
                await self._topology_changed.wait()
                await asyncio.sleep(0.1)  # let a burst of reports settle into one refresh
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("Redis Cluster slot map refresh failed (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._reconnect_max_delay)
