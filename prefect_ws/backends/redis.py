"""``redis://``: many flow processes, many server replicas.

broadcaster 0.3.1 ships a Redis backend that delivers nothing with redis-py 8 (it wakes its
listener before SUBSCRIBE is registered), never reconnects and dies silently on a bad payload.
This one:

- publishes with one Lua script per batch: ``INCRBY`` the run's sequence, ``XADD`` each event to
  the run's capped stream under the id ``<seq>-0`` (so history is a ``seq`` range), ``PUBLISH`` the
  batch, and refresh both keys' TTL. Any number of publishers agree on one order;
- ends a run once: the same script sets the run's ``ended`` key with its ``run_complete`` and
  refuses every later batch, so of the flow's hooks and any number of reconciling replicas
  exactly one ends the run (:meth:`RedisBackend.publish_end`);
- listens on one pub/sub connection per process (a :class:`PubSubListener`) and, after any
  connection loss, reconnects with backoff, resubscribes every channel and emits :data:`RESYNC`
  for each, so the hub replays what was missed from the stream;
- never raises out of ``next_published``, so broadcaster's listener task never dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sys
from collections.abc import Awaitable, Callable, Collection
from functools import partial
from typing import Any, Final, TypeVar

import redis
import redis.asyncio as aioredis
from broadcaster import Event
from redis.exceptions import AskError, MaxConnectionsError, NoScriptError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from prefect_ws.backends.base import (
    RESYNC,
    BackendUnavailable,
    Batch,
    BatchSink,
    PublishResult,
    RecentRun,
    RunInfo,
    StreamBackend,
    safe_url,
)
from prefect_ws.backends.coalesce import Coalescer
from prefect_ws.protocol.events import Draft

logger = logging.getLogger("prefect_ws.transport")

# KEYS[1] sequence counter, KEYS[2] history stream, KEYS[3] recent-runs index (sorted set),
# KEYS[4] stored batches per publisher, KEYS[5] the history's epoch (set with the counter),
# KEYS[6] the "ended" marker.
# ARGV[1] pub/sub channel, ARGV[2] MAXLEN, ARGV[3] TTL seconds, ARGV[4] publisher id, ARGV[5]
# batch number, ARGV[6] the head the batch requires ('' for any), then (head, tail) pairs.
# Returns the newest seq, REFUSED_ENDED when the run had ended, REFUSED_MOVED when the head moved.
PUBLISH_SCRIPT: Final = """
if redis.call('EXISTS', KEYS[6]) == 1 then
  return -1  -- the run ended: nothing of a run follows its run_complete
end
if ARGV[6] ~= '' and tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[6]) then
  return -2
end
if ARGV[4] ~= '' then
  -- A batch a publisher sends again (its reply was lost) is stored once: KEYS[4] maps each
  -- publisher id to the number of its newest stored batch for this run.
  local stored = tonumber(redis.call('HGET', KEYS[4], ARGV[4]) or '0')
  if stored >= tonumber(ARGV[5]) then
    return tonumber(redis.call('GET', KEYS[1]) or '0')
  end
  redis.call('HSET', KEYS[4], ARGV[4], ARGV[5])
  redis.call('EXPIRE', KEYS[4], ARGV[3])
end
local n = (#ARGV - 6) / 2
local final = '{"v":1,"type":"run_complete"'
local ended = false
for i = 0, n - 1 do
  if string.sub(ARGV[7 + 2 * i], 1, #final) == final then
    n = i + 1  -- events after run_complete in the same batch are dropped with it
    ended = true
    break
  end
end
local last = redis.call('INCRBY', KEYS[1], n)
if last == n or redis.call('EXISTS', KEYS[5]) == 0 then
  -- A new counter: a new history (also after Redis came back empty).
  local now = redis.call('TIME')
  redis.call('SET', KEYS[5], now[1] .. '.' .. now[2] .. '.' .. last, 'EX', ARGV[3])
end
local seq = last - n
local out = {}
for i = 0, n - 1 do
  seq = seq + 1
  local text = ARGV[7 + 2 * i] .. seq .. ARGV[8 + 2 * i]
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], seq .. '-0', 'd', text)
  out[i + 1] = text
