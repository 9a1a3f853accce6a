"""The test suite's own rules: each test's markers match what it does (helpers.markers), shared code lives in
the helpers package, no test file imports another, docstrings describe behaviour, and the README's test
commands work as printed: its pytest is this environment's, and every tier selects tests."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import tomllib
from helpers import REPO, child_env
from helpers.markers import MARKED_WALL_S, UNMARKED_CPU_S, Usage, marker_errors

TESTS = REPO / "tests"

# ----------------------------------------------------------------------------------------------
# Markers


def errors_for(marked: set[str], *commands: str, cpu_s: float = 0.5, wall_s: float = 5.0) -> str:
    return "; ".join(marker_errors(marked, Usage(list(commands), wall_s=wall_s, cpu_s=cpu_s)))


def test_a_test_that_starts_a_process_must_be_marked_e2e_and_only_then() -> None:
    assert "not marked @pytest.mark.e2e" in errors_for(set(), "python train.py --i 1")
    assert "not marked @pytest.mark.e2e" in errors_for(set(), "os.fork")
    assert errors_for({"e2e"}, "python train.py --i 1") == ""
    assert "marked @pytest.mark.e2e but never starts processes" in errors_for({"e2e"})
    assert errors_for(set()) == ""


def test_slurm_and_the_gpu_check_rehearsal_have_markers_of_their_own() -> None:
    for command in ("bash scripts/ci/local_slurm.sh start", "/usr/bin/sbatch job.sh", "squeue --me"):
        assert "not marked @pytest.mark.slurm" in errors_for({"e2e"}, command), command
        assert errors_for({"e2e", "slurm"}, command) == ""
    assert "marked @pytest.mark.slurm but never starts Slurm" in errors_for({"e2e", "slurm"}, "bash run.sh")
    assert "not marked @pytest.mark.rehearsal" in errors_for({"e2e"}, "bash /repo/scripts/gpu_check.sh")
    assert errors_for({"e2e", "rehearsal"}, "bash /repo/scripts/gpu_check.sh") == ""
    assert "marked @pytest.mark.rehearsal but never" in errors_for({"rehearsal"})


def test_slow_is_judged_by_cpu_time_when_missing_and_by_wall_time_when_given() -> None:
    assert "not marked @pytest.mark.slow" in errors_for(set(), cpu_s=UNMARKED_CPU_S + 1)
    assert errors_for(set(), cpu_s=UNMARKED_CPU_S - 1, wall_s=60) == ""  # a wait, not work: no marker needed
    assert errors_for({"slow"}, cpu_s=0.1, wall_s=MARKED_WALL_S + 1) == ""
    assert "marked @pytest.mark.slow but took" in errors_for({"slow"}, cpu_s=0.1, wall_s=MARKED_WALL_S - 1)


CHECKED = """
import subprocess

import pytest


@pytest.fixture(scope="module")
def shared_run():
    subprocess.run(["true"], check=True)
    return "done"


def test_starts_a_process_unmarked():
    subprocess.run(["true"], check=True)


@pytest.mark.e2e
def test_marked_and_starts_nothing():
    pass


@pytest.mark.e2e
def test_marked_and_starts_one():
    subprocess.run(["true"], check=True)


@pytest.mark.e2e
def test_first_user_of_the_shared_run(shared_run):
    assert shared_run == "done"


def test_later_user_of_the_shared_run_unmarked(shared_run):
    assert shared_run == "done"


def test_in_process():
    assert 1 + 1 == 2
