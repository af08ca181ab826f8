"""The spine's bad-input promises: bad run ids never reach Redis, client chatter is harmless,
an unreachable Redis is reported clearly, bad settings are refused with a clear message."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import redis as redis_sync
from conftest import free_port
from helpers import python_output, stream_path
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from prefect_ws.backends import RedisBackend
from prefect_ws.protocol.events import encode
from prefect_ws.server.uvicorn.config import serve_in_thread
from prefect_ws.settings import Settings

RUN = "5f0c7c8e-4a55-4c0e-9f41-3b2b2a7d6e10"


async def _close_of(url: str) -> tuple[int | None, str | None, list[str]]:
    frames: list[str] = []
    async with asyncio.timeout(5):
        async with connect(url, compression=None) as websocket:
            with contextlib.suppress(ConnectionClosed):
                async for message in websocket:
                    frames.append(str(message))
            return websocket.close_code, websocket.close_reason, frames


@pytest.mark.parametrize(
    "raw", ["*", "../x", "x" * 5_000, "", "prefect-ws:*", "[a-z]*", "x" * 10_000]
)
def test_bad_run_ids_are_refused_and_never_reach_redis(
    redis_url: str, redis_prefix: str, raw: str
) -> None:
    settings = Settings(broadcast_url=redis_url, redis_prefix=redis_prefix)
    client = redis_sync.Redis.from_url(redis_url)
    url_of = "{}/api/v2/workflows/runs/{}/stream".format
    with serve_in_thread(settings) as base_url:
        if len(raw) > 8000:  # over the handshake parser's line limit: refused before the upgrade
            with pytest.raises(InvalidStatus) as refused:
                asyncio.run(_close_of(url_of(base_url, raw)))
            assert refused.value.response.status_code == 400
            assert refused.value.response.body == b"invalid WebSocket handshake: line too long\n"
        else:
            code, reason, frames = asyncio.run(_close_of(url_of(base_url, raw)))
            assert (code, reason, frames) == (4400, "invalid run id: expected a flow run UUID", [])
        assert client.pubsub_channels(f"{redis_prefix}*") == []
        assert client.keys(f"{redis_prefix}*") == []
    client.close()


def test_client_chatter_is_ignored_and_other_clients_are_unaffected(
    redis_url: str, redis_prefix: str
) -> None:
    settings = Settings(broadcast_url=redis_url, redis_prefix=redis_prefix, max_inbound_bytes=1024)

    async def scenario(base_url: str) -> tuple[list[str], list[str], int | None]:
        backend = RedisBackend(redis_url, prefix=redis_prefix)
        await backend.connect()
        url = base_url + stream_path(RUN)
        async with (
            connect(url, compression=None) as chatty,
            connect(url, compression=None) as quiet,
        ):
            got: dict[str, list[str]] = {"chatty": [], "quiet": []}
            await chatty.recv()  # hello
            await quiet.recv()
            for i in range(50):
                await chatty.send(f"hello server {i}")
                await chatty.send(bytes([i]) * 100)
                await backend.publish(
                    RUN, [encode(RUN, "step_log", {"stepId": None, "message": str(i)})]
                )
            await backend.publish(RUN, [encode(RUN, "run_complete", {"status": "completed"})])
            for name, websocket in (("chatty", chatty), ("quiet", quiet)):
                async with asyncio.timeout(10):
                    async for message in websocket:
                        got[name].append(str(message))
            await backend.disconnect()
            return got["chatty"], got["quiet"], chatty.close_code

    with serve_in_thread(settings) as base_url:
        chatty, quiet, code = asyncio.run(scenario(base_url))
    assert chatty == quiet
    assert [json.loads(f)["seq"] for f in quiet] == list(range(1, 52))
    assert code == 1000


def test_server_with_unreachable_redis_says_so_and_reports_unhealthy() -> None:
    port = free_port()
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect_ws.cli.main",
            "serve",
            "--port",
            str(port),
            "--broadcast-url",
            dead,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        response = None
        while time.monotonic() < deadline:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert response is not None, "server did not answer"
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "unavailable" and body["backend"] == "redis" and body["error"]
    finally:
        proc.terminate()
        output = proc.communicate(timeout=15)[0]
    assert f"the backend at {dead} is unreachable" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PREFECT_WS_PORT": "eighty"}, "invalid setting PREFECT_WS_PORT"),
        ({"PREFECT_WS_PORT": "70000"}, "invalid setting PREFECT_WS_PORT"),
        ({"PREFECT_WS_MAX_LAG_SECONDS": "-1"}, "invalid setting PREFECT_WS_MAX_LAG_SECONDS"),
        ({"PREFECT_WS_BROADCAST_URL": "kafka://x"}, "unsupported broadcast URL"),
        ({"PREFECT_WS_CLIENT_QUEUE_SIZE": "0"}, "invalid setting PREFECT_WS_CLIENT_QUEUE_SIZE"),
        ({"PREFECT_WS_LOG_LEVEL": "LOUD"}, "invalid setting PREFECT_WS_LOG_LEVEL"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(env: dict[str, str], message: str) -> None:
    # No --port flag: a flag would take precedence over the bad environment value.
    result = subprocess.run(
        [sys.executable, "-m", "prefect_ws.cli.main", "serve"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_refused_broadcast_url_is_named_without_its_password() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "prefect_ws.cli.main", "serve"],
        env={**os.environ, "PREFECT_WS_BROADCAST_URL": "kafka://flows:pw-secret-1@broker:9092"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unsupported broadcast URL 'kafka://[redacted]@broker:9092'" in result.stderr
    assert "pw-secret-1" not in result.stderr + result.stdout


def test_a_flow_process_reads_its_settings_without_the_servers_rate_limiter() -> None:
    """Settings are read in every flow process; checking the default handshake rate would
    import `limits` there. The default is checked here instead."""
    from limits import parse_many

    from prefect_ws.settings import Settings

    assert parse_many(Settings.model_fields["handshake_rate"].default)
    probe = (
        "import sys\n"
        "from prefect_ws.publish.publisher import get_publisher\n"
        "get_publisher()\n"
        "print('limits' in sys.modules)\n"
    )
    assert python_output(probe).strip() == "False"