end
redis.call('PUBLISH', ARGV[1], table.concat(out, '\\n'))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[5], ARGV[3])
if ended then
  redis.call('SET', KEYS[6], last, 'EX', ARGV[3])
end
if KEYS[3] then
  local now = redis.call('TIME')
  redis.call('ZADD', KEYS[3], now[1] + now[2] / 1000000, ARGV[1])
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -1001)  -- keep the newest 1000 runs
  redis.call('EXPIRE', KEYS[3], ARGV[3])
end
return last
"""

# What a stream's start needs of runs, in one command for many (see coalesce.py): for each run
# KEYS[i] sequence counter, KEYS[i+1] history stream, KEYS[i+2] epoch; for each, the head, the
# oldest entry's id, the newest event's text and the epoch (false: absent). An entry's only
# field is "d" (PUBLISH_SCRIPT), so its text is the second item of its field list.
INFO_SCRIPT: Final = """
local out = {}
for i = 1, #KEYS, 3 do
  local first = redis.call('XRANGE', KEYS[i + 1], '-', '+', 'COUNT', 1)[1]
  local last = redis.call('XREVRANGE', KEYS[i + 1], '+', '-', 'COUNT', 1)[1]
  out[#out + 1] = {redis.call('GET', KEYS[i]), first and first[1] or false,
                   last and last[2][2] or false, redis.call('GET', KEYS[i + 2])}
end
return out
"""

# Pages of history, as the events' texts alone: for each KEYS[i] (a history stream), the
# entries from id ARGV[2i-1], at most ARGV[2i]. redis-py parsed XRANGE into a dict per entry.
HISTORY_SCRIPT: Final = """
local out = {}
for i = 1, #KEYS do
  local texts = {}
  local entries = redis.call('XRANGE', KEYS[i], ARGV[2 * i - 1], '+', 'COUNT', ARGV[2 * i])
  for j, entry in ipairs(entries) do
    texts[j] = entry[2][2]
  end
  out[i] = texts
