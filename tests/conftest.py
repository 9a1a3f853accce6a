"""Fixtures and hooks for every test; the shared helpers live in ``tests/helpers`` (imported as ``helpers``).

Markers (declared in pyproject.toml), per test, and checked: a test whose markers disagree with what it does
fails (:mod:`helpers.markers` says how each is judged).

- ``e2e``: the test starts a process (a new interpreter, a shell script, or a fork of the warm fork server),
  itself or through a fixture it uses. ``pytest -m "not e2e"`` runs the unit tests alone.
- ``slurm``: it needs the local Slurm (it runs a Slurm command or ``scripts/ci/local_slurm.sh``, itself or
  through a fixture).
- ``rehearsal``: it runs the GPU check's rehearsal on the CPU (``scripts/gpu_check.sh``).
- ``slow``: it takes more than about ten seconds on a 2-core machine.
- ``cuda``: it needs a CUDA GPU; it skips without one, unless ``GPU_CHECK_REHEARSE=1`` has it rehearse on the
  CPU, as ``scripts/gpu_check.sh`` does.
"""

from __future__ import annotations

import atexit
import gc
import os
from collections.abc import Iterator

import pytest

# helpers and torch are imported in the hooks: pytest-xdist's controller (-n 2) runs no test and imports neither,
# so that its worker processes start without waiting 2.5 s for it.


def pytest_configure(config: pytest.Config) -> None:
    """Every test's markers are checked against what it does (:mod:`helpers.markers`). The garbage collector
    runs less often, and never walks what lives until the end (see :func:`pytest_collection_finish`). torch's
    threads are set here, once for the whole session."""
    worker = "PYTEST_XDIST_WORKER" in os.environ
    if config.getoption("numprocesses", None) and not worker:
        return  # pytest-xdist's controller: its workers run the tests, each configured here
    if worker:
        # A worker that has sent its results ends without the interpreter's teardown of torch's modules, which
        # takes over a second on 2 cores while the controller waits. Registered before torch is imported, this
        # exit handler runs after torch's own; nothing the worker still holds is needed once its results are sent.
        atexit.register(os._exit, 0)
    import torch
    from helpers import markers

    config.pluginmanager.register(markers, "helpers.markers")
    gc.set_threshold(50_000, 20, 10)  # Python's default, 700 allocations, collects some 5000 times a session
    gc.freeze()  # torch and pytest, imported by now
    # One thread: between ops, OpenMP's threads spin and would take cores from the training processes the e2e
    # tests start (the whole suite ran 42 s slower with two); the unit tier uses the second core through -n 2.
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# Collection, and what runs around every test


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip where no GPU is visible (they run on the CPU in a rehearsal)."""
    import helpers
    import torch

    if torch.cuda.is_available() or helpers.REHEARSAL:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The test modules, imported by now, live until the end: out of the garbage collector's walks (each full
    collection walked half a million objects, some twenty times a session). With tests that start processes among
    those selected, start the fork server now: its imports then overlap the tests that run first."""
    import helpers

    gc.freeze()
    if not session.config.option.collectonly and any(item.get_closest_marker("e2e") for item in session.items):
        helpers.warm_up()


@pytest.fixture(autouse=True)
def no_process_outlives_its_test() -> Iterator[None]:
    """Kill what a failed test left running: a network whose peer died waits for it forever."""
    import helpers

    yield
    helpers.kill_leftovers()


@pytest.fixture
def in_process_logs() -> Iterator[None]:
    """A script's main() run in this process points the root logger at the console; put pytest's handlers
    back afterwards (see :func:`helpers.script_state`)."""
    import helpers

    with helpers.script_state():
        yield
