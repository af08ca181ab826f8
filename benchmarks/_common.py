"""Shared plumbing for the benchmark scripts: processes, ports, stats, tables and result files.

Every benchmark starts its own servers as child processes on 127.0.0.1, stops them by PID, bounds
every loop in count and time, and writes one JSON file to ``benchmarks/results/`` (or to
``$BENCH_RESULTS_DIR``, where the quick test run puts them, outside the source tree). Numbers on a
shared 2-core box are noisy, so scripts repeat cases and report medians and ratios taken in the
same run.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = sys.executable
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


# -- process and OS helpers -------------------------------------------------------------------
def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE to the hard limit: thousands of sockets need thousands of fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """CPU time of the process and its live children (the workers of ``--workers N``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            children = [int(child) for child in listing.read().split()]
    except OSError:
        children = []
    return own + sum(_child_cpu_seconds(child) for child in children)


def _child_cpu_seconds(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:  # it exited meanwhile
        return 0.0


def stop(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """Stop one child we started, by its PID: SIGTERM, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def redis_prefix(name: str) -> str:
    """A key prefix per benchmark run, so runs never see each other's data."""
    return f"prefect-ws-bench-{name}-{uuid.uuid4().hex[:8]}"


def cleanup_redis(prefix: str, url: str = REDIS_URL) -> None:
    """Delete the keys a benchmark left in Redis (bounded SCAN)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


# Every load client comes from 127.0.0.1: lift the per-address and per-process guards
# so the benchmark measures the stream, not the limiter; one access-log line per connection off.
LOAD_LIMITS = {
    "PREFECT_WS_MAX_CONNECTIONS": "100000",
    "PREFECT_WS_MAX_CONNECTIONS_PER_IP": "100000",
    "PREFECT_WS_HANDSHAKE_RATE": "1000000/second",
    "PREFECT_WS_MAX_RUNS": "100000",
    "PREFECT_WS_ACCESS_LOG": "false",
}


SERVE = (PYTHON, str(HERE / "_serve.py"))


@contextlib.contextmanager
def prefect_ws_server(
    broadcast_url: str,
    prefix: str,
    *,
    mode: str = "prefect-ws",
    extra_env: dict[str, str] | None = None,
    loop: str = "asyncio",
    workers: int = 1,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``benchmarks/_serve.py`` in a child process; yields (process, port).

    ``loop`` is uvicorn's ``--loop``. The scripts pass ``asyncio`` unless told otherwise: with
    uvloop installed (the ``bench`` extra) uvicorn's ``auto`` would pick it, and the numbers
    would stop being comparable with earlier runs.
    """
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_WS_BROADCAST_URL": broadcast_url,
        "PREFECT_WS_REDIS_PREFIX": prefix,
        "PREFECT_WS_LOG_LEVEL": "WARNING",
        **LOAD_LIMITS,
        **(extra_env or {}),
    }
    log = tempfile.NamedTemporaryFile(prefix=f"bench-{mode}-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [*SERVE, "--port", str(port), "--mode", mode, "--loop", loop, "--workers", str(workers)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, 60, proc)
        yield proc, port
    finally:
        stop(proc)
        log.close()
        errors = server_errors(Path(log.name))
        if errors:
            print(f"{mode} server logged {errors} ERROR line(s); see {log.name}", flush=True)
        else:
            Path(log.name).unlink(missing_ok=True)


def server_errors(log: Path) -> int:
    """ERROR lines a server logged (streams it closed with 1011 show up here)."""
    try:
        return sum(1 for line in log.read_text(errors="replace").splitlines() if "| ERROR" in line)
    except OSError:
        return 0


PREFECT_SERVER_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    # Prefect's own live log stream, off by default.
    "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
    "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true",
    # Prefect's background services contend for SQLite and cause 2 s retry spikes in flow runs.
    "PREFECT_API_SERVICES_EVENT_PERSISTER_ENABLED": "false",
    "PREFECT_API_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
    "PREFECT_API_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_API_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_API_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_API_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_API_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
    "PREFECT_API_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_API_SERVICES_REPOSSESSOR_ENABLED": "false",
}


@contextlib.contextmanager
def prefect_server(api_url: str | None = None) -> Iterator[dict[str, str]]:
    """A ``prefect server start`` with its log stream on; yields the env a flow process needs.

    With ``api_url`` (an already running server) nothing is started.
    """
    if api_url:
        yield {"PREFECT_API_URL": api_url}
        return
    home = tempfile.mkdtemp(prefix="prefect-ws-bench-")
    port = free_port()
    env = {**os.environ, **PREFECT_SERVER_ENV, "PREFECT_HOME": home}
    log = open(Path(home) / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [PYTHON, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        _wait_http(f"{api}/health", 120, proc)
        yield {"PREFECT_API_URL": api, "PREFECT_HOME": home}
    finally:
        stop(proc, 15)
        log.close()


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[Any]) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


LOOPS = ("asyncio", "uvloop")


def add_loop_option(parser: Any) -> None:
    """``--loop``: the event loop of every server a script starts (prefect-ws and baseline)."""
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default="asyncio",
        help="server event loop, for prefect-ws and the baseline alike (uvloop: the bench extra)",
    )


# -- statistics -------------------------------------------------------------------------------
def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return float(sorted_values[index])


def latency_summary(values_ns: Sequence[int]) -> dict[str, float | int | None]:
    """p50/p99/max in milliseconds."""
    ordered = sorted(values_ns)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value / 1e6, 3)

    return {
        "n": len(ordered),
        "p50_ms": ms(percentile(ordered, 50)),
        "p99_ms": ms(percentile(ordered, 99)),
        "max_ms": ms(float(ordered[-1]) if ordered else None),
    }


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b not in (None, 0) else None


# -- output -----------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in (
        "prefect-ws",
        "prefect",
        "uvicorn",
        "starlette",
        "websockets",
        "redis",
        "broadcaster",
        "uvloop",
        "orjson",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        model = next(
            (ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), ""
        )
    redis_version = ""
    with contextlib.suppress(Exception):
        import redis

        redis_version = str(redis.Redis.from_url(REDIS_URL).info("server")["redis_version"])
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "redis_server": redis_version,
        "packages": versions(),
    }


