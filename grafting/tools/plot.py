"""``graft-plot``: the figures a paper would show, as PNG files, from the runs' ``metrics.jsonl`` and checkpoints.

    graft-plot runs/ --out figures/

Per experiment (model and dataset):

- ``accuracy_<experiment>.png``: test top-1 per epoch of every network, baselines dashed;
- ``invalid_filters_<experiment>.png``: invalid filters (l1 norm below 0.1 and 0.01) per epoch;
- ``filter_norms_<experiment>.png``: the l1-norm distribution of the filters of the baseline and the
  grafted checkpoints (``--checkpoint best`` or ``last`` of each run's network 1), the paper's figure;

and per grafted run ``alpha_<run>.png``: the coefficient of every layer over the epochs, one heatmap
per network (the mean channel weight per conv for filter-level grafting).

matplotlib is an optional dependency: ``python -m pip install matplotlib`` (or the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grafting.errors import GraftingError, UsageError
from grafting.method.filters import conv_filter_norms
from grafting.ring.layout import NetworkFiles
from grafting.tools.checkpoints import load_trained_weights
from grafting.tools.runs import RunSummary, add_folders_argument, find_runs, network_metrics, run_label
from grafting.train.cli import ArgumentParser, entry_point
from grafting.train.report import INVALID_THRESHOLDS, PAPER_THRESHOLD

__all__ = ["plot_runs", "require_matplotlib", "MATPLOTLIB_MISSING", "parse_args", "main"]

MATPLOTLIB_MISSING = (
    "graft-plot needs matplotlib, which is not installed: python -m pip install matplotlib "
    "(or, in a checkout, python -m pip install -e '.[plot]')"
)


def require_matplotlib() -> Any:
    """The ``matplotlib.figure.Figure`` class; a one-line GraftingError when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise GraftingError(MATPLOTLIB_MISSING) from None
    return Figure


