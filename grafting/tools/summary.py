"""``graft-summary``: a results table of run folders next to the paper's numbers.

    graft-summary runs/
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from grafting.errors import UsageError
from grafting.tools.runs import RunSummary, find_runs
from grafting.tools.table import markdown, number
from grafting.train.cli import ArgumentParser, entry_point

__all__ = ["summary_table", "parse_args", "main"]


def summary_table(runs: Sequence[RunSummary], base: str | Path | None = None) -> str:
    """Markdown: a row per run with each network's best and final top-1, their means, the paper's
    number and mean best minus it. Folders are shown relative to ``base`` when given."""
    header = ["run", "model", "dataset", "method", "epochs", "best", "final", "mean best", "mean final",
              "paper", "diff"]
    body = []
    for run in runs:
        done = [n.epoch or 0 for n in run.networks]
        progress = f"{min(done)}/{run.epochs if run.epochs is not None else '?'}"
        name = str(run.folder)
        if base is not None:
            try:
                name = str(run.folder.resolve().relative_to(Path(base).resolve())) or "."
            except ValueError:
                pass
        mean_best, published = run.mean_best, run.published
        diff = f"{mean_best - published:+.2f}" if mean_best is not None and published is not None else "-"
        body.append([name, run.model, run.dataset, run.method, progress,
                     " / ".join(number(n.best) for n in run.networks),
                     " / ".join(number(n.final) for n in run.networks),
                     number(mean_best), number(run.mean_final), number(published), diff])
    return markdown(header, body)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of ``graft-summary``."""
    parser = ArgumentParser(prog="graft-summary", description="Markdown table of run folders next to the paper's numbers.")
    parser.add_argument("folders", nargs="+", metavar="FOLDER", help="experiment output folders or run folders (--s)")
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> None:
    """``graft-summary``: print the results table of every run under the given folders."""
    args = parse_args(argv)
    runs = find_runs(args.folders)
    if not runs:
        raise UsageError(f"no runs (net<i>/config.json) under {', '.join(args.folders)}")
    base = args.folders[0] if len(args.folders) == 1 else None
    print(summary_table(runs, base))
    print("\nbest: highest test top-1 of any epoch; final: after the last epoch; diff: mean best - paper.")
