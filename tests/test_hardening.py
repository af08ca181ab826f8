"""Defects an outside attack found, each as a class: a non-reading client, a ping flood, a token
in a log line, DNS rebinding, non-ASCII digits, slowloris on keep-alive, a history reset, run id
aliases and log lines a client can trigger at will. Real server, real sockets."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from attack_support import (
    RunningServer,
    client_frame,
    raw_socket,
    read_all,
    read_head,
    rss,
    running_server,
    wait_for,
    ws_close_code,
    ws_request,
)
from delivery_support import OPEN_LIMITS, complete_draft, log_draft, publish_logs, redis_backend
from websockets.asyncio.client import connect

from prefect_ws.clients.follow import follow
from prefect_ws.server.security.auth import mint_token
from prefect_ws.server.security.redact import safe_url
from prefect_ws.server.uvicorn import stall
from prefect_ws.settings import Settings

SECRET = "hardening-test-secret"
KEY = "hardening-admin-key"


def memory_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "broadcast_url": f"memory://hardening-{uuid.uuid4().hex[:8]}",
        **OPEN_LIMITS,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def plain() -> Iterator[RunningServer]:
    """A default server (no auth), as a developer runs it on a laptop."""
    with running_server(memory_settings()) as server:
        yield server


def stream_path(run_id: str, query: str = "") -> str:
    return f"/api/v2/workflows/runs/{run_id}/stream" + (f"?{query}" if query else "")


def sse_path(run_id: str, query: str = "") -> str:
    return f"/api/v2/workflows/runs/{run_id}/events/stream" + (f"?{query}" if query else "")


def publish_many(server: RunningServer, run_id: str, count: int, size: int = 200) -> None:
    for first in range(0, count, 500):
        server.publish(run_id, [log_draft(run_id, n, size) for n in range(first, first + 500)])


# -- 1. a client that stops reading loses its connection ------------------------------------------


@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_a_client_that_never_reads_is_cut_off_within_the_lag_limit(transport: str) -> None:
    lag = 2.0
    with running_server(memory_settings(max_lag_seconds=lag)) as server:
        base = server.gauge(transport)
        run_id = str(uuid.uuid4())
        clients = []
        for _ in range(3):
            sock = raw_socket(server, rcvbuf=4096)
            if transport == "ws":
                sock.sendall(ws_request(stream_path(run_id, "wait=60")))
                assert read_head(sock).startswith(b"HTTP/1.1 101 ")
            else:
                request = f"GET {sse_path(run_id, 'wait=60')} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                sock.sendall(request.encode())
                assert read_head(sock).startswith(b"HTTP/1.1 200 ")
            clients.append(sock)
        wait_for(lambda: server.gauge(transport) == base + 3, 10, "clients counted")
        started = time.monotonic()
        publish_many(server, run_id, 20_000)  # ~5 MB each client never reads
        took = wait_for(
            lambda: server.gauge(transport) == base or server.gauge(transport),
            lag + stall.GRACE + 6,
            f"non-reading {transport} clients released",
        )
        assert time.monotonic() - started < lag + stall.GRACE + 6, took
        for sock in clients:
            read_all(sock, deadline=5)  # the server closed it: EOF or reset, not a timeout
            sock.close()


# -- 2. a ping flood cannot grow the server's memory ----------------------------------------------


def test_pongs_for_a_client_that_does_not_read_are_bounded(plain: RunningServer) -> None:
    sock = raw_socket(plain, rcvbuf=4096, timeout=30)
    sock.sendall(ws_request(stream_path(str(uuid.uuid4()), "wait=60")))
    assert read_head(sock).startswith(b"HTTP/1.1 101 ")
    pings = client_frame(0x9, b"p" * 125) * 1000
    largest = 0
    before = rss()
    done = threading.Event()

    def flood() -> None:
        try:
            for _ in range(100):  # 100k pings, 13 MB of pongs
                sock.sendall(pings)
        except OSError:
            pass  # the server may cut the flooder off: that bounds it too
        done.set()

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not done.is_set() and time.monotonic() < deadline:
        for transport in plain.ws_transports():
            largest = max(largest, transport.get_write_buffer_size())
        time.sleep(0.02)
    assert done.is_set(), "the flood did not finish"
    for transport in plain.ws_transports():
        largest = max(largest, transport.get_write_buffer_size())
    sock.close()
    assert largest < 1 << 20, f"{largest} bytes of pongs queued for a client that does not read"
    assert rss() - before < 32 << 20


# -- 3. no credential in any log line -------------------------------------------------------------


def _log_has_no(server: RunningServer, secret: str) -> None:
    parts = [secret, *secret.split(".")]
    for line in server.log.lines:
        for part in parts:
            assert part not in line, f"credential in a log line: {line[:200]}"


@pytest.mark.parametrize(
    "query",
    ["%74oken={t}", "tok%65n={t}", "%54OKEN={t}&token={t}", "x=1&token={t}", "token=%20{t}"],
)
def test_no_token_reaches_a_log_line_in_any_encoding(query: str) -> None:
    settings = memory_settings(token_secret=SECRET, api_keys=[KEY], log_level="DEBUG")
    with running_server(settings, log_level="debug") as server:
        run_id = str(uuid.uuid4())
        token = mint_token(run_id, secret=SECRET, ttl=60)
        other = mint_token(str(uuid.uuid4()), secret=SECRET, ttl=60)
        server.publish(run_id, [log_draft(run_id, 1), complete_draft(run_id)])
        for credential in (token, other):
            sock = raw_socket(server)
            sock.sendall(ws_request(stream_path(run_id, query.format(t=credential))))
            read_all(sock, deadline=5)
            sock.close()
            httpx.get(f"{server.http}{sse_path(run_id, query.format(t=credential))}", timeout=5)
            httpx.get(
                f"{server.http}/api/v2/workflows/runs/{run_id}/events?{query.format(t=credential)}",
                timeout=5,
            )
        _log_has_no(server, token)
        _log_has_no(server, other)


def test_a_backend_password_never_reaches_a_log_line_or_an_answer() -> None:
    settings = memory_settings(broadcast_url="redis://:s3cret-pw@127.0.0.1:1/0")
    with running_server(settings) as server:
        answer = httpx.get(f"{server.http}/healthz", timeout=10)
        assert answer.status_code == 503
        assert "s3cret-pw" not in answer.text
        assert "s3cret-pw" not in server.log.text


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("redis://:s3cret-pw@127.0.0.1:6379/0", "redis://[redacted]@127.0.0.1:6379/0"),
        ("rediss://user:s3cret-pw@[::1]:6380", "rediss://[redacted]@[::1]:6380"),
        ("redis+cluster://u:s3cret-pw@a:7000,b:7001", "redis+cluster://[redacted]@a:7000,b:7001"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_a_backend_url_is_shown_without_its_credentials(url: str, safe: str) -> None:
    assert safe_url(url) == safe


# -- 4. DNS rebinding: the Host must be one of ours ------------------------------------------------


def test_a_foreign_host_header_is_refused(plain: RunningServer) -> None:
    run_id = str(uuid.uuid4())
    plain.publish(run_id, [log_draft(run_id, 1), complete_draft(run_id)])
    sock = raw_socket(plain)
    sock.sendall(
        ws_request(
            stream_path(run_id),
            {"Origin": "http://rebind.attacker.test"},
            host="rebind.attacker.test",
        )
    )
    head = read_all(sock)
    sock.close()
    assert head.startswith(b"HTTP/1.1 400 "), head[:200]
    answer = httpx.get(
        f"{plain.http}/api/v2/workflows/runs", headers={"Host": "rebind.attacker.test"}
    )
    assert answer.status_code == 400
    for host in ("127.0.0.1", "localhost", f"localhost:{plain.port}", f"127.0.0.1:{plain.port}"):
        answer = httpx.get(f"{plain.http}/api/v2/workflows/runs", headers={"Host": host})
        assert answer.status_code == 200
    # Probes answer whatever the Host: an orchestrator calls them by the pod's address.
    probe = httpx.get(f"{plain.http}/livez", headers={"Host": "10.1.2.3:8000"})
    assert probe.status_code == 200


# -- 5. every number on the wire is ASCII digits ------------------------------------------------

NON_ASCII_DIGITS = ["%C2%B2", "%E2%91%A0", "%D9%A1", "%EF%BC%91", "1%C2%B2"]


@pytest.mark.parametrize("digit", NON_ASCII_DIGITS)
def test_non_ascii_digits_are_a_client_error(plain: RunningServer, digit: str) -> None:
    mark = len(plain.log.lines)
    run_id = str(uuid.uuid4())
    plain.publish(run_id, [log_draft(run_id, 1)])
    base = f"{plain.http}/api/v2/workflows/runs"
    for url in (
        f"{base}/{run_id}/events?since={digit}",
        f"{base}/{run_id}/events?limit={digit}",
        f"{base}?limit={digit}",
        f"{base}/{run_id}/events/stream?wait={digit}",
    ):
        answer = httpx.get(url, timeout=5)
        assert answer.status_code == 400, (url, answer.status_code, answer.text[:200])
    sock = raw_socket(plain)
    sock.sendall(
        f"GET {sse_path(run_id)} HTTP/1.1\r\nHost: x\r\nLast-Event-ID: ".encode() + b"\xb2\r\n\r\n"
    )
    assert read_all(sock).startswith(b"HTTP/1.1 400 ")
    sock.close()
    sock = raw_socket(plain)
    sock.sendall(ws_request(stream_path(run_id, f"since={digit}")))
    assert ws_close_code(sock) == 4400
    sock.close()
    assert not plain.log.tracebacks(mark)
    assert not plain.log.server_errors(mark)


# -- 6. slowloris on a keep-alive connection -----------------------------------------------------


def test_every_request_on_a_keep_alive_connection_has_a_header_deadline() -> None:
    with running_server(memory_settings(handshake_timeout=1.0)) as server:
        sock = raw_socket(server, timeout=10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_head(sock).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        closed = False
        for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.2)
            if time.monotonic() - started > 6:
                break
        if not closed:
            sock.settimeout(1)
            try:
                closed = sock.recv(1) == b""
            except (ConnectionResetError, BrokenPipeError):
                closed = True
            except TimeoutError:
                closed = False
        sock.close()
        assert closed, "a dribbling second request kept its connection"
        assert time.monotonic() - started < 5


# -- 7. a history reset is visible to clients, and follow() restarts from 0 ------------------------


def test_follow_restarts_from_zero_when_the_history_was_reset(
    redis_server: Any, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(broadcast_url=redis_server.url, redis_prefix=redis_prefix, **OPEN_LIMITS)
    run_id = str(uuid.uuid4())

    async def scenario() -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        with running_server(settings) as server:
            async with redis_backend(settings) as backend:
                await publish_logs(backend, run_id, 10, complete=False)

            async def reader() -> None:
                async for event in follow(server.ws, run_id, wait=30, max_retries=100):
                    events.append(event)

            task = asyncio.create_task(reader())
            deadline = time.monotonic() + 15
            while len(events) < 10:
                assert time.monotonic() < deadline, f"only {len(events)} events before the reset"
                await asyncio.sleep(0.05)
            await asyncio.to_thread(redis_server.kill)
            await asyncio.to_thread(redis_server.start)  # empty: no persistence
            async with redis_backend(settings) as backend:
                await publish_logs(backend, run_id, 20, start=1000)
            async with asyncio.timeout(30):
                await task
        return events

    with caplog.at_level(logging.WARNING, logger="prefect_ws.client"):
        events = asyncio.run(scenario())
    old, new = events[:10], events[10:]
    assert [e["seq"] for e in old] == list(range(1, 11))
    assert [e["seq"] for e in new] == list(range(1, 22)), [e["seq"] for e in new]
    assert new[0]["payload"]["message"] == "line 1000"
    assert any("reset" in record.getMessage() for record in caplog.records)


def test_hello_carries_the_history_epoch(plain: RunningServer) -> None:
    run_id = str(uuid.uuid4())
    plain.publish(run_id, [log_draft(run_id, 1), complete_draft(run_id)])

    async def hello() -> dict[str, Any]:
        import json

        async with connect(f"{plain.ws}{stream_path(run_id)}", proxy=None) as ws:
            return dict(json.loads(await ws.recv()))

    first = asyncio.run(hello())
    assert isinstance(first.get("epoch"), str) and first["epoch"]
    assert asyncio.run(hello())["epoch"] == first["epoch"]


# -- 8. one spelling per run id --------------------------------------------------------------------

ALIASES = [
    "{%s}",
    "urn:uuid:%s",
    "%s}",
    "{%s",
]


def fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if c.isdigit() else c for c in text)


@pytest.mark.parametrize("alias", ALIASES)
def test_only_the_canonical_run_id_opens_a_run(plain: RunningServer, alias: str) -> None:
    run_id = str(uuid.uuid4())
    plain.publish(run_id, [log_draft(run_id, 1), complete_draft(run_id)])
    spellings = [alias % run_id, run_id.replace("-", ""), fullwidth(run_id)]
    for raw in spellings:
        path = quote(raw, safe="-")
        answer = httpx.get(f"{plain.http}/api/v2/workflows/runs/{path}/events", timeout=5)
        assert answer.status_code == 400, (raw, answer.status_code)
        sock = raw_socket(plain)
        sock.sendall(ws_request(stream_path(path)))
        assert ws_close_code(sock) == 4400, raw
        sock.close()
    upper = httpx.get(f"{plain.http}/api/v2/workflows/runs/{run_id.upper()}/events", timeout=5)
    assert upper.status_code == 200
    assert upper.json()["runId"] == run_id


# -- 9. what a client can trigger at will logs one line, no traceback, rate limited ----------------


def test_invalid_utf8_frames_log_at_most_a_line_each_without_traceback() -> None:
    with running_server(memory_settings()) as server:
        for _ in range(30):
            sock = raw_socket(server)
            sock.sendall(ws_request(stream_path(str(uuid.uuid4()), "wait=60")))
            assert read_head(sock).startswith(b"HTTP/1.1 101 ")
            sock.sendall(client_frame(0x1, b"\xff\xfe"))
            assert ws_close_code(sock) == 1007
            sock.close()
        utf8 = [line for line in server.log.lines if "UTF-8" in line]
        assert not server.log.tracebacks()
        assert all("\n" not in line for line in utf8)
        assert 1 <= len(utf8) <= 5, utf8


# -- also: HTTP/1.0 upgrades, one huge header, X-Forwarded-For, the work of a filtered read -------


def test_websocket_upgrades_need_http_1_1(plain: RunningServer) -> None:
    sock = raw_socket(plain)
    request = ws_request(stream_path(str(uuid.uuid4()))).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    sock.sendall(request)
    answer = read_all(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert b"WebSocket upgrades need HTTP/1.1" in answer


@pytest.mark.parametrize("size", [20_000, 100_000])
def test_one_oversized_header_is_answered_431(plain: RunningServer, size: int) -> None:
    sock = raw_socket(plain)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
    answer = read_all(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert answer.endswith(b'{"error": "request headers too large", "status": 431}')


@pytest.mark.parametrize("trusted", [False, True])
def test_x_forwarded_for_is_believed_only_from_configured_proxies(trusted: bool) -> None:
    settings = memory_settings(
        api_keys=[KEY],
        access_log=True,
        forwarded_allow_ips=["127.0.0.1"] if trusted else [],
    )
    with running_server(settings) as server:
        answer = httpx.get(
            f"{server.http}/api/v2/workflows/runs/{uuid.uuid4()}/events",
            headers={"X-Forwarded-For": "203.0.113.9"},
        )
        assert answer.status_code == 401

        def refusals() -> list[str]:
            return [line for line in server.log.lines if " refuse run=" in line]

        # Written once the answer is sent: after the client may have read it.
        wait_for(lambda: len(refusals()) == 1 or server.log.lines, 5, "one refusal logged")
        refusals_seen = refusals()
    assert len(refusals_seen) == 1, refusals_seen
    assert ("client=203.0.113.9:" in refusals_seen[0]) is trusted, refusals_seen[0]


def test_a_filtered_history_read_does_bounded_work() -> None:
    with running_server(memory_settings(history_scan_max=1000)) as server:
        run_id = str(uuid.uuid4())
        publish_many(server, run_id, 3000)
        url = f"{server.http}/api/v2/workflows/runs/{run_id}/events?types=run_complete"
        pages = []
        cursor: int | None = 0
        while cursor is not None:
            page = httpx.get(f"{url}&since={cursor}", timeout=10).json()
            pages.append(page)
            cursor = page["next"]
    assert [page["next"] for page in pages] == [1000, 2000, None]
    assert all(page["events"] == [] for page in pages)


def test_the_uvicorn_internals_the_protocols_build_on_are_there() -> None:
    """server/uvicorn/ overrides these methods and reads these attributes of uvicorn 0.54's
    protocols: a uvicorn that renames one must fail here, not in production."""
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    from prefect_ws.server.uvicorn.wsprotocol import PrefectWsProtocol

    for name in ("on_response_complete", "handle_websocket_upgrade", "data_received"):
        assert callable(getattr(H11Protocol, name)), name
    for name in (
        "connection_made",
        "handle_ping",
        "keepalive_timeout",
        "send_receive_event_to_app",
        "handle_parser_exception",
        "pause_writing",
        "resume_writing",
    ):
        assert callable(getattr(WebSocketsSansIOProtocol, name)), name
    with running_server(memory_settings()) as server:
        sock = raw_socket(server)
        sock.sendall(ws_request(stream_path(str(uuid.uuid4()), "wait=60")))
        assert read_head(sock).startswith(b"HTTP/1.1 101 ")
        wait_for(lambda: len(server.ws_transports()) == 1, 5, "the connection is seen")
        (protocol,) = [
            c for c in server.server.server_state.connections if hasattr(c, "close_timer")
        ]
        for attribute in (
            *("close_timeout", "close_sent", "read_paused", "frames", "conn", "response"),
            *("default_headers", "handshake_complete", "initial_response", "disconnected"),
        ):
            assert hasattr(protocol, attribute), attribute
        # connection_made is replaced: what uvicorn's sets, from the transport's addresses.
        assert isinstance(protocol, PrefectWsProtocol)
        assert protocol.client == sock.getsockname() and protocol.server == sock.getpeername()
        assert protocol.scheme == "ws" and protocol in server.server.server_state.connections
        sock.close()


def test_addresses_come_from_the_transport_as_uvicorn_reports_them() -> None:
    from prefect_ws.server.uvicorn.wsprotocol import _host_port

    ipv4 = ("127.0.0.1", 8000)
    assert _host_port(ipv4) is ipv4  # kept, not copied
    assert _host_port(("::1", 8000, 0, 0)) == ("::1", 8000)
    assert _host_port(None) is None and _host_port("/tmp/socket") is None


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_closed_connection_is_freed_without_the_cycle_collector(loop: str) -> None:
    """A serving process collects cycles rarely (server/gctuning.py): a connection's objects
    left in a reference cycle would wait there, thousands at a time under churn, and the memory
    they held at the peak stays with the process. With the collector off, a closed stream's
    protocol, transport, websockets connection and task must be freed all the same. The client
    closes while the stream waits for the next event."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")  # the bench extra; uvicorn uses it where installed
    run_id = str(uuid.uuid4())
    with running_server(memory_settings(), loop=loop) as server:
        server.publish(run_id, [log_draft(run_id, 1)])  # open: every stream waits after it

        def open_stream() -> socket.socket:
            sock = raw_socket(server)
            sock.sendall(ws_request(stream_path(run_id)))
            assert read_head(sock).startswith(b"HTTP/1.1 101 ")
            assert sock.recv(65536)  # hello, then the stream waits for the next event
            return sock

        def close(sock: socket.socket) -> None:
            time.sleep(0.05)
            sock.sendall(client_frame(0x8, struct.pack("!H", 1000)))
            read_all(sock)
            sock.close()

        def connection_objects(server: RunningServer) -> list[weakref.ref[Any]]:
            connections: list[Any] = list(server.server.server_state.connections)
            return [
                weakref.ref(thing)
                for protocol in connections
                if hasattr(protocol, "conn")
                for thing in (protocol, protocol.transport, protocol.conn, *protocol.tasks)
            ]

        close(open_stream())  # first use
        gc.collect()
        gc.disable()
        try:
            refs: list[weakref.ref[Any]] = []
            for _ in range(5):
                sock = open_stream()
                wait_for(lambda: len(server.ws_transports()) == 1, 5, "the connection is seen")
                refs += connection_objects(server)
                close(sock)
            wait_for(lambda: not server.ws_transports(), 5, "every connection is gone")
            wait_for(lambda: server.gauge("websocket") == 0, 5, "every stream has ended")
            wait_for(
                lambda: [type(r()).__name__ for r in refs if r() is not None] or True,
                5,
                "every closed connection's objects are freed",
            )
        finally:
            gc.enable()


def test_the_hello_goes_out_in_the_same_write_as_the_101(redis_url: str, redis_prefix: str) -> None:
    """The stream reads the run's state from Redis before it answers the upgrade, so the 101
    and the hello leave in one write: the client's first read holds both."""
    settings = Settings(broadcast_url=redis_url, redis_prefix=redis_prefix, **OPEN_LIMITS)
    run_id = str(uuid.uuid4())
    with running_server(settings) as server:
        sock = raw_socket(server)
        sock.sendall(ws_request(stream_path(run_id, "wait=60")))
        first = sock.recv(65536)
        head, _, rest = first.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), first
        assert rest[:1] == b"\x81" and b'"type":"hello"' in rest, first
        sock.close()
