"""Hostile clients against a real uvicorn server: each refused exactly, none hurting the next.

Every case asserts the precise refusal (HTTP status and reason before the upgrade, or the close
code after it), then that a well-behaved client still receives a complete run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from helpers import emit_small_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from prefect_ws.protocol.events import EVENT_TYPES
from prefect_ws.publish.publisher import Publisher
from prefect_ws.server.security.auth import mint_token
from prefect_ws.server.uvicorn.config import serve_in_thread
from prefect_ws.server.uvicorn.http import _upgrade_head
from prefect_ws.settings import Settings

SECRET = "hostile-test-secret"
KEYS = ["key-old-rotating-out", "key-new"]
ORIGIN = "https://app.example"
ADMIN = {"Authorization": f"Bearer {KEYS[1]}"}
WAIT = "wait=60"  # streams of runs that have not started stay open (instead of 4404)


def publish_run(settings: Settings, logs: int = 3, run_id: str | None = None) -> str:
    """A complete small run in the backend's history, for good clients to replay."""
    run_id = run_id or str(uuid.uuid4())
    publisher = Publisher(settings)
    emit_small_run(publisher, run_id, logs)
    assert publisher.flush(10), "publishing the fixture run failed"
    publisher.close()
    return run_id


def stream_url(base: str, run_id: str, query: str = "") -> str:
    return f"{base}/api/v2/workflows/runs/{run_id}/stream" + (f"?{query}" if query else "")


@dataclass
class Stream:
    events: list[dict[str, Any]]
    code: int | None
    reason: str | None


async def read_stream(url: str, timeout: float = 10, **kwargs: Any) -> Stream:
    """Connect, read until the server closes; the events and the close code."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        async with connect(url, compression=None, proxy=None, **kwargs) as ws:
            try:
                async for message in ws:
                    event = json.loads(message)
                    if event.get("type") in EVENT_TYPES:
                        events.append(event)
            except ConnectionClosed:
                pass
            return Stream(events, ws.close_code, ws.close_reason)


async def refusal(url: str, **kwargs: Any) -> tuple[int, str]:
    """The HTTP status and reason of a handshake the server must refuse."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, compression=None, proxy=None, open_timeout=5, **kwargs):
            pass
    response = info.value.response
    body = bytes(response.body or b"")
    if response.headers.get("Content-Type") == "application/json":
        return response.status_code, json.loads(body)["error"]
    return response.status_code, body.decode(errors="replace").strip()


@dataclass
class Server:
    base: str
    run_id: str
    settings: Settings

    @property
    def http(self) -> str:
        return self.base.replace("ws://", "http://", 1)

    async def good_client(self, **kwargs: Any) -> None:
        """A well-behaved client still gets the whole run, in order, and a normal close."""
        kwargs.setdefault("additional_headers", ADMIN)
        stream = await read_stream(stream_url(self.base, self.run_id), **kwargs)
        assert [e["seq"] for e in stream.events] == [1, 2, 3, 4, 5]
        assert stream.events[-1]["type"] == "run_complete"
        assert (stream.code, stream.reason) == (1000, "run complete")


