"""Run a workflow as one Prefect flow run: each step a Prefect task, streamed live.

Every step is submitted up front, in topological order, with ``wait_for`` its upstream futures,
on a thread pool with no worker limit: Prefect resolves ``wait_for`` inside the worker thread,
so any limit lets steps that are still waiting hold the threads a ready step needs (head-of-line
blocking, measured on Prefect 3.9's thread-pool task runner: a 0.3 s DAG took 3.3 s with a small
pool). A step therefore starts the moment its own needs are done, with no barrier between layers.

Streaming is the flow-process side's job (:mod:`prefect_ws.publish.lifecycle`): the runner only
hands each hook what the stream needs (a step's layer, how to describe the run's layers) and
reads the outcomes to fail the flow run when a step failed. A step whose upstream failed ends
``Pending('NotReady')`` and is streamed as ``skipped`` with the failed upstream named.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from prefect import Flow, Task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from prefect_ws.publish.hooks import flow_hooks, task_hooks
from prefect_ws.workflow import dag
from prefect_ws.workflow.loader import (
    PARAMETERS_ARG,
    UPSTREAM_ARG,
    graph_of,
    load_workflow,
    merge_parameters,
    resolve_target,
)
from prefect_ws.workflow.model import Step, Workflow, WorkflowError
from prefect_ws.workflow.shell import run_shell

FLOW_NAME: Final = "prefect-ws-workflow"
MAX_ENV_VALUE: Final = 65_536


class WorkflowFailed(RuntimeError):
    """Raised by the flow when a step failed, so the Prefect flow run ends Failed."""


# -- what a step runs ------------------------------------------------------------------------------
def build_kwargs(
    fn: Callable[..., Any],
    params: Mapping[str, Any],
    parameters: Mapping[str, Any],
    upstream: Mapping[str, Any],
) -> dict[str, Any]:
    """The keyword arguments a step's callable gets (docs/workflows.md, "Passing data").

    For each argument name, first match wins: the step's ``params``, an upstream step's result
    (by step id), ``upstream`` (all upstream results by id), ``parameters`` (all workflow
    parameters), a workflow parameter of that name. A ``**kwargs`` callable also gets every
    step param.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return dict(params)
    kwargs: dict[str, Any] = {}
    var_keyword = False
    for name, parameter in signature.parameters.items():
        if parameter.kind is parameter.VAR_KEYWORD:
            var_keyword = True
            continue
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.POSITIONAL_ONLY):
            continue
        if name in params:
            kwargs[name] = params[name]
        elif name in upstream:
            kwargs[name] = upstream[name]
        elif name == UPSTREAM_ARG:
            kwargs[name] = dict(upstream)
        elif name == PARAMETERS_ARG:
            kwargs[name] = dict(parameters)
        elif name in parameters:
            kwargs[name] = parameters[name]
    if var_keyword:
        kwargs.update({k: v for k, v in params.items() if k not in kwargs})
    return kwargs


def _python_step(
    target: str,
    params: dict[str, Any],
    parameters: dict[str, Any],
    upstream: dict[str, Any],
    base_dir: str | None = None,
    timeout: float | None = None,
) -> Any:
    """Call the step's ``run:`` target (Prefect has already resolved ``upstream`` to results).

    An async target is cancelled at ``timeout``. A sync one cannot be: Python cannot stop a
    thread, so Prefect fails the step with its timeout error only once the function returns.
    """
    fn = resolve_target(target, base_dir)
    result = fn(**build_kwargs(fn, params, parameters, upstream))
    if inspect.isawaitable(result):
        return asyncio.run(_awaited(result, timeout))
    return result


async def _awaited(awaitable: Any, timeout: float | None) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise TimeoutError(f"timed out after {timeout:g}s; cancelled") from None


def _shell_step(
    command: str,
    env: dict[str, str],
    upstream: dict[str, Any],
    cwd: str | None = None,
    timeout: float | None = None,
) -> str:
    """Run the step's ``shell:`` command; its stdout is the step's result."""
    from prefect import get_run_logger

    for step_id, value in upstream.items():
        env[env_name("WF_UPSTREAM_", step_id)] = _env_value(value)
    return run_shell(command, get_run_logger(), env=env, cwd=cwd, timeout=timeout)


def env_name(prefix: str, name: str) -> str:
    return prefix + name.upper().replace("-", "_")


def _env_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_ENV_VALUE]


_PYTHON_TASK: Task[..., Any] = Task(
    _python_step, name="workflow-step", cache_policy=NO_CACHE, persist_result=False, log_prints=True
)
_SHELL_TASK: Task[..., Any] = Task(
    _shell_step, name="workflow-shell-step", cache_policy=NO_CACHE, persist_result=False
)


