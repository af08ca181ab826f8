"""The Redis Cluster backend against a real 3-master cluster (tests/redis_cluster.py).

The multi-replica delivery test runs on it too (test_delivery_faults.py, parametrized over the
backend). Here: where a run's keys and events live, a master killed and restarted mid-run, a
slot migrated mid-run, and the bad input the cluster URL can bring.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import free_port
from delivery_support import (
    VENV_BIN,
    Received,
    complete_draft,
    http_base,
    log_draft,
    new_run_id,
    publish_logs,
    receive,
    redis_backend,
    serve_app,
    settings_for,
    stream_url,
)
from helpers import eventually
from redis_cluster import RedisClusterProcesses, started_cluster

from prefect_ws.backends.base import Batch
from prefect_ws.backends.cluster import ClusterUrl
from prefect_ws.settings import Settings


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterProcesses]:
    """A cluster of the test's own, for tests that kill or reshape it."""
    with started_cluster() as cluster:
        yield cluster


_BATCH_NUMBERS = itertools.count(1)


def _run_keys(prefix: str, run_id: str) -> list[str]:
    base = f"{prefix}:{{{run_id}}}"
    return [base, f"{base}:seq", f"{base}:events", f"{base}:batches"]


def _commandstats(cluster: RedisClusterProcesses) -> dict[int, dict[str, int]]:
    """Per node port: calls of each command since the last CONFIG RESETSTAT."""
    stats: dict[int, dict[str, int]] = {}
    for node in cluster.nodes:
        calls: dict[str, int] = {}
        for line in cluster.cli(node, "info", "commandstats").splitlines():
            if line.startswith("cmdstat_"):
                name, _, rest = line.partition(":")
                calls[name[8:]] = int(rest.split(",")[0].split("=")[1])
        stats[node.port] = calls
    return stats


def test_runs_spread_over_all_shards_and_touch_only_their_own(
    redis_cluster: RedisClusterProcesses, redis_prefix: str
) -> None:
    settings = settings_for(redis_cluster.url, redis_prefix)
    runs = [new_run_id() for _ in range(24)]

    async def publish_all() -> None:
        async with redis_backend(settings) as backend:
            for run_id in runs:
                await publish_logs(backend, run_id, 20, batch=10)

    asyncio.run(publish_all())
    owners: dict[str, int] = {}
    for run_id in runs:
        slots = {redis_cluster.keyslot(key) for key in _run_keys(redis_prefix, run_id)}
        assert len(slots) == 1, (run_id, slots)  # channel and every key: one slot
        owner = redis_cluster.node_of_slot(slots.pop())
        owners[run_id] = owner.port
        for key in _run_keys(redis_prefix, run_id)[1:3]:
            assert redis_cluster.cli(owner, "exists", key) == "1", key
        assert redis_cluster.cli(owner, "get", f"{redis_prefix}:{{{run_id}}}:seq") == "21"
    assert set(owners.values()) == {node.port for node in redis_cluster.nodes}

    # One more run's batches: one EVALSHA (XADD, SPUBLISH inside) each, on its master only.
    run_id = new_run_id()
    owner_port = redis_cluster.node_of_slot(
        redis_cluster.keyslot(_run_keys(redis_prefix, run_id)[0])
    ).port
    asyncio.run(_publish_one(settings, run_id))  # first batch: loads the script, indexes the run
    for node in redis_cluster.nodes:
        redis_cluster.cli(node, "config", "resetstat")
    asyncio.run(_publish_one(settings, run_id, batches=10))
    stats = _commandstats(redis_cluster)
    for port, calls in stats.items():
        mine = port == owner_port
        assert calls.get("evalsha", 0) == (10 if mine else 0), (port, calls)
        assert calls.get("spublish", 0) == (10 if mine else 0), (port, calls)
        assert calls.get("publish", 0) == 0, (port, calls)  # classic PUBLISH reaches every node
        assert calls.get("xadd", 0) == (50 if mine else 0), (port, calls)


async def _publish_one(settings: Settings, run_id: str, batches: int = 1) -> None:
    async with redis_backend(settings) as backend:
        await publish_logs(backend, run_id, 5 * batches, batch=5, complete=False)


