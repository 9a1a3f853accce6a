"""Checkpoints as the results tools read them: the weights of a trained network, refused when they are
not finite, and the settings of the run that wrote them (the ``config.json`` next to the file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from grafting.checkpoint import load_state_dict_file
from grafting.errors import CheckpointError
from grafting.ring.layout import CONFIG_NAME
from grafting.tools.runs import STAND_IN_SUFFIX, read_config

__all__ = ["load_trained_weights", "run_settings", "stand_in_label"]


def load_trained_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict in ``path`` (any layout :func:`grafting.load_state_dict_file` reads); a
    :class:`CheckpointError` when a floating tensor holds NaN or infinite values: such a network would be
    counted as having no invalid filters, or score chance level, and neither would be true."""
    state = load_state_dict_file(path)
    broken = [key for key, tensor in state.items() if tensor.is_floating_point() and not bool(tensor.isfinite().all())]
    if broken:
        raise CheckpointError(
            f"{path} holds NaN or infinite values in {len(broken)} of its tensors (first: "
            f"'{broken[0]}'); it is not a usable network: take an earlier checkpoint of that run"
        )
    return state


def run_settings(path: str | Path) -> dict[str, Any] | None:
    """The settings of the run that wrote checkpoint ``path`` (``config.json`` beside it), or None."""
    config = Path(path).parent / CONFIG_NAME
    return read_config(config) if config.is_file() else None


def stand_in_label(settings: dict[str, Any] | None) -> str:
    """:data:`STAND_IN_SUFFIX` for a run trained on generated data, else ''."""
    return STAND_IN_SUFFIX if settings and settings.get("generated_data") else ""
