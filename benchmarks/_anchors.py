"""The anchor servers the benchmarks compare prefect-ws with: what people pick for fan-out.

- ``node-ws``: Node's ``ws`` + ``ioredis`` (``anchors/node/server.js``), installed from the npm
  registry by :func:`node_setup` into ``anchors/node/node_modules`` (git-ignored) with
  ``npm ci``, so every machine runs the versions in ``package-lock.json``;
- ``websockets``: python-websockets' ``broadcast()`` (``anchors/websockets_server.py``), a
  dependency of prefect-ws already.

Both speak what the load client expects (``{"type":"ready"}``, then each event as one text
frame, close 1000 after ``run_complete``) on the stream route, one process each, Redis pub/sub
for the events the real publisher sends. Where Node or npm is missing the Node anchor is skipped
with a message saying so; the benchmark runs on without it.

``anchors/node/load.js`` is a load client, not an anchor: ``_wsload.py --mode stream`` in Node,
for runs where the Python client's CPU per event would cap the measurement
(:func:`stream_load_client`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import HERE, PYTHON, free_port, stop, wait_port

NODE_DIR = HERE / "anchors" / "node"
NODE_LOAD_CLIENT = NODE_DIR / "load.js"
PYTHON_LOAD_CLIENT = HERE / "_wsload.py"
LOAD_CLIENTS = ("node", "python")
WEBSOCKETS_SERVER = HERE / "anchors" / "websockets_server.py"
ANCHORS = ("node-ws", "websockets")


def node_setup() -> str | None:
    """Install the Node packages if needed; the reason Node cannot run here, or None."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return "node and npm are not on PATH (install Node.js >= 18)"
    if (NODE_DIR / "node_modules" / "ws").is_dir() and (
        NODE_DIR / "node_modules" / "ioredis"
    ).is_dir():
        return None
    try:
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--silent"],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        stderr = getattr(exc, "stderr", b"") or b""
        tail = " ".join(stderr.decode(errors="replace").split())[-200:]
        return f"npm ci failed ({exc}; {tail})"
    return None


def available_anchors(wanted: tuple[str, ...] = ANCHORS) -> list[str]:
    """The anchors in ``wanted`` that can run here (reasons for the others printed)."""
    found = []
    for name in wanted:
        reason = node_setup() if name == "node-ws" else None
        if reason is None:
            found.append(name)
        else:
            print(f"{name} anchor skipped: {reason}", flush=True)
    return found


def stream_load_client(wanted: str | None = None) -> tuple[str, list[str]]:
    """The stream load client to start: (name, command without its arguments).

    ``node`` (``anchors/node/load.js``) where Node can run, else ``python`` (``_wsload.py``),
    with a line saying why: the Python client spends ~6 us of CPU per received event, so it
    caps what it can measure near 150k events/s. Both take ``--mode stream --url U --count N
    --concurrency C --deadline S`` and print the same READY and JSON lines. ``wanted`` picks
    one; ``node`` where Node cannot run is an error.
    """
    if wanted not in (None, *LOAD_CLIENTS):
        raise ValueError(f"unknown load client {wanted!r}")
    if wanted != "python":
        reason = node_setup()
        if reason is None:
            return "node", ["node", str(NODE_LOAD_CLIENT)]
        if wanted == "node":
            raise RuntimeError(f"the Node load client cannot run: {reason}")
        print(
            f"Python load client used (~6 us CPU per event caps it near 150k events/s): "
            f"the Node one cannot run: {reason}",
            flush=True,
        )
    return "python", [PYTHON, str(PYTHON_LOAD_CLIENT)]


def node_version() -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(
            ["node", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    return ""


@contextlib.contextmanager
def anchor_server(
    name: str, broadcast_url: str, prefix: str
) -> Iterator[tuple[subprocess.Popen[Any], int]]:
    """One anchor server process on 127.0.0.1; yields (process, port)."""
    port = free_port()
    if name == "node-ws":
        command = ["node", str(NODE_DIR / "server.js"), str(port)]
    elif name == "websockets":
        command = [PYTHON, str(WEBSOCKETS_SERVER), "--port", str(port)]
    else:
        raise ValueError(f"unknown anchor {name!r}")
    env = {
        **os.environ,
        "PREFECT_WS_BROADCAST_URL": broadcast_url,
        "PREFECT_WS_REDIS_PREFIX": prefix,
    }
    log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, 60, proc)
        yield proc, port
    finally:
        stop(proc)
        log.close()
        text = Path(log.name).read_text(errors="replace").strip()
        if text:
            print(f"{name} server wrote output; see {log.name}: {text[-300:]}", flush=True)
        else:
            Path(log.name).unlink(missing_ok=True)