def _settings(**overrides: Any) -> Settings:
    # memory://: the publisher below and the server thread share this process's store.
    values: dict[str, Any] = {
        "broadcast_url": "memory://",
        "token_secret": SECRET,
        "api_keys": KEYS,
        "allowed_origins": [ORIGIN],
        "max_inbound_bytes": 1024,
        "access_log": False,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    settings = _settings()
    run_id = publish_run(settings)
    with serve_in_thread(settings) as base:
        yield Server(base, run_id, settings)


@pytest.fixture
def limited(request: pytest.FixtureRequest) -> Iterator[Server]:
    """A server of the test's own with the limits given by ``limits(...)`` (indirect param)."""
    settings = _settings(**getattr(request, "param", {}))
    run_id = publish_run(settings)
    with serve_in_thread(settings) as base:
        yield Server(base, run_id, settings)


def limits(**overrides: Any) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("limited", [overrides], indirect=True, ids=["limits"])


def token(run_id: str, ttl: float = 60, secret: str = SECRET) -> str:
    return mint_token(run_id, secret=secret, ttl=ttl)


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# -- credentials ---------------------------------------------------------------------------------

CREDENTIAL_CASES = {
    "missing": ({}, 401, "missing credentials"),
    "malformed-two-parts": (
        {"additional_headers": {"Authorization": "Bearer abc.def"}},
        401,
        "invalid API key or malformed token",
    ),
    "garbage-bearer": (
        {"additional_headers": {"Authorization": "Bearer !!!"}},
        401,
        "invalid API key or malformed token",
    ),
    "not-base64": (
        {"additional_headers": {"Authorization": "Bearer a$b.c%d.e^f"}},
        401,
        "malformed token",
    ),
    "basic-scheme": (
        {"additional_headers": {"Authorization": "Basic dXNlcjpwYXNz"}},
        401,
        "missing credentials",
    ),
    "revoked-api-key": (
        {"additional_headers": {"Authorization": "Bearer key-older-revoked"}},
        401,
        "invalid API key or malformed token",
    ),
    "oversized-token": (
        {"additional_headers": {"Authorization": "Bearer " + "A" * 6000}},
        401,
        "malformed credentials",
    ),
}


@pytest.mark.parametrize("case", list(CREDENTIAL_CASES))
def test_bad_credentials_are_refused_before_the_upgrade(server: Server, case: str) -> None:
    async def main() -> None:
        kwargs, status, reason = CREDENTIAL_CASES[case]
        assert await refusal(stream_url(server.base, server.run_id), **kwargs) == (status, reason)
        await server.good_client()

    asyncio.run(main())


def test_expired_token_is_refused(server: Server) -> None:
    async def main() -> None:
        expired = mint_token(server.run_id, secret=SECRET, ttl=60, now=time.time() - 120)
        url = stream_url(server.base, server.run_id, f"token={expired}")
        assert await refusal(url) == (401, "token expired")
        await server.good_client(
            additional_headers={"Authorization": f"Bearer {token(server.run_id)}"}
        )

    asyncio.run(main())


def test_token_for_another_run_is_forbidden(server: Server) -> None:
    async def main() -> None:
        other = token(str(uuid.uuid4()))
        url = stream_url(server.base, server.run_id)
        assert await refusal(url, additional_headers={"Authorization": f"Bearer {other}"}) == (
            403,
            "token not valid for this run",
        )
        await server.good_client(
            additional_headers={"Authorization": f"Bearer {token(server.run_id)}"}
        )

    asyncio.run(main())


def test_token_signed_with_another_secret_is_refused(server: Server) -> None:
    async def main() -> None:
        forged = token(server.run_id, secret="not-the-server-secret")
        url = stream_url(server.base, server.run_id, f"token={forged}")
        assert await refusal(url) == (401, "invalid token signature")
        await server.good_client()

    asyncio.run(main())


def test_tampered_claims_break_the_signature(server: Server) -> None:
    async def main() -> None:
        header, _, signature = token(str(uuid.uuid4())).split(".")
        claims = _b64({"sub": server.run_id, "iat": int(time.time()), "exp": int(time.time()) + 60})
        url = stream_url(server.base, server.run_id, f"token={header}.{claims}.{signature}")
        assert await refusal(url) == (401, "invalid token signature")
        await server.good_client()

    asyncio.run(main())


def test_alg_none_token_is_refused(server: Server) -> None:
    async def main() -> None:
        claims = _b64({"sub": "*", "exp": int(time.time()) + 60})
        url = stream_url(server.base, server.run_id, f"token={_b64({'alg': 'none'})}.{claims}.")
        assert await refusal(url) == (401, "unsupported token algorithm")
        await server.good_client()

    asyncio.run(main())


def test_wrong_run_token_in_subprotocol_is_forbidden(server: Server) -> None:
    async def main() -> None:
        other = token(str(uuid.uuid4()))
        url = stream_url(server.base, server.run_id)
        assert await refusal(url, subprotocols=["prefect-ws.v1", f"bearer.{other}"]) == (
            403,
            "token not valid for this run",
        )
        stream = await read_stream(
            url, subprotocols=["prefect-ws.v1", f"bearer.{token(server.run_id)}"]
        )
        assert stream.code == 1000 and len(stream.events) == 5

    asyncio.run(main())


def test_run_token_cannot_read_metrics_or_other_api(server: Server) -> None:
    async def main() -> None:
        scoped = {"Authorization": f"Bearer {token(server.run_id)}"}
        async with httpx.AsyncClient(base_url=server.http) as client:
            metrics = await client.get("/metrics", headers=scoped)
            listing = await client.get("/api/v2/workflows/runs", headers=scoped)
            other = await client.get(
                f"/api/v2/workflows/runs/{uuid.uuid4()}/events", headers=scoped
            )
            anonymous_sse = await client.get(
                f"/api/v2/workflows/runs/{server.run_id}/events/stream"
            )
        assert (metrics.status_code, metrics.json()["error"]) == (
            403,
            "this token is scoped to one run",
        )
        assert (listing.status_code, listing.json()["error"]) == (
            403,
            "this token is scoped to one run",
        )
        assert (other.status_code, other.json()["error"]) == (403, "token not valid for this run")
        assert (anonymous_sse.status_code, anonymous_sse.json()["error"]) == (
            401,
            "missing credentials",
        )
        assert anonymous_sse.headers["www-authenticate"].startswith("Bearer")
        await server.good_client()

    asyncio.run(main())


# -- origins -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    ["https://evil.example", "null", "https://app.example.evil.example", "http://app.example"],
)
def test_forbidden_origin_is_refused(server: Server, origin: str) -> None:
    async def main() -> None:
        url = stream_url(server.base, server.run_id)
        assert await refusal(url, origin=origin, additional_headers=ADMIN) == (
            403,
            "origin not allowed",
        )
        await server.good_client(origin=ORIGIN)

    asyncio.run(main())


