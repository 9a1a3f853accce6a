"""scripts/gpu_check.sh's rehearsal: every step of the GPU check on the CPU with tiny sizes, so
the script, the ``cuda`` tests and the benchmark still run when a GPU is finally lent for a few minutes."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from helpers import REPO, child_env

STEPS = ["env", "cuda_tests", "bench_train", "bench_graft", "bench_compile"]
# What the device tool brings back from its output folder: 8 plain files with plain names.
RETURNED_NAME = re.compile(r"[A-Za-z0-9._-]+")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path, float]:
    """One rehearsal of the GPU check: its result, its output folder and its wall time."""
    root = tmp_path_factory.mktemp("gpu_check")
    out = root / "out"
    env = child_env(GPU_CHECK_REHEARSE="1", GPU_CHECK_OUT=str(out), GPU_CHECK_WORK=str(root / "work"))
    start = time.monotonic()
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=1500,
    )
    return done, out, time.monotonic() - start


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.rehearsal
def test_every_step_passes_and_the_report_is_printed(
    rehearsal: tuple[subprocess.CompletedProcess, Path, float],
) -> None:
    done, out, seconds = rehearsal
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    print(f"rehearsal: {seconds:.0f} s")
    for name in STEPS:
        assert f"[gpu_check] {name}: ok in " in done.stdout
    table = (out / "gpu_check.md").read_text()
    assert table in done.stdout and "REHEARSAL on the CPU" in table
    for row in (
        "| cuda_tests | ok: ",
        "| `--amp`: epoch (train img/s) |",
        "| grafting step (`Grafter.graft`",
        "| `torch.compile`, reduce-overhead |",
        "| host synchronisations in the entropy of a model",
    ):
        assert row in table, table
    # The folder the device tool brings back: every file in it comes back.
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["gpu_check.json", "gpu_check.md", "report.log", *(f"{name}.log" for name in STEPS)])
    assert all(RETURNED_NAME.fullmatch(name) and (out / name).is_file() for name in files) and len(files) <= 8


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.rehearsal
def test_the_json_holds_every_part(rehearsal: tuple[subprocess.CompletedProcess, Path, float]) -> None:
    _, out, _ = rehearsal
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["device"] == "cpu" and results["ok"] is True
    assert [step["name"] for step in results["steps"]] == STEPS
    assert all(step["status"] == "ok" and 0 < step["seconds"] < step["limit_s"] + 1 for step in results["steps"])

    tests = results["tests"]
    assert tests["failed"] == 0 and tests["passed"] >= 7
    skipped = {case["name"] for case in tests["cases"] if case["outcome"] == "skipped"}
    assert skipped == {
        "test_the_entropy_of_a_model_synchronises_the_host_once",
        "test_the_grafting_step_through_an_exchange_file_is_the_frozen_code_on_the_device",
        "test_nccl_network_grafts_next_to_a_single_process_peer",
    }

    [ring] = results["train"]["rings"]  # a rehearsal runs the ring of two only (one network: the same code)
    assert (ring["variant"], ring["nets"], ring["error"]) == ("amp", 2, None) and ring["together_img_s"] > 0
    assert [run["net"] for run in ring["networks"]] == [1, 2]
    for run in ring["networks"]:
        assert [e["epoch"] for e in run["epochs"]] == [1, 2] and run["warm_epoch_s"] > 0
        assert run["train_img_s"] > 0 and run["test_img_s"] > 0 and run["cpu_s"] > 0 and run["rss_gib"] > 0
        assert run["graft_ms"] > 0 and run["wait_s"] >= 0

    # The yardstick is the published loop, which sums p*ln(p) in float32; the library sums in float64.
    assert results["entropy"]["max_difference"] < 1e-5 and results["entropy"]["layer_entropies_ms"] > 0
    graft = results["graft"]
    assert graft["coefficients"] == 19  # every conv of ResNet-20
    assert all(graft[key] > 0 for key in ("grafter_ms", "read_ms", "graft_layers_from_file_ms", "graft_layers_ms"))
    modes = results["compile"]["modes"]
    assert [m["mode"] for m in modes] == ["eager", "reduce-overhead"]  # default: the same code, another mode
    assert all("error" not in m and m["img_s"] > 0 for m in modes) and "vs_eager" in modes[1]
    assert len(results["goals"]) == 4 and all(goal["met"] is None for goal in results["goals"])  # not on a GPU