def with_bench_path(env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``benchmarks/`` put first on PYTHONPATH (a snapshot's path kept after it)."""
    current = env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), current) if p)}


def results_dir() -> Path:
    """Where result files (and ``--profile`` dumps) go: ``$BENCH_RESULTS_DIR`` or ``results/``."""
    return Path(os.environ.get("BENCH_RESULTS_DIR") or HERE / "results")


def source() -> dict[str, str]:
    """Which prefect_ws code ran: this checkout's (at its HEAD) or another copy on PYTHONPATH."""
    info = {"prefect_ws": "", "git_head": ""}
    with contextlib.suppress(Exception):
        import prefect_ws

        package = Path(prefect_ws.__file__).resolve().parent
        info["prefect_ws"] = "checkout" if package == ROOT / "prefect_ws" else str(package)
    with contextlib.suppress(Exception):
        info["git_head"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    return info


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table, so it pastes into docs/benchmarks.md as is."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    print(f"\n### {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(cell(v) for v in row) + " |")
    print(flush=True)


def write_results(name: str, quick: bool, data: dict[str, Any]) -> Path:
    results = results_dir()
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}{'-quick' if quick else ''}.json"
    payload = {
        "benchmark": name,
        "quick": quick,
        "command": " ".join([Path(PYTHON).name, *sys.argv]),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "source": source(),
        **data,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results written to {path}", flush=True)
    return path


def top_frames(collapsed: Path, top: int = 12) -> list[tuple[str, float]]:
    """Self-time share per function from a py-spy ``--format raw`` (collapsed stacks) file."""
    counts: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        counts[leaf] = counts.get(leaf, 0) + int(count)
        total += int(count)
    ranked = sorted(counts.items(), key=lambda item: -item[1])[:top]
    return [(name, round(100 * n / total, 1)) for name, n in ranked] if total else []
