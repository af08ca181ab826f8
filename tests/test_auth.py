"""Authentication: tokens, keys, where they are read, expiry mid-stream, CLI, the bind rule."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from test_hostile import Server, publish_run, read_stream, refusal, stream_url
from typer.testing import CliRunner
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from prefect_ws.cli.main import app as cli
from prefect_ws.server.security.auth import (
    ADMIN_SCOPE,
    Authenticator,
    AuthError,
    UnsafeBind,
    check_bind,
    extract_credential,
    mint_token,
    parse_ttl,
    strip_credentials,
    verify_token,
)
from prefect_ws.server.uvicorn.config import serve_in_thread
from prefect_ws.settings import Settings

SECRET = "auth-test-secret"
RUN = "0b6c3e4e-1a2b-4c5d-8e9f-0a1b2c3d4e5f"


# -- tokens, pure ----------------------------------------------------------------------------------


def test_minted_token_grants_its_run_until_expiry() -> None:
    now = 1_800_000_000.0
    token = mint_token(RUN.upper(), secret=SECRET, ttl=3600, now=now)
    principal = verify_token(token, secrets=[SECRET], now=now + 3599)
    assert principal.kind == "token" and principal.scope == RUN
    assert principal.expires_at == now + 3600
    assert principal.allows(RUN) and not principal.allows(str(uuid.uuid4()))
    with pytest.raises(AuthError) as expired:
        verify_token(token, secrets=[SECRET], now=now + 3600)
    assert (expired.value.status, expired.value.reason) == (401, "token expired")


def test_admin_token_and_secret_rotation() -> None:
    token = mint_token(ADMIN_SCOPE, secret="old", ttl=60)
    principal = verify_token(token, secrets=["new", "old"])
    assert principal.is_admin and principal.allows(str(uuid.uuid4()))
    with pytest.raises(AuthError, match="invalid token signature"):
        verify_token(token, secrets=["new"])


def test_mint_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="UUID"):
        mint_token("not-a-run", secret=SECRET)
    with pytest.raises(ValueError, match="secret"):
        mint_token(RUN, secret="")
    with pytest.raises(ValueError, match="positive"):
        mint_token(RUN, secret=SECRET, ttl=0)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600), ("2d", 172800)]
)
def test_parse_ttl(text: str, seconds: float) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "1y", "-5m", "0", "h"])
def test_parse_ttl_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ttl(text)


def test_authenticator_modes() -> None:
    assert not Authenticator().enabled
    assert Authenticator().authenticate(None).kind == "anonymous"
    keys = Authenticator(api_keys=["k1", "k2"])
    assert keys.authenticate("k2").kind == "api_key"
    with pytest.raises(AuthError, match="missing credentials"):
        keys.authenticate(None)
    with pytest.raises(AuthError, match="invalid API key"):
        keys.authenticate("k3")
    both = Authenticator(api_keys=["k1"], token_secrets=[SECRET])
    assert both.authenticate(mint_token(RUN, secret=SECRET)).scope == RUN


def test_credential_sources_and_stripping() -> None:
    assert extract_credential({"authorization": "Bearer abc"}, [], []) == "abc"
    assert extract_credential({}, [("since", "3"), ("token", "q")], []) == "q"
    assert extract_credential({}, [], ["prefect-ws.v1", "bearer.p"]) == "p"
    assert extract_credential({"authorization": "Basic x"}, [("token", "q")], []) == ""
    assert extract_credential({}, [], ["prefect-ws.v1"]) is None
    assert strip_credentials(b"since=3&token=secret&types=step_log") == b"since=3&types=step_log"


@pytest.mark.parametrize(
    ("host", "auth", "insecure", "allowed"),
    [
        ("127.0.0.1", False, False, True),
        ("::1", False, False, True),
        ("localhost", False, False, True),
        ("0.0.0.0", False, False, False),
        ("192.168.1.5", False, False, False),
        ("0.0.0.0", True, False, True),
        ("0.0.0.0", False, True, True),
    ],
)
def test_bind_rule(host: str, auth: bool, insecure: bool, allowed: bool) -> None:
    if allowed:
        check_bind(host, auth_enabled=auth, insecure=insecure)
    else:
        with pytest.raises(UnsafeBind, match="--insecure"):
            check_bind(host, auth_enabled=auth, insecure=insecure)


# -- command line ----------------------------------------------------------------------------------


def test_cli_token_prints_a_token_the_server_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_WS_TOKEN_SECRET", SECRET)
    result = CliRunner().invoke(cli, ["token", RUN, "--ttl", "1h"])
    assert result.exit_code == 0, result.output
    principal = verify_token(result.output.strip(), secrets=[SECRET])
    assert principal.scope == RUN and 3590 < principal.expires_at - time.time() <= 3600  # type: ignore[operator]


def test_cli_token_without_secret_or_with_bad_run(monkeypatch: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(cli, ["token", RUN])
    assert result.exit_code == 2 and "PREFECT_WS_TOKEN_SECRET" in result.output
    monkeypatch.setenv("PREFECT_WS_TOKEN_SECRET", SECRET)
    result = CliRunner().invoke(cli, ["token", "nope", "--ttl", "1h"])
    assert result.exit_code == 2 and "UUID" in result.output


def test_cli_serve_refuses_a_public_address_without_auth() -> None:
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--port", "1"])
    assert result.exit_code == 2
    assert "refusing to serve 0.0.0.0 without authentication" in result.output


# -- against a real server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server() -> Iterator[Server]:
    settings = Settings(broadcast_url="memory://", token_secret=SECRET)
    run_id = publish_run(settings)
    with serve_in_thread(settings) as base:
        yield Server(base, run_id, settings)


def test_token_accepted_in_header_query_and_subprotocol(token_server: Server) -> None:
    async def main() -> None:
        token = mint_token(token_server.run_id, secret=SECRET, ttl=60)
        url = stream_url(token_server.base, token_server.run_id)
        ways: list[dict[str, Any]] = [
            {"additional_headers": {"Authorization": f"Bearer {token}"}},
            {"url": stream_url(token_server.base, token_server.run_id, f"token={token}&since=2")},
            {"subprotocols": ["prefect-ws.v1", f"bearer.{token}"]},
        ]
        offered = [Subprotocol("prefect-ws.v1"), Subprotocol(f"bearer.{token}")]
        async with connect(url, subprotocols=offered, proxy=None) as ws:
            assert ws.subprotocol == "prefect-ws.v1"  # browsers require an answer; never the token
            assert ws.response is not None and token not in str(ws.response.headers)
        for way in ways:
            stream = await read_stream(str(way.pop("url", url)), **way)
            assert stream.code == 1000 and stream.events[-1]["type"] == "run_complete"
        assert [e["seq"] for e in stream.events] == [1, 2, 3, 4, 5]
        since = await read_stream(
            stream_url(token_server.base, token_server.run_id, f"since=2&token={token}")
        )
        assert [e["seq"] for e in since.events] == [3, 4, 5]  # the token did not disturb `since`

    asyncio.run(main())


def test_stream_is_closed_when_its_token_expires(token_server: Server) -> None:
    async def main() -> None:
        live_run = str(uuid.uuid4())
        token = mint_token(live_run, secret=SECRET, ttl=2)
        started = time.monotonic()
        stream = await read_stream(
            stream_url(token_server.base, live_run, f"token={token}&wait=60")
        )
        assert (stream.code, stream.reason) == (4401, "token expired")
        assert 0.5 < time.monotonic() - started < 4
        assert await refusal(stream_url(token_server.base, live_run, f"token={token}")) == (
            401,
            "token expired",
        )

    asyncio.run(main())


def test_json_access_log_has_one_line_each_way_and_no_token(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def main() -> None:
        settings = Settings(broadcast_url="memory://", token_secret=SECRET, log_json=True)
        run_id = publish_run(settings)
        token = mint_token(run_id, secret=SECRET, ttl=60)
        with serve_in_thread(settings) as base:
            capsys.readouterr()
            stream = await read_stream(stream_url(base, run_id, f"token={token}"))
            await refusal(stream_url(base, run_id, "token=forged.token.here"))
            await asyncio.sleep(0.1)
            err = capsys.readouterr().err
        assert stream.code == 1000
        assert token not in err and "forged.token.here" not in err
        lines = [json.loads(line) for line in err.splitlines() if line.startswith('{"ts":')]
        assert [line["event"] for line in lines] == ["connect", "disconnect", "refuse"]
        connect, disconnect, refuse = lines
        assert connect["run"] == run_id and connect["transport"] == "ws"
        assert connect["client"].startswith("127.0.0.1:") and connect["level"] == "INFO"
        assert disconnect["code"] == 1000 and disconnect["reason"] == "run complete"
        assert disconnect["events"] == 5 and disconnect["duration"] >= 0
        assert refuse["status"] == 401 and refuse["reason"] == "malformed token"

    asyncio.run(main())


def test_text_access_log_lines_are_key_value_and_escaped() -> None:
    async def main() -> None:
        records: list[logging.LogRecord] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record)

        settings = Settings(broadcast_url="memory://", api_keys=["k"])
        run_id = publish_run(settings)
        keep = Keep()
        logging.getLogger("prefect_ws.access").addHandler(keep)
        try:
            with serve_in_thread(settings) as base:
                await read_stream(
                    stream_url(base, run_id), additional_headers={"Authorization": "Bearer k"}
                )
                await refusal(stream_url(base, "x\u2028y"))  # odd characters stay on one line
                await asyncio.sleep(0.1)
        finally:
            logging.getLogger("prefect_ws.access").removeHandler(keep)
        lines = [r.getMessage() for r in records]
        assert all(r.levelno == logging.INFO for r in records)
        assert (
            lines[0]
            == f"connect run={run_id} client={lines[0].split('client=')[1].split()[0]} transport=ws"
        )
        assert re.fullmatch(
            rf"disconnect run={run_id} client=127\.0\.0\.1:\d+ transport=ws duration=\d+\.\d{{3}} "
            r'code=1000 reason="run complete" events=5',
            lines[1],
        )
        assert lines[2].startswith('refuse run="x\\u2028y" client=127.0.0.1:')
        assert lines[2].endswith('status=401 reason="missing credentials"')

    asyncio.run(main())


def test_sse_stream_ends_when_its_token_expires(token_server: Server) -> None:
    async def main() -> None:
        live_run = str(uuid.uuid4())
        token = mint_token(live_run, secret=SECRET, ttl=2)
        url = f"{token_server.http}/api/v2/workflows/runs/{live_run}/events/stream?wait=60"
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(url, headers={"Authorization": f"Bearer {token}"})
            refused = await client.get(url, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        assert response.text.rstrip().endswith(
            'event: end\ndata: {"code": 4401, "reason": "token expired"}'
        )
        assert 0.5 < time.monotonic() - started < 4
        assert (refused.status_code, refused.json()["error"]) == (401, "token expired")

    asyncio.run(main())


def test_uvicorn_access_log_never_shows_a_token() -> None:
    """Even with uvicorn's own access log on, ?token= is gone before uvicorn writes a line."""

    async def main() -> None:
        records: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record.getMessage())

        settings = Settings(broadcast_url="memory://", token_secret=SECRET)
        run_id = publish_run(settings)
        token = mint_token(run_id, secret=SECRET, ttl=60)
        keep = Keep()
        with serve_in_thread(settings, access_log=True) as base:
            for name in ("uvicorn.access", "uvicorn.error"):
                logging.getLogger(name).addHandler(keep)
            try:
                http = base.replace("ws://", "http://", 1)
                async with httpx.AsyncClient(base_url=http) as client:
                    page = await client.get(f"/runs/{run_id}?token={token}&x=1")
                    history = await client.get(
                        f"/api/v2/workflows/runs/{run_id}/events?token={token}"
                    )
                stream = await read_stream(stream_url(base, run_id, f"token={token}"))
            finally:
                for name in ("uvicorn.access", "uvicorn.error"):
                    logging.getLogger(name).removeHandler(keep)
        assert history.status_code == 200 and stream.code == 1000
        assert page.status_code in (200, 404)
        assert any("/events" in line for line in records), records
        assert not any(token in line for line in records)

    asyncio.run(main())
