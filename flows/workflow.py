"""The deployable prefect-ws workflow flow: the workflow definition is a flow parameter.

Deploy it like any Prefect flow (the runner itself lives in the installed ``prefect_ws`` package;
this file only exposes it, so no ``flows`` package is ever installed into site-packages):

    prefect deploy flows/workflow.py:workflow -n my-workflows -p my-pool
    python flows/workflow.py examples/diamond.yaml   # flow.serve() with that file as the default

Parameters: ``definition`` (a workflow mapping, or the path of a YAML/JSON file visible to the
worker), ``parameters`` (overrides of the workflow's defaults), ``workflow_dir`` (the folder the
``run:`` modules are imported from; for a file path, its folder by default).
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect_ws.workflow import workflow_flow as workflow
from prefect_ws.workflow.runner import prepare_run

__all__ = ["workflow"]


def serve(path: str, name: str | None = None) -> None:
    """Validate ``path`` and serve a deployment of it (``flow.serve``) until interrupted."""
    definition, parameters = prepare_run(Path(path))
    workflow.serve(name=name or definition.id, parameters=parameters)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python flows/workflow.py WORKFLOW_FILE [DEPLOYMENT_NAME]")
    serve(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None)
