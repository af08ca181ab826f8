"""Workflow definitions as pydantic models: what a YAML/JSON file or a Python dict must look like.

The models check each value on its own (types, id syntax, unknown keys, one of ``run``/``shell``).
Checks that need the whole workflow (duplicate ids, unknown ``needs``, cycles, importable targets)
live in :mod:`prefect_ws.workflow.loader`, so every problem can be reported with the step it is in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ID_PATTERN: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
ID_RULE: Final = (
    "use letters, digits, '_' and '-', start with a letter or '_', at most 64 characters"
)
TARGET_PATTERN: Final = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
PARAMETER_PATTERN: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_STEPS: Final = 2000


def check_id(value: str, what: str = "id") -> str:
    """Ids end up in URLs, log lines, task run names and shell environments: keep them plain."""
    if not ID_PATTERN.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}: {ID_RULE}")
    return value


class Step(BaseModel):
    """One node of the DAG: a Python callable (``run``) or a shell command (``shell``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    id: str = Field(description="Unique within the workflow; the Prefect task run name.")
    name: str | None = Field(default=None, max_length=200, description="Free-text label.")
    run: str | None = Field(
        default=None, max_length=500, description='A Python callable, "package.module:function".'
    )
    shell: str | None = Field(
        default=None, min_length=1, max_length=100_000, description="A command run by /bin/sh."
    )
    needs: list[str] = Field(default_factory=list, max_length=MAX_STEPS)
    params: dict[str, Any] = Field(default_factory=dict)
    retries: int = Field(default=0, ge=0, le=100)
    retry_delay_seconds: float = Field(default=0.0, ge=0, le=86_400)
    timeout_seconds: float | None = Field(default=None, gt=0, le=7 * 86_400)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return check_id(value, "step id")

    @field_validator("needs")
    @classmethod
    def _needs(cls, value: list[str]) -> list[str]:
        for need in value:
            check_id(need, "step id in needs")
        if len(set(value)) != len(value):
            duplicates = sorted({n for n in value if value.count(n) > 1})
            raise ValueError(f"needs lists {', '.join(map(repr, duplicates))} more than once")
        return value

    @field_validator("run")
    @classmethod
    def _run(cls, value: str | None) -> str | None:
        if value is not None and not TARGET_PATTERN.fullmatch(value):
            raise ValueError(f"invalid run target {value!r}: expected 'package.module:function'")
        return value

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not PARAMETER_PATTERN.fullmatch(key):
                raise ValueError(f"invalid param name {key!r}: expected a Python identifier")
        return value

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        if (self.run is None) == (self.shell is None):
            raise ValueError("give exactly one of 'run' (a Python callable) or 'shell' (a command)")
        return self

    @property
    def kind(self) -> str:
        return "python" if self.run is not None else "shell"


class Workflow(BaseModel):
    """A workflow: default parameters and a DAG of steps (``needs`` are the edges)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    name: str | None = Field(default=None, max_length=200)
    description: str | None = Field(default=None, max_length=10_000)
    parameters: dict[str, Any] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return check_id(value, "workflow id")

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not PARAMETER_PATTERN.fullmatch(key):
                raise ValueError(f"invalid parameter name {key!r}: expected a Python identifier")
        return value

    @property
    def title(self) -> str:
        return self.name or self.id

    def step(self, step_id: str) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a definition: where (``step``, or None for the workflow) and what."""

    step: str | None
    message: str

    def render(self, source: str) -> str:
        where = f" {self.step}:" if self.step else ""
        return f"{source}:{where} {self.message}"


class WorkflowError(ValueError):
    """A definition that must not run. ``str()`` is one line per problem, each naming its source."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.render(source) for p in problems))
