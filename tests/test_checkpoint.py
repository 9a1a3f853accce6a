"""Tests for grafting.checkpoint: atomic writes, readable load errors, checkpoint layouts, RNG state."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from grafting import checkpoint
from grafting.checkpoint import (
    capture_rng_state,
    extract_state_dict,
    load_file,
    restore_rng_state,
    save_atomic,
)
from grafting.errors import CheckpointError, GraftingError


def small_state_dict() -> dict[str, torch.Tensor]:
    """A real state_dict with conv, batch-norm (including the integer counter) and linear entries."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    return dict(model.state_dict())


def assert_same_state_dict(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected), "keys or their order differ"
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key


def leftover_temp_files(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if ".tmp-" in name)


# ------------------------------------------------------------------ save_atomic


def test_save_atomic_round_trip_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    state = small_state_dict()
    save_atomic({"model": state, "epoch": 3}, target)
    save_atomic({"model": state, "epoch": 4}, target)  # overwriting works too

    loaded = load_file(target)
    assert loaded["epoch"] == 4
    assert_same_state_dict(loaded["model"], state)
    assert leftover_temp_files(tmp_path) == []


def _fail_in_replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_in_save(obj: object, handle) -> None:
    handle.write(b"PK\x03\x04 half a checkpoint")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_in_save_like_torch(obj: object, handle) -> None:
    # torch.save reports a failed write of the underlying file as a RuntimeError chained to the OSError.
    handle.write(b"PK\x03\x04 half a checkpoint")
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as err:
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 704 vs 598") from err


@pytest.mark.parametrize(
    "target_name, failure",
    [("replace", _fail_in_replace), ("save", _fail_in_save), ("save", _fail_in_save_like_torch)],
)
def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch, target_name, failure) -> None:
    target = tmp_path / "last.pt"
    save_atomic({"epoch": 1, "weights": torch.arange(5)}, target)

    if target_name == "replace":
        monkeypatch.setattr(checkpoint.os, "replace", failure)
    else:
        monkeypatch.setattr(checkpoint.torch, "save", failure)
    with pytest.raises(CheckpointError) as caught:
        save_atomic({"epoch": 2, "weights": torch.arange(7)}, target)
    monkeypatch.undo()

    message = str(caught.value)
    assert str(target) in message
    assert "No space left on device" in message
    assert "the previous checkpoint is intact" in message
    assert "\n" not in message
    previous = load_file(target)
    assert previous["epoch"] == 1
    assert torch.equal(previous["weights"], torch.arange(5))
    assert leftover_temp_files(tmp_path) == []


def test_save_error_that_is_not_about_the_disk_propagates(tmp_path: Path) -> None:
    target = tmp_path / "bad.pt"
    with pytest.raises(Exception) as caught:
        save_atomic({"fn": lambda: None}, target)  # lambdas cannot be pickled: a programming error
    assert not isinstance(caught.value, GraftingError)
    assert not target.exists()
    assert leftover_temp_files(tmp_path) == []


# ------------------------------------------------------------------ load_file


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "net1_epoch3.pt"
    with pytest.raises(CheckpointError, match="does not exist") as caught:
        load_file(missing)
    assert str(missing) in str(caught.value)


def test_load_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a directory"):
        load_file(tmp_path)


