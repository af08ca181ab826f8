"""Workflow validation: every problem is caught before anything runs, named with file and step.

Fast tests (no flow runs): loading, each validation error, bad input at the ``prefect-ws run``
entry point, the DAG maths. One test checks against the real Prefect API that invalid input
creates no flow run.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prefect_ws.cli.main import app
from prefect_ws.workflow import Workflow, WorkflowError, dag, load_workflow, parse_param_assignments
from prefect_ws.workflow.loader import MAX_FILE_BYTES

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

GOOD_STEP_MODULE = """
def extract(rows: int = 3):
    return list(range(rows))

def total(extract):
    return sum(extract)

def needs_x(x):
    return x

NOT_CALLABLE = 42
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A workflow folder with its own step module (imported from the folder, like examples/)."""
    module = f"wfsteps_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(GOOD_STEP_MODULE)
    (tmp_path / "module_name").write_text(module)
    return tmp_path


def _module(folder: Path) -> str:
    return (folder / "module_name").read_text()


def _write(folder: Path, text: str, name: str = "wf.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def _errors(path: Path) -> list[str]:
    with pytest.raises(WorkflowError) as caught:
        load_workflow(path)
    lines = str(caught.value).splitlines()
    assert lines and all(line.startswith(f"{path}:") for line in lines), lines
    return lines


def _workflow_yaml(folder: Path, steps: str, extra: str = "") -> str:
    return f"id: wf\n{extra}steps:\n{steps}".replace("MOD", _module(folder))


# -- valid definitions ---------------------------------------------------------------------------
def test_the_examples_are_valid_and_layered() -> None:
    diamond = load_workflow(EXAMPLES / "diamond.yaml")
    assert diamond.id == "diamond-etl" and diamond.parameters == {
        "rows": 100,
        "target": "warehouse.summary",
    }
    assert dag.layers({s.id: s.needs for s in diamond.steps}) == [
        ["extract"],
        ["transform_sum", "transform_max"],
        ["load"],
    ]
    failing = load_workflow(EXAMPLES / "failing.yaml")
    assert dag.layers({s.id: s.needs for s in failing.steps}) == [
        ["extract"],
        ["validate", "archive"],
        ["report"],
        ["publish"],
    ]
    shell = load_workflow(EXAMPLES / "shell.yaml")
    assert [s.kind for s in shell.steps] == ["shell", "shell", "shell"]
    assert shell.step("count").timeout_seconds == 30


def test_json_file_and_python_objects_load_the_same(folder: Path) -> None:
    mod = _module(folder)
    data = {
        "id": "wf",
        "parameters": {"rows": 2},
        "steps": [
            {"id": "extract", "run": f"{mod}:extract"},
            {"id": "total", "run": f"{mod}:total", "needs": ["extract"], "retries": 2},
        ],
    }
    from_json = load_workflow(_write(folder, json.dumps(data), "wf.json"))
    from_dict = load_workflow(data, base_dir=folder)
    from_model = load_workflow(Workflow.model_validate(data), base_dir=folder)
    assert from_json == from_dict == from_model
    assert from_dict.step("total").retries == 2 and from_dict.step("total").needs == ["extract"]


# -- each validation error, one test each ---------------------------------------------------------
def test_unknown_needs(folder: Path) -> None:
    path = _write(
        folder, _workflow_yaml(folder, "  - id: a\n    shell: 'true'\n    needs: [ghost]\n")
    )
    assert _errors(path) == [f"{path}: step 'a': needs unknown step 'ghost'"]


def test_cycle_prints_its_path(folder: Path) -> None:
    steps = (
        "  - {id: start, shell: 'true'}\n"
        "  - {id: a, shell: 'true', needs: [start, c]}\n"
        "  - {id: b, shell: 'true', needs: [a]}\n"
        "  - {id: c, shell: 'true', needs: [b]}\n"
    )
    path = _write(folder, _workflow_yaml(folder, steps))
    assert _errors(path) == [f"{path}: step 'a': dependency cycle: a -> c -> b -> a"]


def test_duplicate_ids(folder: Path) -> None:
    steps = "  - {id: a, shell: 'true'}\n  - {id: b, shell: 'true'}\n  - {id: a, shell: 'false'}\n"
    path = _write(folder, _workflow_yaml(folder, steps))
    assert _errors(path) == [f"{path}: step 'a': duplicate step id"]


@pytest.mark.parametrize(
    "bad_id",
    ["my step", "a;rm -rf /", "$(whoami)", "a|b", "../etc", "", "9lives", "x" * 65, "é", "a\n"],
)
def test_malformed_step_ids(folder: Path, bad_id: str) -> None:
    path = _write(
        folder, _workflow_yaml(folder, f"  - id: {json.dumps(bad_id)}\n    shell: 'true'\n")
    )
    (line,) = _errors(path)
    assert "invalid step id" in line and "use letters, digits" in line
    assert line.startswith(f"{path}: steps[0]:") or line.startswith(f"{path}: step ")


def test_self_need(folder: Path) -> None:
    path = _write(folder, _workflow_yaml(folder, "  - {id: a, shell: 'true', needs: [a]}\n"))
    assert _errors(path) == [f"{path}: step 'a': needs itself"]


def test_missing_callable_module(folder: Path) -> None:
    path = _write(folder, _workflow_yaml(folder, "  - {id: a, run: 'no_such_module_xyz:main'}\n"))
    assert _errors(path) == [
        f"{path}: step 'a': cannot import 'no_such_module_xyz:main': "
        "no module named 'no_such_module_xyz'"
    ]


def test_missing_function_and_not_callable(folder: Path) -> None:
    steps = "  - {id: a, run: 'MOD:nope'}\n  - {id: b, run: 'MOD:NOT_CALLABLE'}\n"
    path = _write(folder, _workflow_yaml(folder, steps))
    mod = _module(folder)
    assert _errors(path) == [
        f"{path}: step 'a': cannot import '{mod}:nope': '{mod}' has no 'nope'",
        f"{path}: step 'b': run target '{mod}:NOT_CALLABLE' is a int, not a callable",
    ]


def test_module_that_raises_on_import(folder: Path) -> None:
    (folder / "explodes_on_import.py").write_text("raise RuntimeError('boom at import')\n")
    path = _write(folder, _workflow_yaml(folder, "  - {id: a, run: 'explodes_on_import:f'}\n"))
    assert _errors(path) == [
        f"{path}: step 'a': cannot import 'explodes_on_import:f': RuntimeError: boom at import"
    ]


def test_callable_that_cannot_be_called_with_what_it_gets(folder: Path) -> None:
    steps = (
        "  - {id: a, run: 'MOD:needs_x'}\n  - {id: b, run: 'MOD:extract', params: {colour: red}}\n"
    )
    path = _write(folder, _workflow_yaml(folder, steps))
    lines = _errors(path)
    assert lines[0].startswith(f"{path}: step 'a': ") and "needs argument 'x'" in lines[0]
    assert (
        lines[1] == f"{path}: step 'b': {_module(folder)}:extract does not accept param(s) 'colour'"
    )


def test_malformed_run_target(folder: Path) -> None:
    path = _write(folder, _workflow_yaml(folder, "  - {id: a, run: 'os.system(\"id\")'}\n"))
    (line,) = _errors(path)
    assert line.startswith(f"{path}: step 'a': run: invalid run target")


def test_unknown_keys(folder: Path) -> None:
    path = _write(
        folder, _workflow_yaml(folder, "  - {id: a, shell: 'true', need: [b]}\n", "colour: red\n")
    )
    assert sorted(_errors(path)) == [
        f"{path}: step 'a': unknown key 'need'",
        f"{path}: unknown key 'colour'",
    ]


def test_wrong_types(folder: Path) -> None:
    steps = (
        "  - {id: a, shell: 'true', retries: many}\n"
        "  - {id: b, shell: 'true', needs: b-and-c}\n"
        "  - {id: c, shell: 'true', timeout_seconds: -1}\n"
    )
    lines = _errors(_write(folder, _workflow_yaml(folder, steps, "parameters: [1, 2]\n")))
    assert len(lines) == 4
    assert "parameters': input should be a valid dictionary" in lines[0]
    assert (
        "step 'a': key 'retries': input should be a valid integer" in lines[1]
        and "'many'" in lines[1]
    )
    assert "step 'b': key 'needs': input should be a valid list" in lines[2]
    assert "step 'c': key 'timeout_seconds': input should be greater than 0" in lines[3]


def test_run_and_shell_exactly_one(folder: Path) -> None:
    steps = "  - {id: a}\n  - {id: b, shell: 'true', run: 'MOD:extract'}\n"
    lines = _errors(_write(folder, _workflow_yaml(folder, steps)))
    assert [line.split(": ", 1)[1] for line in lines] == [
        "step 'a': give exactly one of 'run' (a Python callable) or 'shell' (a command)",
        "step 'b': give exactly one of 'run' (a Python callable) or 'shell' (a command)",
    ]


def test_missing_required_keys(folder: Path) -> None:
    lines = _errors(_write(folder, "name: no id and no steps\n"))
    assert [line.split(": ", 1)[1] for line in lines] == [
        "missing required key 'id'",
        "missing required key 'steps'",
    ]


def test_empty_steps_and_non_mapping(folder: Path) -> None:
    assert "steps" in _errors(_write(folder, "id: wf\nsteps: []\n"))[0]
    assert _errors(_write(folder, "- just\n- a list\n"))[0].endswith("got list")
    assert _errors(_write(folder, ""))[0].endswith("got empty")


# -- bad input -----------------------------------------------------------------------------------
def test_malformed_yaml_names_line_and_column(folder: Path) -> None:
    path = _write(folder, "id: wf\nsteps:\n  - id: a\n    shell: 'true\n")
    (line,) = _errors(path)
    assert line.startswith(f"{path}: malformed YAML: line ")


def test_malformed_json(folder: Path) -> None:
    path = _write(folder, '{"id": "wf", "steps": [}', "wf.json")
    assert _errors(path) == [f"{path}: malformed JSON: line 1, column 24: Expecting value"]


def test_ten_megabyte_file_is_refused_unread(folder: Path) -> None:
    path = folder / "huge.yaml"
    with path.open("wb") as handle:
        handle.write(b"id: wf\nsteps:\n")
        handle.write(b"#" * (10 * 1024 * 1024))
    assert _errors(path) == [
        f"{path}: file too large: {path.stat().st_size} bytes (limit {MAX_FILE_BYTES} bytes)"
    ]


def test_yaml_alias_bomb_and_tags_are_refused(folder: Path) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    assert "YAML aliases (*a) are not supported" in _errors(_write(folder, bomb))[0]
    (line,) = _errors(_write(folder, "id: !!python/object/apply:os.system ['id']\nsteps: []\n"))
    assert "malformed YAML" in line and "python/object/apply" in line


def test_binary_and_deeply_nested_input(folder: Path) -> None:
    binary = folder / "binary.yaml"
    binary.write_bytes(b"id: wf\n\xff\xfe\x00")
    assert _errors(binary) == [f"{binary}: not UTF-8 text (byte 7: 0xff)"]
    deep = _write(folder, "[" * 100_000 + "]" * 100_000, "deep.json")
    (line,) = _errors(deep)
    assert "nested too deeply" in line or "malformed JSON" in line


def test_missing_file_and_directory(folder: Path) -> None:
    assert _errors(folder / "nope.yaml") == [f"{folder / 'nope.yaml'}: no such file"]
    assert _errors(folder) == [f"{folder}: not a regular file"]


def test_param_assignments_are_typed_like_the_defaults() -> None:
    workflow = Workflow.model_validate(
        {
            "id": "wf",
            "parameters": {
                "rows": 1,
                "ratio": 0.5,
                "name": "x",
                "flag": False,
                "tags": [],
                "any": None,
            },
            "steps": [{"id": "a", "shell": "true"}],
        }
    )
    assert parse_param_assignments(
        ["rows=5", "ratio=2", "name=42", "flag=true", 'tags=["a"]', "any=plain text"], workflow
    ) == {"rows": 5, "ratio": 2.0, "name": "42", "flag": True, "tags": ["a"], "any": "plain text"}
    with pytest.raises(ValueError) as caught:
        parse_param_assignments(
            ["rows=abc", "flag=1", "nope=1", "justtext", "=1", "bad name=1"], workflow
        )
    assert str(caught.value).splitlines() == [
        "invalid --param rows: 'abc' is not an integer (the default is 1)",
        "invalid --param flag: '1' is not a boolean (true/false) (the default is False)",
        "unknown parameter 'nope' (this workflow's parameters: rows, ratio, name, flag, tags, any)",
        "invalid --param 'justtext': expected key=value",
        "invalid --param '=1': expected key=value",
        "invalid --param name 'bad name': expected a Python identifier",
    ]


@pytest.mark.parametrize(
    ("content", "args", "expected"),
    [
        ("id: wf\nsteps: [\n", [], "malformed YAML"),
        ("id: wf\nsteps:\n  - {id: 'a b', shell: 'true'}\n", [], "invalid step id 'a b'"),
        ("id: wf\nsteps:\n  - {id: 'a;ls', shell: 'true'}\n", [], "invalid step id 'a;ls'"),
        ("id: wf\nsteps:\n  - {id: a, shell: 'true', needs: [a]}\n", [], "step 'a': needs itself"),
        (
            "id: wf\nsteps:\n  - {id: a, run: 'nowhere_mod:f'}\n",
            [],
            "no module named 'nowhere_mod'",
        ),
        (
            "id: wf\nparameters: {rows: 1}\nsteps:\n  - {id: a, shell: 'true'}\n",
            ["--param", "rows=ten"],
            "invalid --param rows: 'ten' is not an integer",
        ),
        (
            "id: wf\nparameters: {rows: 1}\nsteps:\n  - {id: a, shell: 'true'}\n",
            ["--param", "rows"],
            "invalid --param 'rows': expected key=value",
        ),
    ],
)
def test_cli_bad_input_is_one_clear_line_and_exit_2(
    folder: Path, content: str, args: list[str], expected: str
) -> None:
    path = _write(folder, content)
    result = CliRunner().invoke(app, ["run", str(path), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prefect-ws: ") and expected in lines[0], lines
    assert "run id" not in result.output


def test_cli_bad_input_creates_no_flow_run(prefect_api: str, folder: Path) -> None:
    """Through the installed command, in a fresh process: exit 2, one line, no flow run."""
    from prefect.client.orchestration import get_client

    def flow_run_count() -> int:
        with get_client(sync_client=True) as client:
            return client.count_flow_runs()

    before = flow_run_count()
    cases = [
        (_write(folder, "id: wf\nsteps:\n  - {id: a, shell: 'true'}\n  - {id: a\n", "m.yaml"), []),
        (_write(folder, "id: wf\nsteps:\n  - {id: a, run: 'gone_mod:f'}\n", "u.yaml"), []),
        (EXAMPLES / "diamond.yaml", ["--param", "rows=[1"]),
    ]
    command = [sys.executable, "-c", "from prefect_ws.cli.main import main; main()", "run"]
    for path, args in cases:
        done = subprocess.run(
            [*command, str(path), *args], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith("prefect-ws: ")
    assert flow_run_count() == before


# -- the DAG maths -------------------------------------------------------------------------------
def test_layers_and_topological_order() -> None:
    graph = {"load": ["t1", "t2"], "t1": ["extract"], "extract": [], "t2": ["extract"], "solo": []}
    assert dag.layers(graph) == [["extract", "solo"], ["t1", "t2"], ["load"]]
    assert dag.topological_order(graph) == ["extract", "t1", "t2", "load", "solo"]
    assert dag.descendants(graph, "t1") == {"load"}
    assert dag.find_cycle(graph) is None


def test_a_long_chain_and_a_big_cycle_need_no_recursion() -> None:
    chain = {f"s{i}": ([f"s{i - 1}"] if i else []) for i in range(5000)}
    assert len(dag.layers(chain)) == 5000
    cyclic = {**chain, "s0": ["s4999"]}
    cycle = dag.find_cycle(cyclic)
    assert cycle is not None and cycle[0] == cycle[-1] and len(cycle) == 5001


def test_random_dags_layer_by_longest_path() -> None:
    rng = random.Random(7)
    for _ in range(20):
        names = [f"n{i}" for i in range(60)]
        graph = {n: rng.sample(names[:i], k=min(i, rng.randint(0, 3))) for i, n in enumerate(names)}
        rng.shuffle(names)
        graph = {n: graph[n] for n in names}  # definition order is not topological
        index = {s: i for i, layer in enumerate(dag.layers(graph)) for s in layer}
        for step, needs in graph.items():
            assert index[step] == (1 + max(index[n] for n in needs) if needs else 0)
        order = dag.topological_order(graph)
        assert all(order.index(n) < order.index(s) for s in graph for n in graph[s])