def test_recent_runs_index_is_spread_and_merged(
    redis_cluster: RedisClusterProcesses, redis_prefix: str
) -> None:
    settings = settings_for(redis_cluster.url, redis_prefix)
    runs = [new_run_id() for _ in range(40)]

    async def main() -> list[Any]:
        async with redis_backend(settings) as backend:
            for run_id in runs:
                await publish_logs(backend, run_id, 3, batch=3, complete=False)
            return list(await backend.recent_runs(10))

    recent = asyncio.run(main())
    assert [r.run_id for r in recent] == runs[::-1][:10]  # newest first, across buckets
    assert all(r.head_seq == 3 for r in recent)
    index_nodes = {
        redis_cluster.node_of_slot(
            redis_cluster.keyslot(f"{redis_prefix}:recent-runs:{{{b}}}")
        ).port
        for b in range(16)
    }
    assert len(index_nodes) == 3  # the index buckets live on every shard, not on one hot key


@pytest.mark.timeout(120)
def test_master_killed_and_restarted_mid_run_loses_nothing(
    own_cluster: RedisClusterProcesses, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    settings = settings_for(own_cluster.url, redis_prefix)
    # One run per shard: the killed master's run stalls, the others keep streaming.
    runs: dict[int, str] = {}
    while len(runs) < 3:
        run_id = new_run_id()
        port = own_cluster.node_of_slot(own_cluster.keyslot(f"{redis_prefix}:{{{run_id}}}")).port
        runs.setdefault(port, run_id)
    victim = own_cluster.nodes[0]
    events = 3000

    async def publish(backend: Any, run_id: str) -> None:
        """Like a publisher: a batch that fails (its shard is down) is sent again."""
        for first in range(0, events, 10):
            batch = [log_draft(run_id, n) for n in range(first, first + 10)]
            await _until_published(backend, run_id, batch)
            await asyncio.sleep(0.01)
        await _until_published(backend, run_id, [complete_draft(run_id)])

    async def main(base: str) -> tuple[dict[int, list[Received]], dict[str, Any]]:
        clients = {
            port: [
                asyncio.create_task(receive(stream_url(base, run_id, "wait=60"), keep_text=True))
                for _ in range(3)
            ]
            for port, run_id in runs.items()
        }
        seen: dict[str, Any] = {}
        async with redis_backend(settings) as backend:
            publishing = [asyncio.create_task(publish(backend, r)) for r in runs.values()]
            await asyncio.sleep(1.0)
            await asyncio.to_thread(victim.kill)
            async with httpx.AsyncClient(base_url=http_base(base)) as client:
                response = await client.get("/healthz")
                seen["healthz"] = (response.status_code, response.json())
                others = [r for port, r in runs.items() if port != victim.port]
                heads = [await _head(client, r) for r in others]

                async def later_heads() -> list[int]:
                    return [await _head(client, r) for r in others]

                # While the victim stays down (it is restarted below), every other shard's run
                # moves on; a client-side slot-map refresh may hold them up for a moment.
                later = await eventually(
                    later_heads,
                    lambda now: all(b > a for a, b in zip(heads, now, strict=True)),
                    timeout=20,
                    interval=0.2,
                )
                seen["others_moved"] = (heads, later)
            await asyncio.to_thread(own_cluster.restart, victim)
            await asyncio.gather(*publishing)
        results = {port: list(await asyncio.gather(*tasks)) for port, tasks in clients.items()}
        return results, seen

    with serve_app(settings) as (base, app):
        results, seen = asyncio.run(main(base))
        assert app.state.hub.runs == {}
    status, body = seen["healthz"]
    assert status == 503 and victim.address in body["error"], body
    heads, later = seen["others_moved"]  # the other shards kept streaming during the outage
    assert all(b > a for a, b in zip(heads, later, strict=True)), seen
    for clients in results.values():
        for result in clients:
            result.assert_exactly(1, events + 1)
            assert (result.code, result.reason) == (1000, "run complete")
            assert result.texts == clients[0].texts
    assert not _errors(caplog)


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Error lines but redis-py's: after a node outage its cluster client leaves the node
    objects it replaced to the garbage collector, which asyncio reports as "Unclosed
    ClusterNode object" (a ResourceWarning; their connections are already dead)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and not r.getMessage().startswith("Unclosed ClusterNode")
    ]


async def _until_published(backend: Any, run_id: str, drafts: list[Any]) -> None:
    """Publish like the publisher does: the same batch key on every retry, so a batch whose
    reply was lost (the master killed after running the script) is stored once."""
    batch = Batch(drafts)
    batch.key = ("test-publisher", next(_BATCH_NUMBERS))
    for _ in range(300):  # bounded: 30 s
        try:
            await backend.publish(run_id, batch)
            return
        except Exception:
            await asyncio.sleep(0.1)
    raise AssertionError(f"run {run_id}: a batch could not be published within 30 s")


async def _head(client: httpx.AsyncClient, run_id: str) -> int:
    response = await client.get(f"/api/v2/workflows/runs/{run_id}/events?limit=1")
    return int(response.json()["head"]) if response.status_code == 200 else -1