end
return out
"""

_NETWORK_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
T = TypeVar("T")


class PubSubListener:
    """A pub/sub connection that stays subscribed to ``channels`` (run ids) through any failure.

    After any failure it reconnects with backoff (0.05 s, doubled up to the backend's
    ``reconnect_max_delay``) and resubscribes every channel it was asked for. It hands each
    message to the backend's queue and each confirmed (re)subscription as :data:`RESYNC`, so the
    hub replays from the run's history what an outage cost; a channel is live for the backend
    (``_confirmed``) from its confirmation until this connection closes.

    One Redis has one listener for every run, with classic ``SUBSCRIBE``. A Redis Cluster has one
    per master with sharded pub/sub (``sharded``: ``SSUBSCRIBE``, one slot per command), where
    the server also drops a channel whose slot moved (an ``sunsubscribe`` not asked for) or
    answers ``MOVED``: both, and any connection loss, are reported to the backend
    (:meth:`RedisBackend._slots_may_have_moved`) so it can place the runs anew.

    The connection also subscribes an anchor channel and keeps it, so redis-py never sees the
    connection unsubscribed from everything: in that state its next SUBSCRIBE first drains the
    socket for health-check replies and fails on a pending UNSUBSCRIBE reply, which lost
    subscriptions under churn.
    """

    def __init__(
        self,
        backend: RedisBackend,
        client: Any,
        *,
        name: str,
        channels: set[str],
        sharded: bool,
    ) -> None:
        self.name = name  # the server, as log lines may show it: never a credential
        self.channels = channels
        self._backend = backend
        self._client = client
        self._sharded = sharded
        s = "s" if sharded else ""  # SSUBSCRIBE, SUNSUBSCRIBE and "smessage" when sharded
        self._subscribe, self._unsubscribe, self._message = (
            f"{s}subscribe",
            f"{s}unsubscribe",
            f"{s}message",
        )
        self._pubsub: Any = None
        self._subscribes = Coalescer(partial(self._command, self._subscribe), max_batch=1000)
        self._unsubscribes = Coalescer(partial(self._command, self._unsubscribe), max_batch=1000)
        self._reconnect = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"prefect-ws pub/sub: {self.name}")

    async def close(self) -> None:
        """Stop listening; close the connection and the client."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._close_pubsub()
        with contextlib.suppress(Exception):
            await self._client.aclose()

    async def add(self, run_id: str) -> None:
        self.channels.add(run_id)
        await self._subscribes(run_id)

    async def remove(self, run_id: str) -> None:
        self.channels.discard(run_id)
        self._backend._confirmed.discard(run_id)
        await self._unsubscribes(run_id)

    async def _command(self, command: str, run_ids: list[str]) -> list[None]:
        """(UN)SUBSCRIBE on the open connection; on any failure, make it reconnect.

        Reconnecting resubscribes every channel, so a lost command costs a RESYNC, never a stuck
        subscription. Concurrent calls of :meth:`add` (or :meth:`remove`) make one command.
        """
        pubsub = self._pubsub
        if pubsub is None:
            return [None] * len(run_ids)  # not connected: _open subscribes self.channels
        try:
            await asyncio.wait_for(self._send(pubsub, command, run_ids), 5.0)
        except Exception as exc:
            logger.warning(
                "%s of %d run(s) on %s failed (%r); reconnecting",
                command,
                len(run_ids),
                self.name,
                exc,
            )
            self._reconnect.set()
        return [None] * len(run_ids)

    async def _open(self) -> None:
        """Connect and subscribe the anchor and every channel, then publish the connection.

        Until the first command has connected it, a redis-py ``PubSub`` has no connection, and
        a second command sent meanwhile opens another one: a SUBSCRIBE sent there is confirmed
        on a socket nobody reads, and its run never went live (seen when a stream opened while
        the listener was connecting). So (un)subscribes wait for ``self._pubsub`` to be set,
        and what changed while connecting is applied right after.
        """
        pubsub = self._client.pubsub()
        try:
            await pubsub.subscribe(self._backend._anchor)
            wanted: set[str] = set()
            while wanted != self.channels:
                added, removed = self.channels - wanted, wanted - self.channels
                wanted = set(self.channels)
                await self._send(pubsub, self._subscribe, added)
                await self._send(pubsub, self._unsubscribe, removed)
        except BaseException:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            raise
        self._pubsub = pubsub

    async def _send(self, pubsub: Any, command: str, run_ids: Collection[str]) -> None:
        channels = [self._backend.channel_name(run_id) for run_id in run_ids]
        if self._sharded:  # one command per channel: each names one slot
            for channel in channels:
                await getattr(pubsub, command)(channel)
        elif channels:
            await getattr(pubsub, command)(*channels)

    async def _close_pubsub(self) -> None:
        self._backend._confirmed.difference_update(self.channels)
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    def _deliver(self, message: dict[str, Any]) -> None:
        """A message to the backend's queue; a confirmed subscription to it as RESYNC."""
        backend = self._backend
        kind = message["type"]
        if message["channel"] == backend._anchor or kind not in (
            self._message,
            self._subscribe,
            self._unsubscribe,
        ):
            return
        run_id = backend._run_id_of(message["channel"])
        if kind == self._message:
            text = message["data"].decode("utf-8", "replace")
            backend._queue.put_nowait(Event(run_id, text))
        elif run_id not in self.channels:
            return  # the answer to a command given up since
        elif kind == self._subscribe:
            backend._confirmed.add(run_id)
            backend._queue.put_nowait(Event(run_id, RESYNC))
        elif self._sharded:  # not asked for: the slot moved to another master
            logger.info("run %s moved off %s; following its slot", run_id, self.name)
            backend._confirmed.discard(run_id)
            backend._slots_may_have_moved()

    async def _run(self) -> None:
        backend = self._backend
        delay = 0.05
        outage = False
        while True:
            try:
                self._reconnect.clear()
                await self._open()
                pubsub = self._pubsub
                while not self._reconnect.is_set():
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if outage:
                        logger.warning("%s is back; replaying missed events", self.name)
                        outage, delay = False, 0.05
                    self._deliver(message)
                await self._close_pubsub()
            except asyncio.CancelledError:
                raise
            except AskError as exc:  # MOVED too: a slot of ours moved to another master
                await self._close_pubsub()
                logger.info("a slot moved off %s (%s); following it", self.name, exc)
                backend._slots_may_have_moved()
                await asyncio.sleep(0.05)
            except _NETWORK_ERRORS as exc:
                await self._close_pubsub()
                if not outage:
                    logger.warning("%s unreachable (%s); reconnecting", self.name, exc)
                    outage = True
                backend.reconnects += 1
                backend._slots_may_have_moved()  # a failover may have moved them
                await asyncio.sleep(delay)
                delay = min(delay * 2, backend._reconnect_max_delay)
            except Exception:  # never let a listener die
                logger.exception("Unexpected error in the listener of %s; restarting it", self.name)
                await self._close_pubsub()
                await asyncio.sleep(delay)


