"""The workflow runner: YAML/JSON/Python DAG definitions run as Prefect flows, streamed live.

See docs/workflows.md. Import cost: Prefect (the runner builds Prefect flows and tasks).
"""

from prefect_ws.workflow.loader import load_workflow, parse_param_assignments
from prefect_ws.workflow.model import Problem, Step, Workflow, WorkflowError
from prefect_ws.workflow.runner import (
    WorkflowFailed,
    WorkflowRun,
    make_flow,
    run_workflow,
    workflow_flow,
)

__all__ = [
    "Problem",
    "Step",
    "Workflow",
    "WorkflowError",
    "WorkflowFailed",
    "WorkflowRun",
    "load_workflow",
    "make_flow",
    "parse_param_assignments",
    "run_workflow",
    "workflow_flow",
]
