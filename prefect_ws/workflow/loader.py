"""Load and validate a workflow before anything runs.

Every problem is reported as ``<file>: <step>: <problem>`` (one line each) through
:class:`~prefect_ws.workflow.model.WorkflowError`: syntax, size, unknown keys, wrong types, bad
ids, duplicate ids, unknown or self ``needs``, cycles (with their path) and ``run:`` targets that
cannot be imported or called with what the workflow gives them. Nothing here touches Prefect, so
an invalid workflow never creates a flow run.

``run:`` targets are imported with the workflow file's folder first on ``sys.path`` (for
definitions given as Python objects: the ``base_dir`` argument, else ``sys.path`` as it is).
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import ValidationError

from prefect_ws.workflow import dag
from prefect_ws.workflow.model import (
    PARAMETER_PATTERN,
    Problem,
    Step,
    Workflow,
    WorkflowError,
)

MAX_FILE_BYTES: Final = 1 << 20  # 1 MiB: a 2000-step workflow is ~200 KB
# Names a step's callable may ask for besides its params (see docs/workflows.md).
UPSTREAM_ARG: Final = "upstream"
PARAMETERS_ARG: Final = "parameters"


# The C loader composes nodes in C (compose_node is never called), so aliases are caught on the
# pure-Python SafeLoader; files are at most 1 MiB, which it parses in well under a second.
class _SafeNoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(
                f"line {event.start_mark.line + 1}, column {event.start_mark.column + 1}: "
                f"YAML aliases (*{event.anchor}) are not supported"
            )
        return super().compose_node(parent, index)


def read_definition(path: str | Path) -> Any:
    """Parse a YAML or JSON file into plain data; :class:`WorkflowError` says why it cannot be."""
    path = Path(path)
    source = str(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise WorkflowError(source, [Problem(None, "not a regular file")])
    except FileNotFoundError:
        raise WorkflowError(source, [Problem(None, "no such file")]) from None
    except OSError as exc:
        raise WorkflowError(source, [Problem(None, f"cannot read: {exc.strerror}")]) from None
    if size > MAX_FILE_BYTES:
        raise WorkflowError(
            source,
            [Problem(None, f"file too large: {size} bytes (limit {MAX_FILE_BYTES} bytes)")],
        )
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise WorkflowError(source, [Problem(None, f"cannot read: {exc.strerror}")]) from None
    if len(raw) > MAX_FILE_BYTES:  # grew while we looked, or a device file
        raise WorkflowError(
            source, [Problem(None, f"file too large (limit {MAX_FILE_BYTES} bytes)")]
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WorkflowError(
            source, [Problem(None, f"not UTF-8 text (byte {exc.start}: {raw[exc.start]:#04x})")]
        ) from None
    return parse_definition(text, source, json_only=path.suffix.lower() == ".json")


def parse_definition(text: str, source: str = "<workflow>", json_only: bool = False) -> Any:
    """YAML (a superset of JSON) or, for ``.json`` files, strict JSON."""
    try:
        if json_only:
            return json.loads(text)
        return yaml.load(text, Loader=_SafeNoAliasLoader)
    except json.JSONDecodeError as exc:
        problem = f"malformed JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}"
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = f"malformed YAML: {where}{exc.problem or exc.context}"
    except yaml.YAMLError as exc:
        problem = f"malformed YAML: {exc}"
    except RecursionError:
        problem = "malformed definition: nested too deeply"
    raise WorkflowError(source, [Problem(None, problem)])


def load_workflow(
    definition: Workflow | Mapping[str, Any] | str | Path,
    *,
    base_dir: str | Path | None = None,
    source: str | None = None,
    check_targets: bool = True,
) -> Workflow:
    """A validated :class:`Workflow` from a file path, a dict or a model, or :class:`WorkflowError`.

    For a file, ``base_dir`` defaults to the file's folder (where its ``run:`` modules live).
    """
    if isinstance(definition, str | Path):
        path = Path(definition)
        source = source or str(path)
        data = read_definition(path)
        base_dir = base_dir if base_dir is not None else path.resolve().parent
    elif isinstance(definition, Workflow):
        data, source = definition, source or f"workflow {definition.id!r}"
    elif isinstance(definition, Mapping):
        data, source = definition, source or "<workflow definition>"
    else:
        raise WorkflowError(
            source or "<workflow definition>",
            [Problem(None, f"expected a mapping, got {type(definition).__name__}")],
        )
    workflow = _model(data, source)
    problems = graph_problems(workflow)
    if not problems and check_targets:
        problems = target_problems(workflow, base_dir)
    if problems:
        raise WorkflowError(source, problems)
    return workflow


def _model(data: Any, source: str) -> Workflow:
    if isinstance(data, Workflow):
        return data
    if not isinstance(data, Mapping):
        kind = "empty" if data is None else type(data).__name__
        raise WorkflowError(
            source,
            [Problem(None, f"expected a mapping with 'id' and 'steps' at the top, got {kind}")],
        )
    try:
        return Workflow.model_validate(dict(data))
    except ValidationError as exc:
        raise WorkflowError(source, [_problem(error, data) for error in exc.errors()]) from None
    except RecursionError:
        raise WorkflowError(source, [Problem(None, "nested too deeply")]) from None


def _problem(error: Any, data: Mapping[str, Any]) -> Problem:
    """Turn one pydantic error into a sentence that names the step and the key."""
    loc = list(error["loc"])
    step: str | None = None
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        raw_steps = data.get("steps")
        raw = raw_steps[loc[1]] if isinstance(raw_steps, list) and loc[1] < len(raw_steps) else None
        raw_id = raw.get("id") if isinstance(raw, Mapping) else None
        ok_id = (
            isinstance(raw_id, str) and bool(raw_id) and len(raw_id) <= 64 and raw_id.isprintable()
        )
        step = f"step {raw_id!r}" if ok_id else f"steps[{loc[1]}]"
        loc = loc[2:]
    field = ".".join(str(part) for part in loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        return Problem(step, f"unknown key {field.rsplit('.', 1)[-1]!r}")
    if kind == "missing":
        return Problem(step, f"missing required key {field!r}")
    if kind == "value_error":
        message = str(error.get("ctx", {}).get("error", error["msg"]))
        return Problem(step, message if not field else f"{field}: {message}")
    value = error.get("input")
    shown = (
        repr(value)
        if isinstance(value, str | int | float | bool) or value is None
        else type(value).__name__
    )
    if len(shown) > 60:
        shown = shown[:57] + "..."
    label = f"key {field!r}" if field else "value"
    return Problem(step, f"{label}: {error['msg'][0].lower()}{error['msg'][1:]} (got {shown})")


def graph_problems(workflow: Workflow) -> list[Problem]:
    """Duplicate ids, unknown needs, self-needs and cycles."""
    problems: list[Problem] = []
    seen: set[str] = set()
    for step in workflow.steps:
        if step.id in seen:
            problems.append(Problem(f"step {step.id!r}", "duplicate step id"))
        seen.add(step.id)
    for step in workflow.steps:
        for need in step.needs:
            if need == step.id:
                problems.append(Problem(f"step {step.id!r}", "needs itself"))
            elif need not in seen:
                problems.append(Problem(f"step {step.id!r}", f"needs unknown step {need!r}"))
    if problems:
        return problems
    cycle = dag.find_cycle(graph_of(workflow))
    if cycle:
        return [Problem(f"step {cycle[0]!r}", f"dependency cycle: {' -> '.join(cycle)}")]
    return []


def graph_of(workflow: Workflow) -> dict[str, list[str]]:
    return {step.id: list(step.needs) for step in workflow.steps}


# -- run: targets --------------------------------------------------------------------------------
def add_to_path(base_dir: str | Path | None) -> None:
    """Put a workflow's folder first on ``sys.path`` (once) so its ``run:`` modules import."""
    if base_dir is None:
        return
    folder = str(Path(base_dir).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
        importlib.invalidate_caches()


def resolve_target(target: str, base_dir: str | Path | None = None) -> Callable[..., Any]:
    """Import ``package.module:function``; ImportError/AttributeError/TypeError say why not."""
    add_to_path(base_dir)
    module_name, _, attribute = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ImportError(f"cannot import {target!r}: no module named {exc.name!r}") from None
        raise ImportError(f"cannot import {target!r}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # the module itself raised while importing
        raise ImportError(f"cannot import {target!r}: {type(exc).__name__}: {exc}") from None
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(
                f"cannot import {target!r}: {module_name!r} has no {part!r}"
            ) from None
    if not callable(obj):
        raise TypeError(f"run target {target!r} is a {type(obj).__name__}, not a callable")
    fn: Callable[..., Any] = obj
    return fn


def call_problem(fn: Callable[..., Any], step: Step, workflow: Workflow) -> str | None:
    """Why ``fn`` cannot be called with what the workflow will give it (None when it can)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # builtins without a signature: find out at run time
    given = {*step.params, *step.needs, UPSTREAM_ARG, PARAMETERS_ARG, *workflow.parameters}
    accepts_any = False
    names = set()
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.VAR_KEYWORD:
            accepts_any = True
            continue
        if parameter.kind is parameter.VAR_POSITIONAL:
            continue
        names.add(parameter.name)
        required = parameter.default is parameter.empty
        if parameter.kind is parameter.POSITIONAL_ONLY and required:
            return f"{step.run} takes positional-only argument {parameter.name!r}"
        if required and parameter.name not in given:
            return (
                f"{step.run} needs argument {parameter.name!r}: set it in the step's params, "
                "a workflow parameter, or an upstream step of that id"
            )
    unknown = sorted(set(step.params) - names)
    if unknown and not accepts_any:
        return f"{step.run} does not accept param(s) {', '.join(map(repr, unknown))}"
    return None


def target_problems(workflow: Workflow, base_dir: str | Path | None) -> list[Problem]:
    problems: list[Problem] = []
    for step in workflow.steps:
        if step.run is None:
            continue
        try:
            fn = resolve_target(step.run, base_dir)
        except (ImportError, AttributeError, TypeError) as exc:
            problems.append(Problem(f"step {step.id!r}", str(exc)))
            continue
        problem = call_problem(fn, step, workflow)
        if problem:
            problems.append(Problem(f"step {step.id!r}", problem))
    return problems


# -- parameters ------------------------------------------------------------------------------------
def parse_param_assignments(assignments: list[str], workflow: Workflow) -> dict[str, Any]:
    """``["rows=10", "name=x"]`` -> ``{"rows": 10, "name": "x"}``, typed like the defaults.

    A value is read as JSON when the default is not a string (``rows=10`` is an int, ``tags=["a"]``
    a list), and kept as text when it is. Unknown names and values of the wrong type are errors.
    """
    values: dict[str, Any] = {}
    problems: list[str] = []
    for item in assignments:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            problems.append(f"invalid --param {item[:80]!r}: expected key=value")
            continue
        if not PARAMETER_PATTERN.fullmatch(name):
            problems.append(f"invalid --param name {name[:80]!r}: expected a Python identifier")
            continue
        if name not in workflow.parameters:
            known = ", ".join(workflow.parameters) or "none"
            problems.append(f"unknown parameter {name!r} (this workflow's parameters: {known})")
            continue
        try:
            values[name] = _typed_value(raw, workflow.parameters[name])
        except ValueError as exc:
            problems.append(f"invalid --param {name}: {exc}")
    if problems:
        raise ValueError("\n".join(problems))
    return values


def _typed_value(raw: str, default: Any) -> Any:
    if isinstance(default, str):
        return raw
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        if default is None:
            return raw
        raise ValueError(
            f"{raw[:80]!r} is not {_kind(default)} (the default is {default!r})"
        ) from None
    if default is None:
        return value
    expected: tuple[type, ...] = (int, float) if isinstance(default, float) else (type(default),)
    if isinstance(value, bool) and not isinstance(default, bool):
        expected = ()
    if not isinstance(value, expected):
        raise ValueError(f"{raw[:80]!r} is not {_kind(default)} (the default is {default!r})")
    return float(value) if isinstance(default, float) and isinstance(value, int) else value


def _kind(default: Any) -> str:
    names = {
        bool: "a boolean (true/false)",
        int: "an integer",
        float: "a number",
        list: "a JSON list",
        dict: "a JSON object",
    }
    return names.get(type(default), f"a {type(default).__name__}")


def merge_parameters(workflow: Workflow, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults overlaid with ``overrides``; unknown names are an error, not silently ignored."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(workflow.parameters))
    if unknown:
        known = ", ".join(workflow.parameters) or "none"
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} "
            f"(this workflow's parameters: {known})"
        )
    return {**workflow.parameters, **overrides}
