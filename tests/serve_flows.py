"""Serve the plain flow of the reconciliation tests: ``python serve_flows.py DEPLOYMENT_NAME``.

``flow.serve()`` starts a Prefect runner in this process: it polls the API for the deployment's
runs and starts each one in a new process, and marks a run Crashed when that process dies.
"""

from __future__ import annotations

import sys

from reconcile_flows import plain_sleeper

if __name__ == "__main__":
    plain_sleeper.serve(name=sys.argv[1], print_starting_message=False)
