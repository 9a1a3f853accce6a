"""The test suite's own rules: each test's markers match what it does (helpers.markers), shared code lives in
the helpers package, no test file imports another, docstrings describe behaviour, and the README's test
commands run this environment's pytest."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
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


def readme_test_commands() -> list[str]:
    """The pytest commands of the README's testing section (those run after ``source scripts/env.sh``)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Testing") :]
    section = section[: section.index("\n## ", 3)] if "\n## " in section[3:] else section
    commands = re.findall(r"^(pytest[^#\n]*?)\s*(?:#.*)?$", section, re.M)
    assert len(commands) >= 4, f"the README's testing section lost its tier commands: {commands}"
    return commands


@pytest.mark.e2e
@pytest.mark.slow
def test_the_readme_tier_commands_run_this_environments_pytest_verbatim(tmp_path: Path) -> None:
    """Each command, as printed, after `source scripts/env.sh` in a fresh shell (collecting only: the tiers
    themselves are the suite). Their pytest is the checkout's, which imports torch, and each selects tests."""
    env = {k: v for k, v in child_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # no other environment's pytest ahead of the checkout's
    script = "source scripts/env.sh >/dev/null\ncommand -v pytest\n" + "".join(
        f"{command} --collect-only -q -p no:cacheprovider | tail -1\n" for command in readme_test_commands()
    )
    done = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    where, *counts = done.stdout.strip().splitlines()
    assert where == str(REPO / ".venv" / "bin" / "pytest"), where
    assert len(counts) == len(readme_test_commands()), done.stdout
    for command, count in zip(readme_test_commands(), counts):
        match = re.match(r"(\d+)(/\d+)? tests? (collected|selected)", count)
        assert match and int(match.group(1)) > 0, f"{command}: {count}"