def test_a_second_origin_header_does_not_override_the_first(server: Server) -> None:
    async def main() -> None:
        headers = [("Origin", "https://evil.example"), ("Origin", ORIGIN), *ADMIN.items()]
        assert await refusal(
            stream_url(server.base, server.run_id), additional_headers=headers
        ) == (
            400,
            "Failed to open a WebSocket connection: invalid Origin header: multiple values.",
        )
        await server.good_client()

    asyncio.run(main())


def test_cors_preflight_allows_only_listed_origins(server: Server) -> None:
    async def main() -> None:
        path = f"/api/v2/workflows/runs/{server.run_id}/events"
        preflight = {
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        }
        async with httpx.AsyncClient(base_url=server.http) as client:
            evil = await client.options(
                path, headers={"Origin": "https://evil.example", **preflight}
            )
            good = await client.options(path, headers={"Origin": ORIGIN, **preflight})
        assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
        assert good.status_code == 200 and good.headers["access-control-allow-origin"] == ORIGIN
        async with httpx.AsyncClient(base_url=server.http) as client:
            read = await client.get(path, headers={"Origin": ORIGIN, **ADMIN})
            foreign = await client.get(path, headers={"Origin": "https://evil.example", **ADMIN})
        assert read.status_code == 200 and read.headers["access-control-allow-origin"] == ORIGIN
        assert (foreign.status_code, foreign.json()["error"]) == (403, "origin not allowed")
        assert "access-control-allow-origin" not in foreign.headers
        await server.good_client()

    asyncio.run(main())


# -- run ids and query values --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw_run", "query", "reason"),
    [
        ("..%2f..%2fetc%2fpasswd", "", "invalid run id: expected a flow run UUID"),
        ("0" * 500, "", "invalid run id: expected a flow run UUID"),
        (
            "{run}",
            "since=1%0d%0aSet-Cookie:%20x=1",
            "invalid since: expected a non-negative integer seq",
        ),
        ("{run}", "since=-1", "invalid since: expected a non-negative integer seq"),
        (
            "{run}",
            "since=99999999999999999999999",
            "invalid since: expected a non-negative integer seq",
        ),
    ],
)
def test_injected_run_ids_and_query_values_are_refused(
    server: Server, raw_run: str, query: str, reason: str
) -> None:
    async def main() -> None:
        url = stream_url(server.base, raw_run.replace("{run}", server.run_id), query)
        stream = await read_stream(url, additional_headers=ADMIN)
        assert stream.events == []
        assert stream.code == 4400 and stream.reason is not None
        assert stream.reason.startswith(reason.split(":")[0])
        await server.good_client()

    asyncio.run(main())


@pytest.mark.parametrize("raw_run", ["abc%0d%0aX-Injected:%201", "%00", "a%7fb"])
def test_control_characters_in_the_path_are_refused(server: Server, raw_run: str) -> None:
    async def main() -> None:
        url = stream_url(server.base, raw_run)
        assert await refusal(url, additional_headers=ADMIN) == (
            400,
            "invalid characters in the request path",
        )
        await server.good_client()

    asyncio.run(main())