@pytest.mark.parametrize("cut", ["half", "empty", "ten_bytes"])
def test_load_truncated_file_names_it(tmp_path: Path, cut: str) -> None:
    target = tmp_path / "last.pt"
    torch.save({"model": small_state_dict(), "epoch": 9}, target)
    size = target.stat().st_size
    keep = {"half": size // 2, "empty": 0, "ten_bytes": 10}[cut]
    with open(target, "r+b") as handle:
        handle.truncate(keep)

    with pytest.raises(CheckpointError) as caught:
        load_file(target)
    message = str(caught.value)
    assert message.startswith(f"{target} is truncated or corrupt (")
    assert message.endswith("; delete it or resume from an earlier checkpoint")
    assert "\n" not in message
    assert len(message) < 400


def test_load_garbage_file_is_corrupt(tmp_path: Path) -> None:
    target = tmp_path / "notes.t7"
    target.write_bytes(b"these are not weights\n" * 20)
    with pytest.raises(CheckpointError, match="is truncated or corrupt") as caught:
        load_file(target)
    assert "\n" not in str(caught.value)


def test_load_whole_module_is_refused_with_advice(tmp_path: Path) -> None:
    target = tmp_path / "whole.pth"
    torch.save(nn.Linear(2, 2), target)
    with pytest.raises(CheckpointError, match=r"state_dict\(\)") as caught:
        load_file(target)
    assert str(target) in str(caught.value)
    assert "Linear" in str(caught.value)


# ------------------------------------------------------------------ extract_state_dict


def _layouts(state: dict[str, torch.Tensor]) -> dict[str, object]:
    prefixed = {f"module.{key}": value for key, value in state.items()}
    compiled = {f"_orig_mod.{key}": value for key, value in state.items()}
    compiled_ddp = {f"module._orig_mod.{key}": value for key, value in state.items()}
    return {
        "bare": state,
        "net_t7": {"net": state, "acc": 93.4, "epoch": 199},
        "model": {"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 5},
        "state_dict": {"state_dict": state, "arch": "resnet56"},
        "module_prefix": prefixed,
        "module_prefix_in_net": {"net": prefixed, "acc": 90.0},
        "compile_prefix": {"model": compiled},
        "ddp_of_compiled": compiled_ddp,
    }


@pytest.mark.parametrize("layout", list(_layouts({})))
def test_every_layout_extracts_the_same_state_dict(tmp_path: Path, layout: str) -> None:
    state = small_state_dict()
    target = tmp_path / f"{layout}.pt"
    torch.save(_layouts(state)[layout], target)

    extracted = extract_state_dict(load_file(target, weights_only=True), source=str(target))
    assert_same_state_dict(extracted, state)
    assert extracted["1.num_batches_tracked"].dtype == torch.int64


def test_prefix_is_kept_unless_every_key_has_it() -> None:
    state = {"module.weight": torch.ones(2), "bias": torch.zeros(2)}
    assert list(extract_state_dict(state)) == ["module.weight", "bias"]


def test_unknown_layout_lists_the_keys() -> None:
    with pytest.raises(CheckpointError) as caught:
        extract_state_dict({"epoch": 3, "weights": {"a": torch.ones(1)}}, source="run/best.pt")
    message = str(caught.value)
    assert message.startswith("run/best.pt: unknown checkpoint layout (keys: epoch, weights)")
    assert "'model', 'state_dict' or 'net'" in message


def test_layout_that_is_not_a_dict_is_described() -> None:
    with pytest.raises(CheckpointError, match=r"unknown checkpoint layout \(a list, not a dict\)"):
        extract_state_dict([torch.ones(1)], source="x.pt")
    with pytest.raises(CheckpointError, match=r"keys: none"):
        extract_state_dict({}, source="x.pt")


def test_wrapper_key_with_non_tensors_is_rejected() -> None:
    with pytest.raises(CheckpointError, match=r"'model' holds keys: conv, fc rather than a state_dict"):
        extract_state_dict({"model": {"conv": "resnet", "fc": 3}}, source="x.pt")


def test_whole_module_under_net_is_rejected() -> None:
    with pytest.raises(CheckpointError, match=r"'net' holds a whole Linear module"):
        extract_state_dict({"net": nn.Linear(2, 2), "acc": 1.0}, source="old.t7")


# ------------------------------------------------------------------ RNG state


def _draw() -> tuple[list[float], list[float], torch.Tensor, float, float]:
    return (
        [random.random() for _ in range(3)],
        list(np.random.rand(3)),
        torch.rand(3),
        random.gauss(0.0, 1.0),
        float(np.random.standard_normal()),
    )


def test_rng_state_round_trips_through_weights_only_load(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()  # its gaussians leave a cached second value in Python's and numpy's generator state

    state = capture_rng_state()
    expected = _draw()
    save_atomic({"rng": state}, tmp_path / "rng.pt")
    _draw()  # move every generator on

    restored = load_file(tmp_path / "rng.pt", weights_only=True)["rng"]
    restore_rng_state(restored)
    again = _draw()

    assert again[0] == expected[0]
    assert again[1] == expected[1]
    assert torch.equal(again[2], expected[2])
    assert again[3] == expected[3]
    assert again[4] == expected[4]


def test_rng_state_holds_no_numpy_objects() -> None:
    def walk(value: object) -> None:
        assert not isinstance(value, (np.ndarray, np.generic)), type(value)
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(capture_rng_state())
