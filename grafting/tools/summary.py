"""``graft-summary``: a results table of run folders, grouped by experiment, next to the paper's numbers.

    graft-summary runs/                      # markdown
    graft-summary runs/ --format csv > results.csv

One row per run (a ring, or a baseline), grouped by experiment (model and dataset) with the baseline
first and the grafted recipes after it. Per row: each metric's mean and standard deviation over the
ring's networks (top-1, and top-5 where the dataset has it), the gain over the experiment's own
baseline, the paper's number and the difference. Runs on a generated stand-in (each stand-in its own
experiment), unfinished runs and runs with other epochs than the paper's recipe are never compared with
the paper.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grafting.data.fake import MARKER_NAME
from grafting.errors import UsageError
from grafting.tools.published import PUBLISHED_EPOCHS
from grafting.tools.runs import RunSummary, add_folders_argument, find_runs, mean_std, run_label
from grafting.tools.table import markdown, number
from grafting.train.cli import ArgumentParser, entry_point

__all__ = ["summary_rows", "summary_table", "FORMATS", "parse_args", "main"]

FORMATS = ("markdown", "csv", "json")
_METRICS = ("best", "final", "best_top5", "final_top5")
_STAND_IN_NOTE = (
    f"generated stand-in: trained on data written by grafting.data.fake (its folder holds "
    f"{MARKER_NAME}), not the real dataset; never compared with the paper."
)


def _notes(rows: Sequence[dict[str, Any]], top5: bool) -> list[str]:
    """The footnotes of a table: what its columns mean, top-5 only where the table shows it."""
    paper_epochs = ", ".join(f"{epochs} on {dataset}" for dataset, epochs in PUBLISHED_EPOCHS.items())
    notes = [
        "best: highest test top-1 of any epoch"
        + ("; best top-5: the top-5 of that epoch" if top5 else "")
        + "; final: after the last epoch; mean ± sample std over the ring's networks.",
        "gain: mean best - the mean best of the same experiment's finished baselines with as many epochs; "
        f"diff{' and diff top-5' if top5 else ''}: mean best - paper, only for runs done with the paper's "
        f"epochs ({paper_epochs}) on the real dataset.",
    ]
    if any(row["generated_stand_in"] for row in rows):
        notes.append(_STAND_IN_NOTE)
    return notes


def _natural(text: str) -> list[Any]:
    """Sort key that orders numbers inside text by value: 'c=5' before 'c=50'."""
    return [float(part) if index % 2 else part for index, part in enumerate(re.split(r"(\d+(?:\.\d+)?)", text))]


def _method_order(method: str) -> tuple[int, list[Any]]:
    first = method.split(" ")[0]
    rank = {"baseline": 0, "slr": 1, "grafting": 1, "dlr": 2, "cos": 3}.get(first, 4)
    return rank, _natural(method)


def _baseline_best(runs: Sequence[RunSummary], run: RunSummary) -> float | None:
    """The mean best top-1 over every network of the finished baselines of ``run``'s experiment that
    trained as many epochs."""
    values = [
        n.best
        for other in runs
        if other.method == "baseline"
        and other.finished
        and other.experiment == run.experiment
        and other.epochs == run.epochs
        for n in other.networks
    ]
    return mean_std(values)[0] if values else None


def summary_rows(runs: Sequence[RunSummary], base: str | Path | None = None) -> list[dict[str, Any]]:
    """One dict per run, in table order (experiment, then baseline, slr, dlr, others): recipe, status,
    mean and std of each metric, per-network values, gain over the baseline, paper and difference."""
    ordered = sorted(runs, key=lambda r: (*r.experiment, _method_order(r.method), str(r.folder)))
    rows = []
    for run in ordered:
        row: dict[str, Any] = {
            "model": run.model,
            "dataset": run.dataset,
            "generated_stand_in": run.generated_data,
            "stand_in": run.stand_in,
            "dataset_label": run.dataset_label,
            "method": run.method,
            "networks": len(run.networks),
            "epochs": run.epochs,
            "status": run.status,
        }
        for metric in _METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = run.stats(metric)
            row[f"{metric}_per_network"] = [getattr(n, metric) for n in run.networks]
        baseline = _baseline_best(runs, run) if run.method != "baseline" and run.finished else None
        row["gain"] = row["best_mean"] - baseline if baseline is not None and row["best_mean"] is not None else None
        row["paper"], row["paper_top5"] = run.published, run.published_top5
        row["diff"] = row["diff_top5"] = None
        if run.comparable:
            if row["paper"] is not None and row["best_mean"] is not None:
                row["diff"] = row["best_mean"] - row["paper"]
            if row["paper_top5"] is not None and row["best_top5_mean"] is not None:
                row["diff_top5"] = row["best_top5_mean"] - row["paper_top5"]
        row["run"] = run_label(run, base)
        rows.append(row)
    return rows


def _spread(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _reports_top5(row: dict[str, Any]) -> bool:
    """The paper gives top-5 for ImageNet only; CIFAR rows show top-1 (their top-5 stays in csv and json)."""
    return not row["dataset"].startswith("cifar")


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: the rows of :func:`summary_rows`, model and dataset written once per experiment; top-5
    columns when an ImageNet-style run is among them."""
    top5 = any(_reports_top5(row) for row in rows)
    header = ["model", "dataset", "method", "nets", "epochs", "status", "best top-1", "final top-1"]
    header += ["best top-5", "final top-5"] if top5 else []
    header += ["gain", "paper", "diff"] + (["paper top-5", "diff top-5"] if top5 else []) + ["run"]
    body, previous = [], None
    for row in rows:
        experiment = (row["model"], row["dataset_label"])
        cells = [
            *(experiment if experiment != previous else ("", "")),
            row["method"],
            str(row["networks"]),
            str(row["epochs"] if row["epochs"] is not None else "?"),
            row["status"],
            _spread(row["best_mean"], row["best_std"]),
            _spread(row["final_mean"], row["final_std"]),
        ]
        if top5:
            shown = _reports_top5(row)
            cells += [
                _spread(row["best_top5_mean"], row["best_top5_std"]) if shown else "-",
                _spread(row["final_top5_mean"], row["final_top5_std"]) if shown else "-",
            ]
        cells += [_signed(row["gain"]), number(row["paper"]), _signed(row["diff"])]
        if top5:
            cells += [number(row["paper_top5"]), _signed(row["diff_top5"])]
        body.append(cells + [row["run"]])
        previous = experiment
    return markdown(header, body) + "\n\n" + "\n".join(_notes(rows, top5))


def summary_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV with every field of :func:`summary_rows` (per-network values joined by ';', unknown values empty)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(list(rows[0]))
    for row in rows:
        writer.writerow(
            [
                ";".join("" if v is None else str(v) for v in value)
                if isinstance(value, list)
                else ""
                if value is None
                else value
                for value in row.values()
            ]
        )
    return out.getvalue().rstrip("\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of ``graft-summary``."""
    parser = ArgumentParser(
        prog="graft-summary", description="Results of run folders, grouped by experiment, next to the paper's numbers."
    )
    add_folders_argument(parser, "listed")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="markdown",
        help="markdown table with notes, csv, or json with the per-network values (default: markdown)",
    )
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> None:
    """``graft-summary``: print the results of every run under the given folders."""
    args = parse_args(argv)
    runs = find_runs(args.folders)
    if not runs:
        raise UsageError(f"no runs (net<i>/config.json) under {', '.join(args.folders)}")
    rows = summary_rows(runs, args.folders[0] if len(args.folders) == 1 else None)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        print(summary_csv(rows))
    else:
        print(summary_table(rows))
