"""``graft-filters``: invalid filters (docs/METHOD.md §1: l1 norm below t) per checkpoint and threshold,
next to the paper's counts, or layer by layer.

    graft-filters base=runs/b/net1/best.pt graft=runs/g/net1/best.pt -t 0.1,0.01 --model resnet32
    graft-filters base=runs/b/net1/best.pt graft=runs/g/net1/best.pt --per-layer
    graft-filters base=runs/b graft=runs/g --checkpoint published --model resnet32

A run folder (``--s``) or a network's folder (``net<i>``) stands for one of its network's checkpoints
(``--checkpoint``): ``best.pt``, ``last.pt``, or what the paper's table counted (``published``): a
baseline's ``best.pt`` against network 1's weights of the final epoch of a finished grafting run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from grafting.data.fake import MARKER_NAME
from grafting.errors import CheckpointError, UsageError
from grafting.method.filters import conv_filter_keys, filter_l1_norms
from grafting.ring.layout import CONFIG_NAME, NETWORK_FOLDER, NetworkFiles
from grafting.tools.checkpoints import load_trained_weights, run_settings, stand_in_label
from grafting.tools.published import PUBLISHED_INVALID, published_invalid_models
from grafting.tools.runs import STAND_IN_SUFFIX, read_run
from grafting.tools.table import markdown
from grafting.train.cli import ArgumentParser, entry_point

__all__ = [
    "FilterRow",
    "CHECKPOINTS",
    "run_checkpoint",
    "count_filters",
    "filter_table",
    "layer_table",
    "parse_args",
    "main",
]

# Which checkpoint a run folder stands for (--checkpoint).
CHECKPOINTS = ("best", "last", "published")


@dataclass
class FilterRow:
    """One checkpoint of the invalid-filter table: a name, (invalid, total) per threshold, the same per
    conv layer, and whether it was trained on a generated stand-in."""

    name: str
    counts: dict[float, tuple[int, int]]
    layers: dict[str, dict[float, tuple[int, int]]] = field(default_factory=dict)
    stand_in: bool = False
    model: str | None = None  # as the config.json next to the checkpoint records it


def _split_label(text: str) -> tuple[str, Path]:
    """``label=path`` or a bare path (then the path is the label)."""
    label, sep, path = text.partition("=")
    if sep and label and "/" not in label and not Path(text).exists():
        return label, Path(path)
    return text, Path(text)


def run_checkpoint(folder: Path, which: str = "best") -> Path:
    """The checkpoint file a run folder (``--s``; its network 1) or a network folder (``net<i>``) stands for.

    ``which``: ``best`` (``best.pt``), ``last`` (``last.pt``: the final weights of a finished run, else
    the latest epoch's, grafted) or ``published``, what the paper's invalid-filter table counted: a
    baseline's (``--num 1``) ``best.pt`` and a grafting run's weights of the final epoch (``last.pt`` of a
    finished run; its last epoch does not graft, so these are the weights it tested last). An unfinished
    grafting run is a :class:`UsageError` for ``published``.
    """
    if which not in CHECKPOINTS:
        raise UsageError(f"--checkpoint: unknown choice '{which}'; choose one of: {', '.join(CHECKPOINTS)}")
    match = NETWORK_FOLDER.fullmatch(folder.name)
    if match and (folder / CONFIG_NAME).is_file():
        files = NetworkFiles(folder.parent, int(match.group(1)))
    else:
        files = NetworkFiles(folder, 1)
    if which == "best":
        return files.best
    if which == "last":
        return files.last
    run = read_run(files.root)
    if run.num == 1:
        return files.best
    if not run.finished:
        raise UsageError(
            f"{files.root}: the paper counted a grafting run's final epoch, and this run is {run.status}; "
            f"let it finish, or count its latest weights with --checkpoint last"
        )
    return files.last


def count_filters(checkpoints: Sequence[str], thresholds: Sequence[float], checkpoint: str = "best") -> list[FilterRow]:
    """Invalid/total filters (docs/METHOD.md §1: conv keys, l1 norm below t) of each checkpoint at each
    threshold, in all and per layer. Entries are paths or ``label=path``; any layout
    ``extract_state_dict`` accepts. A folder stands for a checkpoint of its run (:func:`run_checkpoint`
    with ``checkpoint``), named in the row. A checkpoint with NaN or infinite weights is an error (it
    would count as having no invalid filters)."""
    rows = []
    for entry in checkpoints:
        label, path = _split_label(entry)
        if path.is_dir():
            path = run_checkpoint(path, checkpoint)
            label = f"{label} ({path.parent.name}/{path.name})"
        state = load_trained_weights(path)
        keys = conv_filter_keys(state)
        if not keys:
            raise CheckpointError(
                f"{path} has no convolution weights whose key contains 'conv'; "
                "is it a checkpoint of a CNN from this project or the paper?"
            )
        layers = {}
        for key in keys:
            norms = filter_l1_norms(state[key])
            layers[key] = {t: (int((norms < t).sum()), norms.numel()) for t in thresholds}
        counts = {t: (sum(c[t][0] for c in layers.values()), sum(c[t][1] for c in layers.values())) for t in thresholds}
        settings = run_settings(path)
        model = settings.get("model") or settings.get("arch") if settings else None
        rows.append(FilterRow(label, counts, layers, bool(stand_in_label(settings)), model))
    return rows


def _name(row: FilterRow) -> str:
    return row.name + (STAND_IN_SUFFIX if row.stand_in else "")


def _notes(rows: Sequence[FilterRow], model: str | None) -> list[str]:
    notes = []
    if model is not None and model not in published_invalid_models():
        notes.append(
            f"the paper counted invalid filters of {' and '.join(published_invalid_models())} only; "
            f"it has no rows for {model}"
        )
    elif model is not None:
        notes += _other_model_warnings(rows, model)
    if any(row.stand_in for row in rows):
        notes.append(
            f"generated stand-in: trained on generated data (its folder holds {MARKER_NAME}), not the "
            f"real dataset; its counts say nothing about the paper"
        )
    return notes


def _other_model_warnings(rows: Sequence[FilterRow], model: str) -> list[str]:
    """A warning per checkpoint that is not a ``model`` (by its config.json, else by its filter count): the
    paper's rows for ``model`` say nothing about it."""
    paper_total = next(total for (name, _, _), (_, total) in PUBLISHED_INVALID.items() if name == model)
    warnings = []
    for row in rows:
        total = next(iter(row.counts.values()))[1]
        if row.model not in (None, model):
            why = f"its config.json says {row.model}"
        elif total != paper_total:
            why = f"it has {total} filters, {model} has {paper_total}"
        else:
            continue
        warnings.append(
            f"warning: the paper's rows are for {model}, but {row.name} is not a {model} ({why}); "
            f"compare it with the paper's rows of its own model, if any"
        )
    return warnings


def filter_table(rows: Sequence[FilterRow], thresholds: Sequence[float], model: str | None = None) -> str:
    """The paper's table as markdown: a row per checkpoint, a column per threshold, cells
    ``invalid/total``; with a ``model`` the paper reported, its baseline and grafting rows follow
    ('-' for a threshold it did not use). Notes below say what the table cannot show."""
    header = ["checkpoint"] + [f"t = {t:g}" for t in thresholds]
    body = [[_name(row)] + [f"{row.counts[t][0]}/{row.counts[t][1]}" for t in thresholds] for row in rows]
    if model is not None and model in published_invalid_models():
        for method in ("baseline", "grafting"):
            cells = []
            for t in thresholds:
                published = PUBLISHED_INVALID.get((model, method, float(t)))
                cells.append(f"{published[0]}/{published[1]}" if published else "-")
            body.append([f"paper: {model} {method}"] + cells)
    notes = _notes(rows, model)
    return markdown(header, body) + ("\n\n" + "\n".join(notes) if notes else "")


def layer_table(rows: Sequence[FilterRow], thresholds: Sequence[float]) -> str:
    """Markdown, a row per conv layer (in the first checkpoint's order, then any others): its filter
    count and each checkpoint's invalid filters at each threshold; a last row sums them."""
    keys = list(dict.fromkeys(key for row in rows for key in row.layers))
    header = ["layer", "filters"] + [f"{_name(row)}, t = {t:g}" for row in rows for t in thresholds]
    body = []
    for key in keys:
        total = next(row.layers[key][thresholds[0]][1] for row in rows if key in row.layers)
        body.append(
            [key, str(total)]
            + [str(row.layers[key][t][0]) if key in row.layers else "-" for row in rows for t in thresholds]
        )
    totals = {row.counts[thresholds[0]][1] for row in rows}
    body.append(
        ["all", "/".join(map(str, sorted(totals)))] + [str(row.counts[t][0]) for row in rows for t in thresholds]
    )
    notes = _notes(rows, None)
    return markdown(header, body) + ("\n\n" + "\n".join(notes) if notes else "")


def _thresholds(text: str) -> list[float]:
    """A comma list of positive numbers: '0.1,0.01'."""
    values = []
    for word in text.split(","):
        try:
            value = float(word)
        except ValueError:
            raise argparse.ArgumentTypeError(f"threshold '{word}' is not a number; write e.g. 0.1,0.01") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"threshold {word} must be a positive number")
        values.append(value)
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of ``graft-filters``."""
    parser = ArgumentParser(
        prog="graft-filters",
        description="Invalid filters (l1 norm < t) per checkpoint and threshold, in all or layer by layer.",
    )
    parser.add_argument(
        "checkpoints",
        nargs="+",
        metavar="[LABEL=]CHECKPOINT",
        help="checkpoint files (.pt/.pth/.t7, any common layout) or run folders (see --checkpoint), "
        "optionally named LABEL=PATH",
    )
    parser.add_argument(
        "-t",
        "--thresholds",
        type=_thresholds,
        default=[0.1, 0.01],
        metavar="T1,T2",
        help="l1-norm thresholds, comma-separated (default: 0.1,0.01, the paper's)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="add the paper's rows for this model; it counted "
        f"{' and '.join(published_invalid_models())} (default: no paper rows)",
    )
    parser.add_argument(
        "--per-layer", action="store_true", help="one row per conv layer instead of one per checkpoint (default: off)"
    )
    parser.add_argument(
        "--checkpoint",
        choices=CHECKPOINTS,
        default="best",
        help="the file a run folder given as CHECKPOINT stands for: its network 1's best.pt, last.pt, or "
        "'published', what the paper counted: a baseline's best.pt, a finished grafting run's final "
        "weights (default: best)",
    )
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> None:
    """``graft-filters``: print the invalid-filter table."""
    args = parse_args(argv)
    rows = count_filters(args.checkpoints, args.thresholds, args.checkpoint)
    if args.per_layer:
        print(layer_table(rows, args.thresholds))
    else:
        print(filter_table(rows, args.thresholds, args.model))
