"""``graft-filters``: invalid filters (docs/METHOD.md §1: l1 norm below t) per checkpoint and threshold,
next to the paper's counts.

    graft-filters base=runs/b/net1/best.pt graft=runs/g/net1/best.pt -t 0.1,0.01 --model resnet32
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from grafting.checkpoint import load_state_dict_file
from grafting.errors import CheckpointError
from grafting.method.filters import count_invalid_filters
from grafting.tools.published import PUBLISHED_INVALID
from grafting.tools.table import markdown
from grafting.train.cli import ArgumentParser, entry_point

__all__ = ["FilterRow", "count_filters", "filter_table", "parse_args", "main"]


@dataclass
class FilterRow:
    """One line of the invalid-filter table: a name and (invalid, total) per threshold."""

    name: str
    counts: dict[float, tuple[int, int]]


def _split_label(text: str) -> tuple[str, Path]:
    """``label=path`` or a bare path (then the path is the label)."""
    label, sep, path = text.partition("=")
    if sep and label and "/" not in label and not Path(text).exists():
        return label, Path(path)
    return text, Path(text)


def count_filters(checkpoints: Sequence[str], thresholds: Sequence[float]) -> list[FilterRow]:
    """Invalid/total filters (docs/METHOD.md §1: conv keys, l1 norm below t) of each checkpoint at each
    threshold. Entries are paths or ``label=path``; any layout ``extract_state_dict`` accepts."""
    rows = []
    for entry in checkpoints:
        label, path = _split_label(entry)
        state = load_state_dict_file(path)
        counts = {t: count_invalid_filters(state, t) for t in thresholds}
        if all(total == 0 for _, total in counts.values()):
            raise CheckpointError(f"{path} has no convolution weights whose key contains 'conv'; "
                                  "is it a checkpoint of a CNN from this project or the paper?")
        rows.append(FilterRow(label, counts))
    return rows


def filter_table(rows: Sequence[FilterRow], thresholds: Sequence[float], model: str | None = None) -> str:
    """The paper's table as markdown: a row per checkpoint, a column per threshold, cells
    ``invalid/total``; with ``model``, the paper's baseline and grafting rows follow ('-' if unknown)."""
    header = ["checkpoint"] + [f"t = {t:g}" for t in thresholds]
    body = [[row.name] + [f"{row.counts[t][0]}/{row.counts[t][1]}" for t in thresholds] for row in rows]
    if model is not None:
        for method in ("baseline", "grafting"):
            cells = []
            for t in thresholds:
                published = PUBLISHED_INVALID.get((model, method, float(t)))
                cells.append(f"{published[0]}/{published[1]}" if published else "-")
            body.append([f"paper: {model} {method}"] + cells)
    return markdown(header, body)


def _thresholds(text: str) -> list[float]:
    """A comma list of positive numbers: '0.1,0.01'."""
    values = []
    for word in text.split(","):
        try:
            value = float(word)
        except ValueError:
            raise argparse.ArgumentTypeError(f"threshold '{word}' is not a number; write e.g. 0.1,0.01") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"threshold {word} must be positive")
        values.append(value)
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of ``graft-filters``."""
    parser = ArgumentParser(prog="graft-filters", description="Invalid filters (l1 norm < t) per checkpoint and threshold.")
    parser.add_argument("checkpoints", nargs="+", metavar="[LABEL=]CHECKPOINT",
                        help="checkpoint files (.pt/.pth/.t7, any common layout), optionally named LABEL=PATH")
    parser.add_argument("-t", "--thresholds", type=_thresholds, default=[0.1, 0.01], metavar="T1,T2",
                        help="l1-norm thresholds, comma-separated (default: 0.1,0.01, the paper's)")
    parser.add_argument("--model", default=None, help="add the paper's rows for this model (resnet32, mobilenetv2)")
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> None:
    """``graft-filters``: print the invalid-filter table."""
    args = parse_args(argv)
    print(filter_table(count_filters(args.checkpoints, args.thresholds), args.thresholds, args.model))