"""


@pytest.mark.e2e  # the checked tests below start `true`
def test_a_wrong_marker_fails_the_test_in_a_real_session(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_checked=CHECKED)
    pytester.makeini("[pytest]\nmarkers =\n    e2e: starts a process\n")
    result = pytester.runpytest_inprocess("-p", "helpers.markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=3)
    failed = {line.split("::")[1].split(" ")[0] for line in result.outlines if line.startswith("FAILED")}
    assert failed == {
        "test_starts_a_process_unmarked",
        "test_marked_and_starts_nothing",
        "test_later_user_of_the_shared_run_unmarked",  # the shared fixture's process counts for every user
    }, result.outlines
    result.stdout.fnmatch_lines(["*test_starts_a_process_unmarked: wrong markers: it starts processes*true*"])


# ----------------------------------------------------------------------------------------------
# Test code as code


def suite_files() -> list[Path]:
    """Every test file."""
    return sorted(TESTS.glob("test_*.py"))


def test_no_test_file_imports_another_test_file_or_conftest() -> None:
    found = []
    for path in suite_files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            found += [f"{path.name}: import {name}" for name in names if name.startswith(("test_", "conftest"))]
    assert not found, "shared code belongs in tests/helpers:\n" + "\n".join(found)


def test_conftest_holds_only_fixtures_and_hooks() -> None:
    others = []
    for node in ast.parse((TESTS / "conftest.py").read_text()).body:
        if isinstance(node, ast.ClassDef):
            others.append(f"class {node.name}")
        elif isinstance(node, ast.FunctionDef):
            fixture = any("fixture" in ast.unparse(decorator) for decorator in node.decorator_list)
            if not (fixture or node.name.startswith("pytest_")):
                others.append(f"def {node.name}")
    assert not others, f"conftest.py should hold fixtures and hooks only; move these to tests/helpers: {others}"


def test_docstrings_and_comments_say_the_behaviour_not_the_request() -> None:
    request = re.compile(r"\bissues? \d+|^#\s*\d+(\.\d+)*( and \d+(\.\d+)*)*:", re.I)
    found = []
    for path in [*suite_files(), *sorted((TESTS / "helpers").glob("*.py")), TESTS / "conftest.py"]:
        tree = ast.parse(path.read_text())
        texts = [ast.get_docstring(node) or "" for node in ast.walk(tree) if isinstance(node, DOCUMENTED)]
        texts += [line.strip() for line in path.read_text().splitlines() if line.strip().startswith("#")]
        found += [f"{path.name}: {text.splitlines()[0][:100]}" for text in texts if request.search(text)]
    assert not found, "say what is tested, not which issue asked for it:\n" + "\n".join(found)


DOCUMENTED = (ast.Module, ast.FunctionDef, ast.ClassDef)


# ----------------------------------------------------------------------------------------------
# The README's test commands


def readme_test_commands() -> list[list[str]]:
    """The pytest commands of the README's Testing section (run after ``source scripts/env.sh``), as argv."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Testing") :]
    section = section[: section.index("\n## ", 3)]
    commands = [shlex.split(line, comments=True) for line in re.findall(r"^pytest.*$", section, re.M)]
    assert len(commands) >= 4, f"the README's testing section lost its tier commands: {commands}"
    return commands


def declared_markers() -> set[str]:
    """The markers pyproject.toml declares (``--strict-markers`` refuses others)."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    return {line.split(":")[0] for line in declared}


def markers_as_written() -> dict[str, set[str]]:
    """Each test function (``file::name``) and the markers its decorators and its module's ``pytestmark`` give it."""
    found = {}
    for path in suite_files():
        tree = ast.parse(path.read_text())
        module = set()
        for node in tree.body:
            targets = [getattr(target, "id", "") for target in getattr(node, "targets", [])]
            if isinstance(node, ast.Assign) and "pytestmark" in targets:
                module |= set(re.findall(r"pytest\.mark\.(\w+)", ast.unparse(node.value)))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                marks = {re.sub(r"^pytest\.mark\.(\w+).*", r"\1", ast.unparse(d)) for d in node.decorator_list}
                found[f"{path.relative_to(REPO)}::{node.name}"] = module | {m for m in marks if m.isidentifier()}
    return found


@pytest.mark.e2e
def test_after_the_readme_set_up_pytest_is_this_checkouts_and_loads_the_suites_configuration() -> None:
    """In a fresh shell with an unrelated PATH: `source scripts/env.sh`, then the bare `pytest` the README's
    commands start is the checkout's, whose Python imports torch (conftest does), reads the markers and knows
    pytest-xdist's ``-n`` (the unit tier's command runs in two processes)."""
    env = {k: v for k, v in child_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    script = "source scripts/env.sh >/dev/null\ncommand -v pytest\npytest --markers -n 0 -p no:cacheprovider\n"
    done = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    where, _, markers = done.stdout.partition("\n")
    assert where == str(REPO / ".venv" / "bin" / "pytest"), where
    for marker in ("e2e", "slow", "slurm", "rehearsal", "cuda"):
        assert f"@pytest.mark.{marker}:" in markers, markers


def test_each_readme_tier_command_selects_tests() -> None:
    """Every marker expression of the README is valid (declared markers, Python's and/or/not, as pytest's ``-m``
    reads them) and selects some tests; every path exists and every ``-k`` matches."""
    tests = markers_as_written()
    known = declared_markers()
    for argv in readme_test_commands():
        assert argv[0] == "pytest", argv
        selected = dict(tests)
        options = iter(argv[1:])
        for option in options:
            if option == "-m":
                expression = next(options)
                names = set(re.findall(r"\b\w+\b", expression)) - {"and", "or", "not"}
                assert names <= known, f"{argv}: undeclared markers {names - known}"
                selected = {
                    test: marks
                    for test, marks in selected.items()
                    if eval(expression, {"__builtins__": {}}, {name: name in marks for name in names})
                }
            elif option == "-n":  # pytest-xdist's processes: a count
                assert next(options).isdigit(), argv
            elif option == "-k":
                word = next(options)
                selected = {test: marks for test, marks in selected.items() if word in test.split("::")[1]}
            else:
                assert (REPO / option).exists(), f"{argv}: no {option}"
                selected = {test: marks for test, marks in selected.items() if test.startswith(option)}
        assert selected, f"{argv} selects no test"