def test_crlf_in_token_is_refused_and_never_echoed(server: Server) -> None:
    async def main() -> None:
        url = stream_url(server.base, server.run_id, "token=abc%0d%0aX-Injected:%201")
        status, reason = await refusal(url)
        assert (status, reason) == (401, "invalid API key or malformed token")
        await server.good_client()

    asyncio.run(main())


# -- frames --------------------------------------------------------------------------------------


async def _send_and_wait_close(
    server: Server, payload: bytes | str, text: bool | None
) -> tuple[int | None, str | None]:
    url = stream_url(server.base, str(uuid.uuid4()), WAIT)  # not started: the stream waits
    async with asyncio.timeout(10):
        async with connect(url, compression=None, proxy=None, additional_headers=ADMIN) as ws:
            await ws.send(payload, text=text)
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.recv()
            return ws.close_code, ws.close_reason


def test_oversized_text_frame_closes_1009(server: Server) -> None:
    async def main() -> None:
        code, _ = await _send_and_wait_close(server, "x" * 5000, None)
        assert code == 1009
        await server.good_client()

    asyncio.run(main())


def test_oversized_binary_frame_closes_1009(server: Server) -> None:
    async def main() -> None:
        code, _ = await _send_and_wait_close(server, b"\x00" * 5000, None)
        assert code == 1009
        await server.good_client()

    asyncio.run(main())


def test_invalid_utf8_text_frame_closes_1007(server: Server) -> None:
    async def main() -> None:
        code, _ = await _send_and_wait_close(server, b"\xff\xfe\xfd", True)
        assert code == 1007
        await server.good_client()

    asyncio.run(main())


def test_small_garbage_frames_are_ignored_and_the_run_still_arrives(server: Server) -> None:
    async def main() -> None:
        run_id = str(uuid.uuid4())
        url = stream_url(server.base, run_id, WAIT)
        events = []
        async with connect(url, compression=None, proxy=None, additional_headers=ADMIN) as ws:
            await ws.send(b"\x00\x01binary junk")
            await ws.send('{"type":"subscribe","runId":"*"}')
            await asyncio.to_thread(publish_run, server.settings, 3, run_id)  # now the run happens
            async for message in ws:
                if isinstance(message, str) and message.startswith('{"v":'):
                    events.append(json.loads(message))
        assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
        assert (ws.close_code, ws.close_reason) == (1000, "run complete")
        await server.good_client()

    asyncio.run(main())


# -- malformed HTTP ------------------------------------------------------------------------------


