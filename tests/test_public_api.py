"""The import paths users script against stay where they are, whatever the package layout."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

import pytest


@pytest.mark.parametrize(
    "name", ["flow", "task", "stream", "flow_hooks", "task_hooks", "create_app", "mint_token"]
)
def test_the_package_root_exports_the_public_api(name: str) -> None:
    import prefect_ws

    assert callable(getattr(prefect_ws, name))
    assert name in prefect_ws.__all__


def test_the_log_handler_keeps_the_path_logging_files_name() -> None:
    from prefect_ws.log_handler import PrefectWsHandler
    from prefect_ws.publish.log_handler import PrefectWsHandler as Handler

    assert PrefectWsHandler is Handler


def test_the_prefect_plugin_entry_point_loads() -> None:
    (entry,) = [e for e in entry_points(group="prefect.plugins") if e.name == "prefect_ws"]
    module = entry.load()
    assert callable(module.setup_environment)


def test_the_command_entry_point_loads() -> None:
    (entry,) = [e for e in entry_points(group="console_scripts") if e.name == "prefect-ws"]
    assert callable(entry.load())


def test_the_flow_process_side_imports_no_server_code() -> None:
    """A flow process imports prefect_ws for its decorators: it must not pay for the server."""
    import subprocess
    import sys

    code = (
        "import sys, prefect_ws, prefect_ws.publish.hooks, prefect_ws.publish.plugin;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'uvicorn'"
        " or m.startswith(('prefect_ws.server', 'prefect_ws.clients', 'prefect_ws.cli'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("package", ["protocol", "publish", "backends", "server", "clients", "cli"])
def test_each_role_package_says_what_it_is(package: str) -> None:
    module = importlib.import_module(f"prefect_ws.{package}")
    assert module.__doc__ and len(module.__doc__) > 40