def _file_name(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", "_".join(parts)).strip("_") + ".png"


def _experiment_file(kind: str, key: tuple[str, str, bool, str]) -> str:
    model, dataset, stand_in, _ = key
    return _file_name(kind, model, dataset, "stand-in" if stand_in else "")


def _experiment_title(key: tuple[str, str, bool, str]) -> str:
    model, dataset, stand_in, _ = key
    return f"{model}, {dataset}" + (" (GENERATED stand-in data)" if stand_in else "")


class _Plotter:
    """Writes the figures of a set of runs into ``out``."""

    def __init__(self, runs: Sequence[RunSummary], out: Path, base: Path | None, checkpoint: str) -> None:
        self.Figure = require_matplotlib()
        self.runs, self.out, self.base, self.checkpoint = runs, out, base, checkpoint
        self.records = {
            (run.folder, n.net): network_metrics(NetworkFiles(run.folder, n.net).metrics)
            for run in runs
            for n in run.networks
        }
        self.written: list[Path] = []

    def _save(self, figure: Any, name: str) -> None:
        path = self.out / name
        figure.savefig(path, dpi=100)
        self.written.append(path)

    def _curves(self, axes: Any, runs: Sequence[RunSummary], value: Any, label: str) -> bool:
        """One line per network of ``runs``: ``value(record)`` over the epochs; baselines dashed."""
        drawn, lines = False, 0
        for run in runs:
            style = "--" if run.method == "baseline" else "-"
            for network in run.networks:
                colour = "black" if run.method == "baseline" else f"C{lines % 10}"
                points = [(r["epoch"], value(r)) for r in self.records[(run.folder, network.net)]]
                points = [(e, v) for e, v in points if v is not None]
                if not points:
                    continue
                name = f"{run.method} net{network.net}" if len(run.networks) > 1 else run.method
                axes.plot(
                    *zip(*points),
                    style,
                    color=colour,
                    alpha=0.85,
                    linewidth=1.2,
                    label=f"{name} ({run_label(run, self.base)})",
                )
                drawn, lines = True, lines + (run.method != "baseline")
        if drawn:
            axes.set_xlabel("epoch")
            axes.set_ylabel(label)
            axes.grid(alpha=0.3)
            axes.legend(fontsize=7)
        return drawn

    def accuracy(self, key: tuple[str, str, bool, str], runs: Sequence[RunSummary]) -> None:
        """Test top-1 per epoch of every network, baselines dashed."""
        figure = self.Figure(figsize=(8, 5), layout="constrained")
        axes = figure.add_subplot()
        if self._curves(axes, runs, lambda r: r.get("test_acc"), "test top-1 (%)"):
            axes.set_title(f"{_experiment_title(key)}: test accuracy per epoch")
            self._save(figure, _experiment_file("accuracy", key))

    def invalid_filters(self, key: tuple[str, str, bool, str], runs: Sequence[RunSummary]) -> None:
        """Invalid filters per epoch at each of the paper's thresholds."""
        figure = self.Figure(figsize=(8, 4 * len(INVALID_THRESHOLDS)), layout="constrained")
        drawn = False
        for row, threshold in enumerate(INVALID_THRESHOLDS, start=1):
            axes = figure.add_subplot(len(INVALID_THRESHOLDS), 1, row)
            shown = self._curves(
                axes,
                runs,
                lambda r, t=threshold: (r.get("invalid_filters") or {}).get(str(t)),
                f"invalid filters (l1 < {threshold:g})",
            )
            axes.set_title(f"{_experiment_title(key)}: invalid filters, t = {threshold:g}")
            drawn = drawn or shown
        if drawn:
            self._save(figure, _experiment_file("invalid_filters", key))

    def filter_norms(self, key: tuple[str, str, bool, str], runs: Sequence[RunSummary]) -> None:
        """The l1-norm histogram of network 1's checkpoint of every run, baseline against grafted."""
        series = []
        for run in runs:
            files = NetworkFiles(run.folder, 1)
            path = files.best if self.checkpoint == "best" else files.last
            if not path.exists():
                continue
            norms = conv_filter_norms(load_trained_weights(path))
            if norms.numel():
                series.append((run, norms.numpy()))
        if not series:
            return
        highest = max(float(values.max()) for _, values in series)
        top = max(1, math.ceil(math.log10(max(highest, 1e-3))))
        import numpy as np

        edges = np.logspace(-3, top, 8 * (top + 3) + 1)
        figure = self.Figure(figsize=(8, 5), layout="constrained")
        axes = figure.add_subplot()
        for index, (run, values) in enumerate(series):
            invalid = int((values < PAPER_THRESHOLD).sum())
            axes.hist(
                np.clip(values, edges[0], edges[-1]),
                bins=edges,
                histtype="step",
                linewidth=1.5,
                linestyle="--" if run.method == "baseline" else "-",
                color="black" if run.method == "baseline" else f"C{index % 10}",
                label=f"{run.method} ({run_label(run, self.base)}): {invalid}/{values.size} below {PAPER_THRESHOLD:g}",
            )
        for threshold in INVALID_THRESHOLDS:
            axes.axvline(threshold, color="grey", linestyle=":", linewidth=1)
        axes.set_xscale("log")
        axes.set_xlabel(f"filter l1 norm ({self.checkpoint}.pt of network 1; below 0.001 drawn at 0.001)")
        axes.set_ylabel("filters")
        axes.set_title(f"{_experiment_title(key)}: filter l1 norms, baseline vs grafted")
        axes.legend(fontsize=7)
        self._save(figure, _experiment_file("filter_norms", key))

    def alphas(self, run: RunSummary) -> None:
        """The coefficient of every layer over the epochs, one heatmap per network."""
        panels = []
        for network in run.networks:
            records = self.records[(run.folder, network.net)]
            field = "alphas" if any(r.get("alphas") for r in records) else "filter_weights"
            records = [r for r in records if r.get(field)]  # the epochs that grafted (not the last)
            keys = list(dict.fromkeys(k for r in records for k in (r.get(field) or {})))
            if keys:
                panels.append((network.net, field, keys, records))
        if not panels:
            return
        panel_height = max(2.5, 0.6 + 0.12 * max(len(p[2]) for p in panels))  # inches; a label per layer
        figure = self.Figure(figsize=(9, panel_height * len(panels)), layout="constrained")
        for row, (net, field, keys, records) in enumerate(panels, start=1):
            epochs = [r["epoch"] for r in records]
            grid = [[(r.get(field) or {}).get(k, math.nan) for r in records] for k in keys]
            axes = figure.add_subplot(len(panels), 1, row)
            image = axes.imshow(
                grid,
                aspect="auto",
                cmap="coolwarm",
                vmin=0.0,
                vmax=1.0,
                interpolation="nearest",
                extent=(min(epochs) - 0.5, max(epochs) + 0.5, len(keys) - 0.5, -0.5),
            )
            axes.set_yticks(range(len(keys)), [k.removesuffix(".weight") for k in keys], fontsize=5)
            axes.set_xlabel("epoch")
            name = "alpha" if field == "alphas" else "mean filter weight w"
            axes.set_title(
                f"{run_label(run, self.base)}, network {net}: {name} per layer (> 0.5: keeps more of its own)",
                fontsize=9,
            )
            figure.colorbar(image, ax=axes, label=name)
        self._save(figure, _file_name("alpha", run_label(run, self.base)))


def plot_runs(
    runs: Sequence[RunSummary], out: str | Path, *, base: str | Path | None = None, checkpoint: str = "best"
) -> list[Path]:
    """Write every figure of ``runs`` into ``out`` (created) and return the files written."""
    out = Path(out)
    plotter = _Plotter(runs, out, Path(base) if base is not None else None, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    experiments: dict[tuple[str, str, bool, str], list[RunSummary]] = {}
    for run in runs:
        experiments.setdefault(run.experiment, []).append(run)
    for key, members in sorted(experiments.items()):
        members.sort(key=lambda r: (r.method != "baseline", r.method, str(r.folder)))
        plotter.accuracy(key, members)
        plotter.invalid_filters(key, members)
        plotter.filter_norms(key, members)
        for run in members:
            plotter.alphas(run)
    return plotter.written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of ``graft-plot``."""
    parser = ArgumentParser(
        prog="graft-plot",
        description="PNG figures of run folders: accuracy, coefficients, invalid filters, filter-norm distributions.",
    )
    add_folders_argument(parser, "drawn")
    parser.add_argument(
        "--out", default=None, metavar="DIR", help="folder for the PNG files (default: <first FOLDER>/plots)"
    )
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="which checkpoint of network 1 the filter-norm histogram reads (default: best)",
    )
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> None:
    """``graft-plot``: write the figures and print their paths."""
    args = parse_args(argv)
    require_matplotlib()  # before reading anything: the one thing a user may have to install
    runs = find_runs(args.folders)
    if not runs:
        raise UsageError(f"no runs (net<i>/config.json) under {', '.join(args.folders)}")
    out = Path(args.out) if args.out else Path(args.folders[0]) / "plots"
    written = plot_runs(runs, out, base=args.folders[0] if len(args.folders) == 1 else None, checkpoint=args.checkpoint)
    for path in written:
        print(path)
    if not written:
        print(f"nothing to draw yet: no run under {', '.join(args.folders)} has finished an epoch")


if __name__ == "__main__":
    main(None)
