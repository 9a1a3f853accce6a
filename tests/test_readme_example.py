"""docs/library.md's "own training loop" example: the page shows docs/examples/own_loop.py as it is, and
that file, run as the page says, grafts a ring of two; run twice in one folder, the second run grafts
nothing of the first."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import OWN_LOOP_EXAMPLE as EXAMPLE
from helpers import REPO, finish, start_process

PAGE = REPO / "docs" / "library.md"


def shown_example(marker: str) -> str:
    """The code block of docs/library.md that follows ``<!-- example: MARKER -->``."""
    match = re.search(rf"<!-- example: {re.escape(marker)} -->\s*```python\n(.*?)```", PAGE.read_text(), re.S)
    assert match, f"docs/library.md lost its example block for {marker}"
    return match.group(1)


def test_the_page_shows_the_example_file_as_it_is() -> None:
    assert shown_example("docs/examples/own_loop.py") == EXAMPLE.read_text()


def run_ring(workdir: Path, run: str) -> list[str]:
    """Both networks of the example's ring, as the page launches them (from the repository's root there;
    here from ``workdir``, with the file's full path); returns their output."""
    procs = [
        start_process(
            [sys.executable, str(EXAMPLE), run, str(net), "2"], workdir, f"net{net}", merge_output=True, fork=True
        )
        for net in (1, 2)
    ]
    for proc, code in zip(procs, finish(procs)):
        assert code == 0, proc.report()
    return [proc.log for proc in procs]


@pytest.mark.e2e
@pytest.mark.slow
def test_the_example_run_twice_in_one_folder_never_mixes_the_two_runs(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "first"
    results = []
    for _ in range(2):
        outputs = run_ring(tmp_path, "runs/first")
        for out, peer in zip(outputs, (2, 1)):
            line = re.search(rf"epoch 1: grafted network {peer} \((\d+) coefficients, mean ([0-9.]+)\)", out)
            assert line, out
            assert int(line.group(1)) > 10 and 0.3 <= float(line.group(2)) <= 0.7, line.group(0)
            assert "epoch 2:" not in out, "the last epoch is not grafted"
        # finish() left the results and the ring's identity, nothing another run could graft
        assert sorted(p.name for p in folder.iterdir()) == ["net1.pt", "net2.pt", "ring.json"]
        results.append([torch.load(folder / f"net{net}.pt", weights_only=True) for net in (1, 2)])
    # Same seeds, same data: a second run that grafted nothing of the first ends exactly as the first.
    for first, second in zip(*results):
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first)