class RedisBackend(StreamBackend):
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "prefect-ws",
        history_maxlen: int = 110_000,
        history_ttl_seconds: int = 86_400,
        reconnect_max_delay: float = 2.0,
    ) -> None:
        self._url = url
        self._prefix = prefix
        self._maxlen = history_maxlen
        self._ttl = history_ttl_seconds
        self._reconnect_max_delay = reconnect_max_delay
        self._redis, pubsub_client = self._clients(url)
        self._script = self._redis.register_script(self.publish_script)
        self._info_script = self._redis.register_script(INFO_SCRIPT)
        self._history_script = self._redis.register_script(HISTORY_SCRIPT)
        # A page is up to the replay page size of events (500): 10 pages make a ~1 MB reply.
        self._infos = Coalescer(self._read_infos, max_batch=100)
        self._history_pages = Coalescer(self._read_history, max_batch=10)
        self._channels: set[str] = set()
        self._confirmed: set[str] = set()  # channels Redis confirmed on the current connection
        self._anchor = f"{prefix}:listener".encode()
        self._pubsub_listener = PubSubListener(
            self,
            pubsub_client,
            name=f"Redis pub/sub at {safe_url(url)}",
            channels=self._channels,
            sharded=False,
        )
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._started = asyncio.Event()  # set at the first subscribe: publishers never listen
        self._listener: asyncio.Task[None] | None = None
        self.reconnects = 0

    publish_script: str = PUBLISH_SCRIPT

    def _clients(self, url: str) -> tuple[Any, Any]:
        """The command client and the pub/sub listener's client."""
        options: dict[str, Any] = {"socket_connect_timeout": 2.0, "health_check_interval": 10}
        # Commands wait for a free connection rather than fail when many clients replay at
        # once (the default pool raises MaxConnectionsError past 100 concurrent commands).
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=100, timeout=60.0, socket_timeout=5.0, **options
        )
        # Pub/sub gets a pool of its own: resetting the command pool must not cut the listener.
        return aioredis.Redis.from_pool(pool), aioredis.Redis.from_url(url, **options)

    # Key layout: the run id is a hash tag, so a run's keys share a Redis Cluster slot.
    def channel_name(self, run_id: str) -> str:
        return f"{self._prefix}:{{{run_id}}}"

    def _keys(self, run_id: str) -> tuple[str, str]:
        return f"{self._prefix}:{{{run_id}}}:seq", f"{self._prefix}:{{{run_id}}}:events"

    def _epoch_key(self, run_id: str) -> str:
        return f"{self._prefix}:{{{run_id}}}:epoch"

    async def connect(self) -> None:
        self._queue = asyncio.Queue()
        self._started = asyncio.Event()
        if self._channels:
            self._started.set()
        self._listener = asyncio.create_task(self._listen(), name="prefect-ws redis listener")

    async def disconnect(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        await self._pubsub_listener.close()
        await self._redis.aclose()

    async def subscribe(self, channel: str) -> None:
        self._started.set()
        await self._pubsub_listener.add(channel)

    def is_live(self, channel: str) -> bool:
        return channel in self._confirmed

    async def unsubscribe(self, channel: str) -> None:
        await self._pubsub_listener.remove(channel)

    async def publish(self, channel: str, message: Any) -> None:
        drafts: list[Draft] = message
        if drafts:
            key: tuple[str, int] | None = getattr(message, "key", None)  # see Batch
            await self._run_script(channel, drafts, key=key, head=None)

    async def publish_end(self, run_id: str, drafts: list[Draft], *, head: int) -> PublishResult:
        return PublishResult(await self._run_script(run_id, drafts, key=None, head=head))

    async def _run_script(
        self, run_id: str, drafts: list[Draft], *, key: tuple[str, int] | None, head: int | None
    ) -> int:
        keys, args = self.script_call(run_id, drafts, key=key, head=head)
        result: Any = await self._once_more_on_stale_connection(
            lambda: self._script(keys=keys, args=args)
        )
        return int(result)

    def script_call(
        self, run_id: str, drafts: list[Draft], *, key: tuple[str, int] | None, head: int | None
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the publish script for one batch of a run (see PUBLISH_SCRIPT)."""
        args: list[Any] = [self.channel_name(run_id), self._maxlen, self._ttl]
        args += [key[0], key[1]] if key is not None else ["", 0]
        args.append("" if head is None else head)
        for draft in drafts:
            args.append(draft.head)
            args.append(draft.tail)
        return self._script_keys(run_id), args

    def _script_keys(self, run_id: str) -> list[str]:
        """KEYS of the publish script (see PUBLISH_SCRIPT)."""
        return [
            *self._keys(run_id),
            self._recent_key,
            f"{self._prefix}:{{{run_id}}}:batches",
            self._epoch_key(run_id),
            f"{self._prefix}:{{{run_id}}}:ended",
        ]

    async def next_published(self) -> Event:
        return await self._queue.get()

    async def history(self, run_id: str, after: int, limit: int) -> list[str]:
        return await self._history_pages((run_id, after, limit))

    async def info(self, run_id: str) -> RunInfo:
        return await self._infos(run_id)

    async def _read_history(self, pages: list[tuple[str, int, int]]) -> list[list[str]]:
        keys = [self._keys(run_id)[1] for run_id, _, _ in pages]
        args = [arg for _, after, limit in pages for arg in (f"{after + 1}-0", limit)]
        replies: Any = await self._once_more_on_stale_connection(
            lambda: self._history_script(keys=keys, args=args)
        )
        return [[text.decode("utf-8", "replace") for text in texts] for texts in replies]

    async def _read_infos(self, run_ids: list[str]) -> list[RunInfo]:
        keys = [key for run_id in run_ids for key in (*self._keys(run_id), self._epoch_key(run_id))]
        replies: Any = await self._once_more_on_stale_connection(
            lambda: self._info_script(keys=keys)
        )
        return [
            RunInfo(
                head=int(head or 0),
                first=int(first.split(b"-")[0]) if first else None,
                last=last.decode("utf-8", "replace") if last else None,
                epoch=epoch.decode("ascii", "replace") if epoch else None,
            )
            for head, first, last, epoch in replies
        ]

    async def ping(self) -> None:
        await self._once_more_on_stale_connection(
            lambda: asyncio.wait_for(self._redis.ping(), timeout=2.0)
        )

    @property
    def _recent_key(self) -> str:
        return f"{self._prefix}:recent-runs"

    async def recent_runs(self, limit: int) -> list[RecentRun]:
        """Newest first, from the sorted set the publish script keeps (run channel -> last time)."""
        if limit <= 0:
            return []

        async def read() -> list[RecentRun]:
            members: Any = await self._redis.zrevrange(
                self._recent_key, 0, limit - 1, withscores=True
            )
            channels = [member.decode("utf-8", "replace") for member, _ in members]
            heads: Any = await self._redis.mget([f"{c}:seq" for c in channels]) if channels else []
            return [
                RecentRun(channel[len(self._prefix) + 2 : -1], float(score), int(head or 0))
                for channel, (_, score), head in zip(channels, members, heads, strict=True)
            ]

        return await self._once_more_on_stale_connection(read)

    async def _once_more_on_stale_connection(self, command: Callable[[], Awaitable[T]]) -> T:
        """Run a command; after a Redis restart the pooled connections are dead: retry once.

        Every command the server awaits goes through here, so Redis' own errors end here too:
        what leaves is :class:`BackendUnavailable`.
        """
        try:
            try:
                return await command()
            except MaxConnectionsError:
                raise
            except (ConnectionError, RedisConnectionError):
                # Only idle connections: in-use ones belong to other clients' commands, which
                # cutting would fail in turn (and make them cut ours).
                await self._redis.connection_pool.disconnect(inuse_connections=False)
                return await command()
        except _NETWORK_ERRORS as exc:
            raise BackendUnavailable(f"redis: {exc or type(exc).__name__}") from exc

    def _run_id_of(self, channel: bytes) -> str:
        name = channel.decode("utf-8", "replace")
        return sys.intern(name[len(self._prefix) + 2 : -1])  # the hub's string for the run

    async def _listen(self) -> None:
        """Start the listener at the first subscribe: a flow's process only publishes."""
        await self._started.wait()
        self._pubsub_listener.start()

    def _slots_may_have_moved(self) -> None:
        """A listener lost its connection or a channel it did not give up.

        One Redis serves every channel, so the listener's resubscribing is all it takes; a
        cluster places its runs on their masters anew (:class:`~.cluster.ClusterBackend`).
        """


class RedisSink(BatchSink):
    """A single Redis's publishing half: the publish script over one blocking connection.

    A flow process's publisher thread sends one batch at a time and waits for its reply, so it
    needs no event loop and no pool: it holds one redis-py connection and runs ``EVALSHA`` on
    it. A round trip costs ~30 us of CPU that way, ~50 us through a client's command pipeline
    (pool checkout, liveness poll, metrics) and ~70 us through redis-py's asyncio client, and
    three times that while the flow's threads contend for the GIL (docs/benchmarks.md,
    section 2). Keys and arguments come from the backend, so both halves write the same layout.
    """

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self._text = backend.publish_script
        self._sha = hashlib.sha1(self._text.encode()).hexdigest()
        self._pool = redis.ConnectionPool.from_url(
            backend._url, socket_connect_timeout=2.0, socket_timeout=5.0
        )
        self._connection: Any = None

    def publish(self, run_id: str, batch: Batch) -> None:
        keys, args = self._backend.script_call(run_id, batch, key=batch.key, head=None)
        command = ("EVALSHA", self._sha, len(keys), *keys, *args)
        try:
            self._call(command)
        except (RedisConnectionError, RedisTimeoutError):
            # After a Redis restart the held connection is dead: once more on a new one.
            # Longer outages are the publisher's to ride out (it backs off, keeps the events).
            self._call(command)

    def _call(self, command: tuple[Any, ...]) -> Any:
        if self._connection is None:
            self._connection = self._pool.get_connection()
        connection = self._connection
        try:
            connection.send_command(*command)
            try:
                return connection.read_response()
            except NoScriptError:  # a Redis restarted or flushed since the script was loaded
                connection.send_command("SCRIPT", "LOAD", self._text)
                connection.read_response()
                connection.send_command(*command)
                return connection.read_response()
        except BaseException:
            connection.disconnect()  # never leave half a reply on the socket; reconnects on use
            raise

    def close(self) -> None:
        self._pool.disconnect()