async def _raw_exchange(server: Server, request: bytes, timeout: float = 5) -> bytes:
    host, port = server.base.removeprefix("ws://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()


def test_unsupported_websocket_version_is_refused(server: Server) -> None:
    async def main() -> None:
        request = (
            f"GET /api/v2/workflows/runs/{server.run_id}/stream HTTP/1.1\r\nHost: x\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 8\r\nAuthorization: Bearer {KEYS[1]}\r\n\r\n"
        ).encode()
        response = await _raw_exchange(server, request)
        assert response.startswith(b"HTTP/1.1 400 ")
        assert response.endswith(b"invalid Sec-WebSocket-Version header: 8.\n")
        await server.good_client()

    asyncio.run(main())


def test_oversized_request_headers_are_refused(server: Server) -> None:
    async def main() -> None:
        request = (
            f"GET /api/v2/workflows/runs/{server.run_id}/stream HTTP/1.1\r\nHost: x\r\n"
            f"Connection: close\r\nX-Padding: {'a' * 30_000}\r\n\r\n"
        ).encode()
        response = await _raw_exchange(server, request)
        assert response.startswith(b"HTTP/1.1 431 ")
        assert response.endswith(b'{"error": "request headers too large", "status": 431}')
        await server.good_client()

    asyncio.run(main())


# -- limits --------------------------------------------------------------------------------------


async def _hold(url: str, source: str, **kwargs: Any) -> Any:
    """An open stream from loopback address ``source`` (kept until the returned ws is closed)."""
    return await connect(
        url,
        compression=None,
        proxy=None,
        additional_headers=ADMIN,
        local_addr=(source, 0),
        **kwargs,
    )


@limits(max_connections_per_ip=2, limit_loopback=True)
def test_too_many_connections_from_one_address(limited: Server) -> None:
    async def main() -> None:
        url = stream_url(limited.base, str(uuid.uuid4()), WAIT)
        held = [await _hold(url, "127.0.0.1") for _ in range(2)]
        try:
            assert await refusal(url, additional_headers=ADMIN) == (
                429,
                "too many connections from this address",
            )
            await limited.good_client(local_addr=("127.0.0.2", 0))  # another address is served
        finally:
            for ws in held:
                await ws.close()
        await asyncio.sleep(0.1)
        await limited.good_client()

    asyncio.run(main())


@limits(max_connections=3, max_connections_per_ip=10)
def test_process_connection_limit(limited: Server) -> None:
    async def main() -> None:
        url = stream_url(limited.base, str(uuid.uuid4()), WAIT)
        held = [await _hold(url, f"127.0.0.{n}") for n in (2, 3, 4)]
        try:
            assert await refusal(url, additional_headers=ADMIN) == (
                503,
                "server at its connection limit",
            )
        finally:
            for ws in held:
                await ws.close()
        await asyncio.sleep(0.1)
        await limited.good_client()

    asyncio.run(main())


@limits(handshake_rate="5/second", limit_loopback=True)
def test_handshake_flood_is_rate_limited_per_address(limited: Server) -> None:
    async def main() -> None:
        url = stream_url(limited.base, limited.run_id)
        results = await asyncio.gather(
            *(read_stream(url, additional_headers=ADMIN) for _ in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(r, Stream) and r.code == 1000 for r in results)
        assert await refusal(url, additional_headers=ADMIN) == (
            429,
            "too many handshakes from this address",
        )
        await limited.good_client(local_addr=("127.0.0.2", 0))
        await asyncio.sleep(1.1)  # the window moved on
        await limited.good_client()

    asyncio.run(main())


@limits(max_connections_per_ip=1, handshake_rate="2/second")
def test_loopback_clients_are_exempt_from_per_address_limits_by_default(
    limited: Server,
) -> None:
    async def main() -> None:
        url = stream_url(limited.base, str(uuid.uuid4()), WAIT)
        held = [await _hold(url, "127.0.0.1") for _ in range(4)]  # local tools, tests, a bare proxy
        try:
            await limited.good_client()
        finally:
            for ws in held:
                await ws.close()

    asyncio.run(main())


@limits(max_runs=1)
def test_runs_per_process_limit(limited: Server) -> None:
    async def main() -> None:
        live_run = str(uuid.uuid4())
        held = await _hold(stream_url(limited.base, live_run, WAIT), "127.0.0.1")
        try:
            assert await refusal(
                stream_url(limited.base, limited.run_id), additional_headers=ADMIN
            ) == (
                503,
                "server at its run limit",
            )
            second = await _hold(
                stream_url(limited.base, live_run, WAIT), "127.0.0.1"
            )  # same run: fine
            await second.close()
        finally:
            await held.close()
        await asyncio.sleep(0.2)
        await limited.good_client()

    asyncio.run(main())


@limits(handshake_timeout=0.5)
def test_slowloris_handshake_is_cut_off(limited: Server) -> None:
    async def main() -> None:
        host, port = limited.base.removeprefix("ws://").rsplit(":", 1)
        trickles = []
        for _ in range(20):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /api/v2/workflows/runs/")
            trickles.append((reader, writer))
        started = time.monotonic()
        await limited.good_client()  # served while 20 handshakes dangle
        for _reader, writer in trickles:
            writer.write(b"x")  # one byte now and then is not enough
        async with asyncio.timeout(5):
            closed = await asyncio.gather(*(reader.read() for reader, _ in trickles))
        assert closed == [b""] * 20
        assert time.monotonic() - started < 3
        for _, writer in trickles:
            writer.close()
        await limited.good_client()

    asyncio.run(main())


def test_churning_hostile_clients_do_not_wedge_redis_subscriptions(redis_url: str) -> None:
    """Streams opened and killed at once (oversized frame) must not stall later subscriptions."""

    async def main() -> None:
        settings = _settings(
            broadcast_url=redis_url, redis_prefix=f"prefect-ws-test-{uuid.uuid4().hex[:12]}"
        )
        run_id = publish_run(settings)
        with serve_in_thread(settings) as base:
            server = Server(base, run_id, settings)
            for _ in range(8):
                code, _ = await _send_and_wait_close(server, "x" * 5000, None)
                assert code == 1009
                async with asyncio.timeout(5):
                    await server.good_client()

    asyncio.run(main())


# -- the upgrade's fast path ---------------------------------------------------------------------


def test_only_a_whole_upgrade_head_skips_h11_and_its_header_names_are_lowered() -> None:
    head = (
        b"GET /s?t=A HTTP/1.1\r\nHOST: x\r\nUpgrade: WebSocket\r\n"
        b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    assert _upgrade_head(head) == (
        b"GET /s?t=A HTTP/1.1\r\nhost: x\r\nupgrade: WebSocket\r\n"
        b"connection: keep-alive, Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ), "names lower-case; values (the key is case-sensitive) and the request line as they came"
    for other in (
        head[:-2],  # not whole yet
        head + b"GET / HTTP/1.1\r\n\r\n",  # something after it: h11 keeps order
        head.replace(b"GET ", b"POST "),
        head.replace(b"HTTP/1.1", b"HTTP/1.0"),
        head.replace(b"keep-alive, Upgrade", b"keep-alive"),
        head.replace(b"Upgrade: WebSocket", b"Upgrade: h2c"),
        head.replace(b"HOST: x\r\n", b""),  # h11 refuses HTTP/1.1 without exactly one Host
        head.replace(b"HOST: x\r\n", b"HOST: x\r\nHost: y\r\n"),
        head.replace(b"HOST: x\r\n", b"HOST: x\r\nContent-Length: 0\r\n"),  # a body: h11's
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        assert _upgrade_head(other) is None, other


_NAMES = st.sampled_from(
    [b"Host", b"Upgrade", b"Connection", b"Sec-WebSocket-Key", b"Sec-WebSocket-Version",
     b"Authorization", b"Origin", b"X-A", b"Host ", b" Upgrade", b"Up grade", b"\xffName", b"",
     b"Content-Length", b"Transfer-Encoding"]
)  # fmt: skip
_VALUES = st.sampled_from(
    [b"x", b"websocket", b"WebSocket", b"Upgrade", b"keep-alive, upgrade", b"upgrade,",
     b"dGhlIHNhbXBsZSBub25jZQ==", b"13", b"8", f"Bearer {KEYS[1]}".encode(), ORIGIN.encode(),
     b"a\x00b", b"\xe9t\xe9", b"\x7f", b"", b" websocket ", b"a" * 9000, b"0", b"chunked", b"-1"]
)  # fmt: skip


@st.composite
def _upgrade_heads(draw: st.DrawFn, run_id: str) -> bytes:
    """Upgrade requests, mostly valid, with names, values and lines a hostile client picks."""
    target = draw(st.sampled_from([f"/api/v2/workflows/runs/{run_id}/stream", "/nope", "/%zz"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2"]))
    valid = [
        (b"Host", b"127.0.0.1"),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"Sec-WebSocket-Version", b"13"),
        (b"Authorization", f"Bearer {KEYS[1]}".encode()),
    ]
    headers = draw(st.lists(st.sampled_from(valid), max_size=8))
    headers += draw(st.lists(st.tuples(_NAMES, _VALUES), max_size=4))
    headers = draw(st.permutations(headers))
    lines = [b"GET " + target.encode() + b" " + version]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _status_line(server: Server, request: bytes, *, dribble: bool) -> bytes:
    """The server's first line for ``request``, sent in one write, or a byte at a time (the
    server then sees the head in pieces, which h11 parses)."""
    host, port = server.base.removeprefix("ws://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        if dribble:
            for i in range(len(request)):
                writer.write(request[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0)
        else:
            writer.write(request)
        async with asyncio.timeout(10):
            return (await reader.readline()).strip()
    finally:
        writer.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_an_upgrade_is_answered_alike_whole_or_in_pieces(
    server: Server, data: st.DataObject
) -> None:
    """Generated upgrade heads, hostile ones included: the fast path (the head in one read)
    answers each as h11's path (the head in pieces) does."""
    request = data.draw(_upgrade_heads(server.run_id))

    async def main() -> tuple[bytes, bytes]:
        whole = await _status_line(server, request, dribble=False)
        pieces = await _status_line(server, request, dribble=True)
        return whole, pieces

    whole, pieces = asyncio.run(main())
    assert whole[:12] == pieces[:12], (request, whole, pieces)
