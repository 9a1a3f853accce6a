"""The "Grafting in your own training loop" example of docs/library.md, run exactly as written (new
interpreters, as a user starts them): two copies side by side graft each other, and the result differs from
the same code run without a peer."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import finish, own_loop_example, start_process


def run_copies(folder: Path, argvs: list[list[str]]) -> list[str]:
    script = folder / "own_loop.py"
    script.write_text(own_loop_example())
    procs = [
        start_process([sys.executable, str(script), *argv], folder, f"copy{n}", merge_output=True)
        for n, argv in enumerate(argvs)
    ]
    for proc, code in zip(procs, finish(procs)):
        assert code == 0, proc.report()
    return [proc.log for proc in procs]


@pytest.mark.e2e
@pytest.mark.slow
def test_readme_example_grafts_two_copies(tmp_path: Path) -> None:
    ring, alone = tmp_path / "ring", tmp_path / "alone"
    ring.mkdir()
    alone.mkdir()
    outputs = run_copies(ring, [["1", "2"], ["2", "2"]])
    for _net, peer, out in ((1, 2, outputs[0]), (2, 1, outputs[1])):
        for epoch in (1, 2):
            line = re.search(rf"epoch {epoch}: grafted network {peer} \((\d+) coefficients, mean ([0-9.]+)\)", out)
            assert line, out
            count, mean = int(line.group(1)), float(line.group(2))
            assert count > 10 and 0.3 <= mean <= 0.7
    run_copies(alone, [["1", "1"]])
    grafted = torch.load(ring / "net1.pt", weights_only=True)
    ungrafted = torch.load(alone / "net1.pt", weights_only=True)
    assert grafted.keys() == ungrafted.keys()
    differing = [k for k in grafted if grafted[k].is_floating_point() and not torch.equal(grafted[k], ungrafted[k])]
    assert len(differing) > len(grafted) // 2, "grafting left the weights as an ungrafted run's"
    # the exchange files the example wrote are the ones the Grafter documents
    assert (ring / "runs/own-loop/net1_epoch1.tensors").exists() and (
        ring / "runs/own-loop/net2_epoch2.tensors"
    ).exists()