def step_task(step: Step, layer: int) -> Task[..., Any]:
    """The Prefect task for one step: run name = step id, hooks that carry the step's layer."""
    base = _PYTHON_TASK if step.kind == "python" else _SHELL_TASK
    task = base.with_options(
        **task_hooks(layer),
        name=step.id,
        task_run_name=step.id,
        retries=step.retries,
        retry_delay_seconds=step.retry_delay_seconds,
        # Shell steps enforce their own timeout: they must kill the process, not just stop waiting.
        timeout_seconds=step.timeout_seconds if step.kind == "python" else None,
    )
    return task


# -- the flow --------------------------------------------------------------------------------------
def execute(
    workflow: Workflow, parameters: Mapping[str, Any], run_id: str, base_dir: str | None
) -> dict[str, Any]:
    """Submit every step and wait for all; raise :class:`WorkflowFailed` if any step failed."""
    graph = graph_of(workflow)
    layer = dag.layer_index(graph)
    steps = {step.id: step for step in workflow.steps}
    futures: dict[str, PrefectFuture[Any]] = {}
    for step_id in dag.topological_order(graph):
        step = steps[step_id]
        upstream = {need: futures[need] for need in step.needs}
        wait_for = list(upstream.values())
        task = step_task(step, layer[step_id])
        if step.run is not None:
            futures[step_id] = task.submit(
                target=step.run,
                params=dict(step.params),
                parameters=dict(parameters),
                upstream=upstream,
                base_dir=base_dir,
                timeout=step.timeout_seconds,
                wait_for=wait_for,
            )
        else:
            env = {
                env_name("WF_", k): _env_value(v) for k, v in {**parameters, **step.params}.items()
            }
            env.update(WF_RUN_ID=run_id, WF_STEP_ID=step_id, WF_WORKFLOW_ID=workflow.id)
            futures[step_id] = task.submit(
                command=step.shell,
                env=env,
                upstream=upstream,
                cwd=base_dir,
                timeout=step.timeout_seconds,
                wait_for=wait_for,
            )

    outcome = {step_id: outcome_of(final_state(future)) for step_id, future in futures.items()}
    failed = [s for s in futures if outcome[s] in ("failed", "crashed")]
    if failed:
        skipped = sum(1 for s in outcome.values() if s == "skipped")
        raise WorkflowFailed(
            f"{len(failed)} step(s) failed: {', '.join(failed)}"
            + (f"; {skipped} skipped" if skipped else "")
        )
    return {s: f.result() for s, f in futures.items() if outcome[s] == "completed"}


def outcome_of(state: Any) -> str:
    """A step's outcome from its final state (its events are published by the lifecycle)."""
    if state.is_completed():
        return "completed"
    if state.is_final():
        return str(state.type.value.lower())
    return "skipped"  # Pending('NotReady'): an upstream step did not complete


def final_state(future: PrefectFuture[Any]) -> Any:
    """The state the task engine returned. ``future.state`` alone would ask the Prefect API,
    which may not know the task run (the task-run recorder is a server option) and says Pending."""
    future.wait()
    return future.state


def _resolve(
    definition: dict[str, Any] | str, workflow_dir: str | None
) -> tuple[Workflow, str | None]:
    """The run's workflow. A definition given as a mapping (what ``run_workflow`` and the CLI
    pass) is loaded and validated once per flow run: ``run_start`` (the layers) and the flow body
    share one result. A file path is read each time (the file may change between runs)."""
    if isinstance(definition, str):
        path = Path(definition)
        base_dir = workflow_dir or str(path.resolve().parent)
        return load_workflow(path, base_dir=base_dir), base_dir
    return _load_mapping(json.dumps([definition, workflow_dir], sort_keys=True, default=str))


@functools.lru_cache(maxsize=16)
def _load_mapping(key: str) -> tuple[Workflow, str | None]:
    definition, workflow_dir = json.loads(key)
    return load_workflow(definition, base_dir=workflow_dir), workflow_dir


def _layers_of(flow_run: Any) -> list[list[str]] | None:
    """The layers for ``run_start``, from the run's own parameters."""
    try:
        parameters = flow_run.parameters or {}
        workflow, _ = _resolve(parameters["definition"], parameters.get("workflow_dir"))
        return dag.layers(graph_of(workflow))
    except (KeyError, TypeError, ValueError, WorkflowError):
        return None  # the flow itself reports an invalid definition


def _run_name() -> str:
    """``<workflow id>-<two random words>``, kept if the run was created with such a name."""
    from prefect.runtime import flow_run
    from prefect.utilities.names import generate_slug

    definition = flow_run.parameters.get("definition")
    workflow_id = "workflow"
    if isinstance(definition, Mapping) and isinstance(definition.get("id"), str):
        workflow_id = definition["id"][:64]
    elif isinstance(definition, str):
        workflow_id = Path(definition).stem[:64] or workflow_id
    current = flow_run.name or ""
    if current.startswith(f"{workflow_id}-"):
        return str(current)
    return f"{workflow_id}-{generate_slug(2)}"


