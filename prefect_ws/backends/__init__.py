"""Transport: broadcaster's ``Broadcast`` over prefect-ws backends (``memory://``, ``redis://``,
``redis+cluster://``)."""

from __future__ import annotations

from dataclasses import dataclass

from broadcaster import Broadcast

from prefect_ws.backends.base import (
    RESYNC,
    BackendUnavailable,
    BatchSink,
    LoopSink,
    PublishResult,
    RunInfo,
    StreamBackend,
)
from prefect_ws.backends.cluster import ClusterBackend, is_cluster_url
from prefect_ws.backends.memory import MemoryBackend
from prefect_ws.backends.redis import RedisBackend, RedisSink
from prefect_ws.settings import Settings

__all__ = [
    "RESYNC",
    "BackendUnavailable",
    "BatchSink",
    "ClusterBackend",
    "LoopSink",
    "MemoryBackend",
    "PublishResult",
    "RedisBackend",
    "RedisSink",
    "RunInfo",
    "StreamBackend",
    "Transport",
    "create_sink",
    "create_transport",
]


@dataclass(frozen=True)
class Transport:
    """``broadcast`` for publish/subscribe, ``backend`` for history and health."""

    broadcast: Broadcast
    backend: StreamBackend

    @property
    def url_kind(self) -> str:
        return self.backend.name


def create_backend(settings: Settings) -> StreamBackend:
    url = settings.broadcast_url
    if url.startswith("memory://"):
        return MemoryBackend(
            url, history_maxlen=settings.history_maxlen, max_runs=settings.memory_max_runs
        )
    backend = ClusterBackend if is_cluster_url(url) else RedisBackend
    return backend(
        url,
        prefix=settings.redis_prefix,
        history_maxlen=settings.history_maxlen,
        history_ttl_seconds=settings.history_ttl_seconds,
    )


def create_transport(settings: Settings) -> Transport:
    backend = create_backend(settings)
    return Transport(broadcast=Broadcast(backend=backend), backend=backend)


def create_sink(settings: Settings) -> BatchSink:
    """What a flow process's publisher thread writes through.

    A single Redis gets its blocking client; ``memory://`` and a Redis Cluster run their
    backend's own ``publish`` on a private loop (the cluster's asyncio client is the one that
    follows its slot moves and failovers, tested as such).
    """
    backend = create_backend(settings)
    if isinstance(backend, RedisBackend) and backend.name == "redis":
        return RedisSink(backend)
    return LoopSink(backend)