def _migrate_slot(cluster: RedisClusterProcesses, slot: int, target_port: int) -> None:
    """Move one slot and its keys to another master, as ``redis-cli --cluster reshard`` does."""
    source = cluster.node_of_slot(slot)
    target = next(n for n in cluster.nodes if n.port == target_port)
    source_id, target_id = (cluster.cli(n, "cluster", "myid") for n in (source, target))
    cluster.cli(target, "cluster", "setslot", str(slot), "importing", source_id)
    cluster.cli(source, "cluster", "setslot", str(slot), "migrating", target_id)
    while True:
        keys = cluster.cli(source, "cluster", "getkeysinslot", str(slot), "100").split()
        if not keys:
            break
        cluster.cli(
            source, "migrate", "127.0.0.1", str(target.port), "", "0", "5000", "keys", *keys
        )
    for node in cluster.nodes:
        cluster.cli(node, "cluster", "setslot", str(slot), "node", target_id)


@pytest.mark.timeout(120)
def test_slot_migrated_mid_run_loses_and_repeats_nothing(
    own_cluster: RedisClusterProcesses, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    settings = settings_for(own_cluster.url, redis_prefix)
    run_id = new_run_id()
    slot = own_cluster.keyslot(f"{redis_prefix}:{{{run_id}}}")
    source = own_cluster.node_of_slot(slot)
    target = next(n for n in own_cluster.nodes if n is not source)
    events = 2000

    async def main(base: str) -> list[Received]:
        clients = [
            asyncio.create_task(receive(stream_url(base, run_id, "wait=60"), keep_text=True))
            for _ in range(4)
        ]
        async with redis_backend(settings) as backend:
            publishing = asyncio.create_task(
                publish_logs(backend, run_id, events, batch=10, pause=0.01)
            )
            await asyncio.sleep(1.0)
            await asyncio.to_thread(_migrate_slot, own_cluster, slot, target.port)
            assert not publishing.done()  # the run goes on on its new master
            await publishing
        return list(await asyncio.gather(*clients))

    with serve_app(settings) as (base, _app):
        results = asyncio.run(main(base))
    assert own_cluster.node_of_slot(slot) is target
    assert own_cluster.cli(target, "get", f"{redis_prefix}:{{{run_id}}}:seq") == str(events + 1)
    for result in results:
        result.assert_exactly(1, events + 1)
        assert (result.code, result.reason) == (1000, "run complete")  # never 1011
        assert result.texts == results[0].texts
    assert not _errors(caplog)


def test_cluster_url_with_unreachable_nodes_fails_at_start_naming_them() -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    out = subprocess.run(
        [
            str(VENV_BIN / "prefect-ws"),
            "serve",
            "--broadcast-url",
            "redis+cluster://" + ",".join(dead),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2, out.stderr
    assert "Redis Cluster node(s) unreachable" in out.stderr
    assert all(node in out.stderr for node in dead), out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://", "names at least one node"),
        ("redis+cluster://host:notaport", "invalid port"),
        ("redis+cluster://:7000", "expected host:port"),
    ],
)
def test_bad_cluster_urls_are_refused_with_a_reason(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(broadcast_url=url)


def test_cluster_url_forms() -> None:
    parsed = ClusterUrl.parse("rediss+cluster://user:p%40ss@a:7000,b:7001,c/")
    assert parsed.nodes == (("a", 7000), ("b", 7001), ("c", 6379))
    assert (parsed.username, parsed.password, parsed.tls) == ("user", "p@ss", True)
    assert ClusterUrl.parse("redis+cluster://10.0.0.1:7000").tls is False


def test_cluster_script_is_the_single_redis_script_on_its_shard() -> None:
    """The cluster's publish script is derived from the single-Redis one: SPUBLISH for PUBLISH,
    and the recent-runs index (outside the run's slot) switched off."""
    from prefect_ws.backends.cluster import CLUSTER_PUBLISH_SCRIPT
    from prefect_ws.backends.redis import PUBLISH_SCRIPT

    assert CLUSTER_PUBLISH_SCRIPT.startswith("KEYS[3] = false\n")
    assert "'SPUBLISH'" in CLUSTER_PUBLISH_SCRIPT and "'PUBLISH'" not in CLUSTER_PUBLISH_SCRIPT
    body = CLUSTER_PUBLISH_SCRIPT.removeprefix("KEYS[3] = false\n")
    assert body.replace("'SPUBLISH'", "'PUBLISH'") == PUBLISH_SCRIPT