def run_workflow_flow(
    definition: dict[str, Any] | str,
    parameters: dict[str, Any] | None = None,
    workflow_dir: str | None = None,
) -> dict[str, Any]:
    """Run a prefect-ws workflow: a DAG of Python and shell steps, streamed live.

    ``definition`` is the workflow (a mapping) or the path of a YAML/JSON file; ``parameters``
    override its defaults; ``workflow_dir`` is where ``run:`` modules are imported from.
    """
    from prefect.runtime import flow_run

    workflow, base_dir = _resolve(definition, workflow_dir)
    values = merge_parameters(workflow, parameters)
    return execute(workflow, values, str(flow_run.id), base_dir)


def make_flow(name: str = FLOW_NAME) -> Flow[..., Any]:
    """The runner flow (named ``name``); its hooks describe the run's layers for ``run_start``."""
    flow: Flow[..., Any] = Flow(
        run_workflow_flow,
        **flow_hooks(layers=_layers_of),
        name=name,
        flow_run_name=_run_name,
        task_runner=ThreadPoolTaskRunner(max_workers=sys.maxsize),  # type: ignore[arg-type]
        persist_result=False,
        # Prefect patches the global builtins.print per task and restores it when the task ends,
        # so with parallel tasks the first to finish would un-patch print() for the others. With
        # the flow patched for the whole run, every restore puts print_as_log back.
        log_prints=True,
    )
    return flow


@functools.cache
def runner_flow() -> Flow[..., Any]:
    """The one runner flow of this process, built on first use.

    Building it installs the engine watch (its hooks do), which patches Prefect's engines for
    every run in the process: a bare ``import prefect_ws`` must not do that.
    """
    return make_flow()


# -- the Python entry point ------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkflowRun:
    """What :func:`run_workflow` returns."""

    run_id: str
    status: str  # completed | failed | cancelled | crashed
    flow_run_name: str
    results: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "completed"


def prepare_run(
    definition: Workflow | Mapping[str, Any] | str | Path,
    parameters: Mapping[str, Any] | None = None,
    base_dir: str | Path | None = None,
) -> tuple[Workflow, dict[str, Any]]:
    """Validate everything (raises :class:`WorkflowError` / ValueError); return flow parameters."""
    if isinstance(definition, str | Path) and base_dir is None:
        base_dir = Path(definition).resolve().parent
    # A Workflow the caller already loaded (``prefect-ws run``) is not validated twice here; the
    # flow run validates what it receives once more, in its own process.
    workflow = (
        definition
        if isinstance(definition, Workflow)
        else load_workflow(definition, base_dir=base_dir)
    )
    values = merge_parameters(workflow, parameters)
    return workflow, {
        "definition": workflow.model_dump(mode="json", exclude_defaults=True),
        "parameters": values,
        "workflow_dir": str(Path(base_dir).resolve()) if base_dir is not None else None,
    }


def run_workflow(
    definition: Workflow | Mapping[str, Any] | str | Path,
    parameters: Mapping[str, Any] | None = None,
    *,
    base_dir: str | Path | None = None,
    on_start: Callable[[str, str], None] | None = None,
) -> WorkflowRun:
    """Validate and run a workflow in this process; the seed's ``Execute(workflowID, workflowDef)``.

    ``definition`` is a :class:`Workflow`, a mapping, or a YAML/JSON file path. Nothing runs and no
    flow run is created if it is invalid (:class:`WorkflowError`) or a parameter is unknown
    (ValueError). ``on_start(run_id, flow_run_name)`` is called once the Prefect flow run exists
    and before any step starts (the run id is the stream's run id).
    """
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.utilities.names import generate_slug

    workflow, flow_parameters = prepare_run(definition, parameters, base_dir)
    flow = make_flow(workflow.id)
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(
            flow, parameters=flow_parameters, name=f"{workflow.id}-{generate_slug(2)}"
        )
    run_id = str(flow_run.id)
    if on_start is not None:
        on_start(run_id, flow_run.name)
    state: Any = run_flow(flow, flow_run=flow_run, parameters=flow_parameters, return_type="state")
    status = state.type.value.lower()
    if state.is_completed():
        return WorkflowRun(run_id, "completed", flow_run.name, results=state.result())
    error = None
    try:
        exc = state.result(raise_on_failure=False)
        error = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else state.message
    except Exception:
        error = state.message
    return WorkflowRun(run_id, status, flow_run.name, error=error)
