"""Zero-code mode: with PREFECT_PLUGINS_ENABLED=true, a plain Prefect flow streams its run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import python_path, redis_history

TESTS = Path(__file__).resolve().parent


def _run_plain_flow(extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": python_path(), **extra_env}
    return subprocess.run(
        [sys.executable, str(TESTS / "plain_prefect_flow.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_plugin_streams_logs_of_a_flow_that_never_imports_prefect_ws(
    prefect_api: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    env = {
        "PREFECT_PLUGINS_ENABLED": "true",
        "PREFECT_HOME": str(tmp_path),  # no logging.yml of the user's own there
        "PREFECT_API_URL": prefect_api,
        "PREFECT_WS_BROADCAST_URL": redis_url,
        "PREFECT_WS_REDIS_PREFIX": redis_prefix,
    }
    result = _run_plain_flow(env)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = json.loads(result.stdout.strip().splitlines()[-1])["run_id"]

    events = redis_history(redis_url, redis_prefix, run_id)
    logs = [
        (e["payload"]["stepId"], e["payload"]["level"], e["payload"]["message"])
        for e in events
        if e["type"] == "step_log"
    ]
    assert logs == [
        (None, "WARNING", "plain flow warns"),
        ("plain-step", "INFO", "plain step logs"),
        ("plain-step", "INFO", "plain step prints"),
    ]
    assert [e["type"] for e in events] == [
        "run_start",
        "step_log",
        "step_start",
        "step_log",
        "step_log",
        "step_complete",
        "run_complete",
    ]  # the lifecycle too: the engine watch is installed by the plugin
    assert [e["seq"] for e in events] == list(range(1, 8))
    # Prefect's own console handler kept working beside ours.
    assert "plain step logs" in result.stderr


def test_without_the_plugin_switch_nothing_is_streamed(
    prefect_api: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    env = {
        "PREFECT_HOME": str(tmp_path),
        "PREFECT_API_URL": prefect_api,
        "PREFECT_WS_BROADCAST_URL": redis_url,
        "PREFECT_WS_REDIS_PREFIX": redis_prefix,
    }
    env_without = {k: v for k, v in env.items()}
    result = _run_plain_flow({**env_without, "PREFECT_PLUGINS_ENABLED": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = json.loads(result.stdout.strip().splitlines()[-1])["run_id"]
    assert redis_history(redis_url, redis_prefix, run_id) == []


def test_plugin_leaves_a_users_own_logging_config_alone(tmp_path: Path) -> None:
    from prefect_ws.publish import plugin

    (tmp_path / "logging.yml").write_text("version: 1\n")
    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(tmp_path)
    try:
        result = plugin.setup_environment(ctx=None)
    finally:
        if old is None:
            del os.environ["PREFECT_HOME"]
        else:
            os.environ["PREFECT_HOME"] = old
    assert result is not None and result.env == {}
    assert "add the prefect-ws handler" in (result.note or "")


def test_packaged_logging_config_is_prefects_default_plus_our_handler() -> None:
    """The plugin's logging.yml is a copy of Prefect's default: fails when Prefect's changes."""
    import yaml
    from prefect.logging.configuration import DEFAULT_LOGGING_SETTINGS_PATH

    from prefect_ws.publish.plugin import LOGGING_CONFIG

    prefects = yaml.safe_load(DEFAULT_LOGGING_SETTINGS_PATH.read_text())
    ours = yaml.safe_load(LOGGING_CONFIG.read_text())
    handler = ours["handlers"].pop("prefect_ws")
    assert handler["class"] == "prefect_ws.log_handler.PrefectWsHandler"
    with_ours = [
        name
        for name, logger in ours["loggers"].items()
        if "prefect_ws" in logger.get("handlers", [])
    ]
    assert with_ours == ["prefect.flow_runs", "prefect.task_runs"]
    for name in with_ours:
        ours["loggers"][name]["handlers"].remove("prefect_ws")
    assert ours == prefects
