"""Fixtures and hooks for every test; the shared helpers live in ``tests/helpers`` (imported as ``helpers``).

Markers (declared in pyproject.toml): ``e2e`` for tests that start processes, ``slow`` for the long ones,
``cuda`` for tests that need a GPU (they skip without one, unless ``GPU_CHECK_REHEARSE=1`` has them
rehearse on the CPU, as ``scripts/gpu_check.sh`` does). ``pytest -m "not e2e"`` runs the unit tests alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import helpers
import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip where no GPU is visible (they run on the CPU in a rehearsal)."""
    if torch.cuda.is_available() or helpers.REHEARSAL:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_process_outlives_its_test() -> Iterator[None]:
    """Kill what a failed test left running: a network whose peer died waits for it forever."""
    yield
    helpers.kill_leftovers()
