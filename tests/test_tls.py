"""TLS: `prefect-ws serve --ssl-certfile --ssl-keyfile` serves wss:// to a verifying client."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
from websockets.asyncio.client import connect

KEY = "tls-test-key"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_server(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real command line, in its own process, with a certificate for 127.0.0.1."""
    directory: Path = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    port = _free_port()
    env = {**os.environ, "PREFECT_WS_API_KEYS": KEY, "PREFECT_WS_BROADCAST_URL": "memory://"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect-ws"), "serve", "--host", "127.0.0.1",
         "--port", str(port), "--ssl-certfile", str(certfile), "--ssl-keyfile", str(keyfile)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    context = ssl.create_default_context(cafile=None)
    ca.configure_trust(context)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"https://127.0.0.1:{port}/healthz", verify=context).status_code == 200:
                break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_wss_round_trip_with_a_verifying_client(ca: trustme.CA, tls_server: str) -> None:
    async def main() -> None:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        run_id = str(uuid.uuid4())
        url = f"wss://{tls_server}/api/v2/workflows/runs/{run_id}/stream?wait=60"
        async with connect(url, ssl=context, additional_headers={"Authorization": f"Bearer {KEY}"},
                           proxy=None) as ws:  # fmt: skip
            assert ws.transport.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):  # open and waiting for the run (a hello at most)
                    async for message in ws:
                        assert json.loads(message)["type"] == "hello"
        async with httpx.AsyncClient(verify=context) as client:
            health = await client.get(f"https://{tls_server}/healthz")
            refused = await client.get(
                f"https://{tls_server}/api/v2/workflows/runs/{run_id}/events"
            )
        assert health.json()["status"] == "ok"
        assert (refused.status_code, refused.json()["error"]) == (401, "missing credentials")

    asyncio.run(main())


def test_clients_that_do_not_trust_the_ca_are_refused(tls_server: str) -> None:
    async def main() -> None:
        untrusting = ssl.create_default_context()  # system roots only: the test CA is unknown
        with pytest.raises(ssl.SSLCertVerificationError):
            async with connect(f"wss://{tls_server}/api/v2/workflows/runs/{uuid.uuid4()}/stream",
                               ssl=untrusting, proxy=None, open_timeout=5):  # fmt: skip
                pass

    asyncio.run(main())


def test_plain_http_to_the_tls_port_gets_no_stream(tls_server: str) -> None:
    host, port = tls_server.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = sock.recv(1024)
    assert not reply.startswith(b"HTTP/1.1 200")


def test_serve_needs_both_tls_files() -> None:
    from typer.testing import CliRunner

    from prefect_ws.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--port", "1", "--ssl-certfile", "cert.pem"])
    assert result.exit_code == 2
    assert "--ssl-certfile and --ssl-keyfile go together" in result.output
