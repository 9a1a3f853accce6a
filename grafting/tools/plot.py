"""``graft-plot``: figures for papers and slides, from the runs' ``metrics.jsonl`` and checkpoints.

    graft-plot runs/ --out figures/                      # PNG, 300 dpi
    graft-plot runs/ --out figures/ --format pdf         # vector figures for a paper (or svg)

Per experiment (model and dataset; each generated stand-in is an experiment of its own):

- ``accuracy_<experiment>``: test top-1 per epoch, one line per method (baselines dashed); a method with
  several networks (a ring, or several rings) is drawn as their mean with a band of ± one standard deviation;
- ``invalid_filters_<experiment>``: invalid filters (l1 norm below 0.1 and 0.01) per epoch, the same way;
- ``filter_norms_<experiment>``: the l1-norm distribution of the filters of network 1's checkpoint of every
  run (``--checkpoint best`` or ``last``), the paper's figure;

and per grafted run ``alpha_<run>``: every layer's coefficient over the epochs, one heat map per network, on a
colour scale centred at 0.5 (the mean channel weight per conv for filter-level grafting).

The figures are sized for one column of a two-column paper (``--width``, 3.4 inches) with every font at
least 8 pt, so they stay readable where a paper puts them. Titles name the experiment, legends the
methods, and a caption line below names the folder the runs come from.

matplotlib is an optional dependency: ``python -m pip install matplotlib`` (or the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import textwrap
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafting.errors import GraftingError, UsageError
from grafting.method.filters import conv_filter_norms
from grafting.ring.layout import NetworkFiles
from grafting.tools.checkpoints import load_trained_weights
from grafting.tools.flags import bounded
from grafting.tools.runs import RunSummary, add_folders_argument, find_runs, network_metrics, run_label
from grafting.train.cli import ArgumentParser, entry_point
from grafting.train.report import INVALID_THRESHOLDS, PAPER_THRESHOLD

__all__ = [
    "FORMATS",
    "MIN_FONT_PT",
    "COLUMN_WIDTH_IN",
    "MATPLOTLIB_MISSING",
    "NamedFigure",
    "make_figures",
    "plot_runs",
    "require_matplotlib",
    "parse_args",
    "main",
]

MATPLOTLIB_MISSING = (
    "graft-plot needs matplotlib, which is not installed: python -m pip install matplotlib "
    "(or, in a checkout, python -m pip install -e '.[plot]')"
)
FORMATS = ("png", "pdf", "svg")
MIN_FONT_PT = 8.0  # the smallest text of every figure, readable at a single column's width
COLUMN_WIDTH_IN = 3.4  # one column of a two-column paper (CVPR, IEEE, ACM: 3.3 to 3.5 inches)
DEFAULT_DPI = 300  # for PNG (and the heat maps inside PDF and SVG files)
_FONT_KEYS = (
    *("font.size", "axes.titlesize", "axes.labelsize", "legend.fontsize", "legend.title_fontsize"),
    *("xtick.labelsize", "ytick.labelsize", "figure.titlesize", "figure.labelsize"),
)
# Any: matplotlib's stubs spell out every rcParams key as a literal type.
_STYLE: Any = {
    **dict.fromkeys(_FONT_KEYS, MIN_FONT_PT),
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
    "svg.hashsalt": "filter-grafting",  # the same runs give the same SVG file
}
_MARKERS = "osD^vP*X<>"
# Markers at every epoch up to this many epochs; beyond, about this many markers per line.
_MARKED_EPOCHS = 30


def require_matplotlib() -> Any:
    """The ``matplotlib.figure.Figure`` class; a one-line GraftingError when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise GraftingError(MATPLOTLIB_MISSING) from None
    return Figure


@dataclass
class NamedFigure:
    """A figure and the file name (without extension) it is saved under."""

    name: str
    figure: Any


@dataclass
class _Series:
    """One line of a figure: a method's value per epoch, the mean over its networks and their std (None
    where fewer than two networks have the epoch)."""

    method: str
    networks: int
    epochs: list[int]
    mean: list[float]
    std: list[float | None]


def _wrap(text: str, width_in: float) -> str:
    """``text`` in lines that fit a figure ``width_in`` inches wide at 8 pt (about 0.6 em a character)."""
    chars = max(20, int(width_in * 72 / (0.62 * MIN_FONT_PT)))
    return "\n".join(textwrap.wrap(text, chars, break_on_hyphens=False, break_long_words=True))


class _FileNames:
    """File names that never collide: the readable name, with a short hash of what it stands for added when
    another figure already took it (runs ``x/y_z`` and ``x_y/z`` both read ``x_y_z``; case-insensitive file
    systems also count)."""

    def __init__(self) -> None:
        self.taken: dict[str, str] = {}

    def take(self, readable: str, identity: str) -> str:
        name = re.sub(r"[^A-Za-z0-9.=-]+", "_", readable).strip("_.") or "figure"
        if self.taken.get(name.lower(), identity) != identity:
            name = f"{name}_{hashlib.sha1(identity.encode()).hexdigest()[:8]}"
        self.taken[name.lower()] = identity
        return name


def _experiment_title(run: RunSummary, what: str) -> str:
    """What a figure shows and of which experiment; a generated stand-in says so, and which one it is."""
    stand_in = ""
    if run.generated_data:
        stand_in = f" (GENERATED stand-in data{': ' + run.stand_in if run.stand_in else ''})"
    return f"{run.model}, {run.dataset}{stand_in}: {what}"


def _method_style(method: str, index: int) -> dict[str, Any]:
    """Baselines black and dashed; the other methods in colours, each with its own marker, so that lines
    lying on top of each other stay distinguishable."""
    if method == "baseline":
        return {"color": "black", "linestyle": "--", "marker": "o", "markerfacecolor": "white"}
    return {"color": f"C{index % 10}", "linestyle": "-", "marker": _MARKERS[(index + 1) % len(_MARKERS)]}


def _invalid_at(threshold: float) -> Callable[[dict[str, Any]], float | None]:
    """A record's invalid-filter count at ``threshold`` (None when it has none)."""
    return lambda record: (record.get("invalid_filters") or {}).get(str(threshold))


def _integer_epochs(axes: Any) -> None:
    """Epoch ticks at whole epochs only (a 3-epoch run shows 1, 2, 3, not 1.25 or 1.75)."""
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")


class _Plotter:
    """Builds the figures of a set of runs."""

    def __init__(self, runs: Sequence[RunSummary], source: str, checkpoint: str, width: float) -> None:
        self.Figure = require_matplotlib()
        self.runs, self.source, self.checkpoint, self.width = runs, source, checkpoint, width
        self.records = {
            (run.folder, n.net): network_metrics(NetworkFiles(run.folder, n.net).metrics)
            for run in runs
            for n in run.networks
        }
        self.names = _FileNames()
        self.figures: list[NamedFigure] = []

    # ---------------------------------------------------------------- shared pieces

    def _figure(self, height_ratio: float) -> Any:
        return self.Figure(figsize=(self.width, self.width * height_ratio), layout="constrained")

    def _title(self, run: RunSummary, what: str) -> str:
        return _wrap(_experiment_title(run, what), self.width)

    def _keep(self, figure: Any, readable: str, identity: str, caption: str) -> None:
        figure.supxlabel(_wrap(caption, self.width), fontsize=MIN_FONT_PT, color="0.3")
        self.figures.append(NamedFigure(self.names.take(readable, identity), figure))

    def _experiment_name(self, kind: str, run: RunSummary) -> tuple[str, str]:
        """The readable file name of an experiment's figure and what it stands for."""
        readable = "_".join([kind, run.model, run.dataset] + (["stand-in"] if run.generated_data else []))
        return readable, repr((kind, run.experiment))

    def _series(self, runs: Sequence[RunSummary], value: Callable[[dict[str, Any]], float | None]) -> list[_Series]:
        """Per method (in ``runs``' order): ``value(record)`` per epoch, mean and std over its networks."""
        import numpy as np

        per_method: dict[str, list[dict[int, float]]] = {}
        for run in runs:
            for network in run.networks:
                points = {r["epoch"]: value(r) for r in self.records[(run.folder, network.net)]}
                known = {e: float(v) for e, v in points.items() if v is not None}
                if known:
                    per_method.setdefault(run.method, []).append(known)
        series = []
        for method, curves in per_method.items():
            epochs = sorted({e for curve in curves for e in curve})
            values = [[curve[e] for curve in curves if e in curve] for e in epochs]
            series.append(
                _Series(
                    method,
                    len(curves),
                    epochs,
                    [float(np.mean(v)) for v in values],
                    [float(np.std(v, ddof=1)) if len(v) > 1 else None for v in values],
                )
            )
        return series

    def _draw_series(self, axes: Any, series: Sequence[_Series]) -> None:
        last = max(max(s.epochs) for s in series)
        every = 1 if last <= _MARKED_EPOCHS else math.ceil(last / _MARKED_EPOCHS)
        colour_index = 0
        for line in series:
            style = _method_style(line.method, colour_index)
            colour_index += line.method != "baseline"
            label = line.method if line.networks == 1 else f"{line.method} (n={line.networks})"
            axes.plot(line.epochs, line.mean, label=label, markevery=every, **style)
            banded = [(e, m, s) for e, m, s in zip(line.epochs, line.mean, line.std) if s is not None]
            if banded:
                epochs, means, stds = zip(*banded)
                low = [m - s for m, s in zip(means, stds)]
                high = [m + s for m, s in zip(means, stds)]
                axes.fill_between(epochs, low, high, color=style["color"], alpha=0.2, linewidth=0)
        _integer_epochs(axes)

    def _caption(self, series: Sequence[_Series]) -> str:
        caption = f"runs in {self.source}"
        if any(s.networks > 1 for s in series):
            caption += "; lines: mean over a method's n networks, bands: ± 1 std"
        return caption

    # ---------------------------------------------------------------- the figures

    def accuracy(self, runs: Sequence[RunSummary]) -> None:
        """Test top-1 per epoch, a line (and band) per method."""
        series = self._series(runs, lambda r: r.get("test_acc"))
        if not series:
            return
        figure = self._figure(0.8)
        axes = figure.add_subplot()
        self._draw_series(axes, series)
        axes.set_ylabel("test top-1 (%)")
        axes.set_title(self._title(runs[0], "test accuracy"))
        axes.legend(loc="best")
        self._keep(figure, *self._experiment_name("accuracy", runs[0]), self._caption(series))

    def invalid_filters(self, runs: Sequence[RunSummary]) -> None:
        """Invalid filters per epoch, one panel per threshold of the paper."""
        from matplotlib.ticker import MaxNLocator

        panels = [(t, self._series(runs, _invalid_at(t))) for t in INVALID_THRESHOLDS]
        if not any(series for _, series in panels):
            return
        figure = self._figure(0.6 * len(panels) + 0.15)
        shown: list[_Series] = []
        for row, (threshold, series) in enumerate(panels, start=1):
            axes = figure.add_subplot(len(panels), 1, row)
            axes.set_ylabel(f"l1 < {threshold:g}")
            axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
            if not series:
                axes.text(0.5, 0.5, "not recorded", transform=axes.transAxes, ha="center", va="center")
                continue
            self._draw_series(axes, series)
            shown += series
            highest = max(max(s.mean) for s in series)
            if highest == 0:  # a flat line at 0 on an axis from -0.04 to 0.04 says nothing
                axes.set_ylim(-0.05, 1)
                axes.text(
                    0.5, 0.6, "0 in every epoch, every method", transform=axes.transAxes, ha="center", va="center"
                )
            else:
                axes.set_ylim(bottom=0)
            if row == 1:
                axes.legend(loc="best")
        figure.axes[0].set_title(self._title(runs[0], "invalid filters (l1 norm below t)"))
        self._keep(figure, *self._experiment_name("invalid_filters", runs[0]), self._caption(shown))

    def filter_norms(self, runs: Sequence[RunSummary]) -> None:
        """The l1-norm histogram of network 1's checkpoint of every run."""
        import numpy as np

        found = []
        for run in runs:
            files = NetworkFiles(run.folder, 1)
            path = files.best if self.checkpoint == "best" else files.last
            if path.exists():
                norms = conv_filter_norms(load_trained_weights(path))
                if norms.numel():
                    found.append((run, norms.numpy()))
        if not found:
            return
        highest = max(float(values.max()) for _, values in found)
        top = max(1, math.ceil(math.log10(max(highest, 1e-3))))
        edges = np.logspace(-3, top, 8 * (top + 3) + 1)
        figure = self._figure(0.8)
        axes = figure.add_subplot()
        methods = [run.method for run, _ in found]
        colour_index = 0
        for run, values in found:
            style = _method_style(run.method, colour_index)
            colour_index += run.method != "baseline"
            name = run.method if methods.count(run.method) == 1 else f"{run.method}, {run_label(run, self.source)}"
            invalid = int((values < PAPER_THRESHOLD).sum())
            axes.hist(
                np.clip(values, edges[0], edges[-1]),
                bins=edges,
                histtype="step",
                linewidth=1.2,
                color=style["color"],
                linestyle=style["linestyle"],
                label=f"{name}: {invalid}/{values.size} < {PAPER_THRESHOLD:g}",
            )
        for threshold in INVALID_THRESHOLDS:
            axes.axvline(threshold, color="grey", linestyle=":", linewidth=1)
        axes.set_xscale("log")
        axes.set_xlabel("filter l1 norm (below 0.001 drawn at 0.001)")
        axes.set_ylabel("filters")
        grafted = any(m != "baseline" for m in methods)
        what = "baseline vs grafted" if grafted and "baseline" in methods else "grafted" if grafted else "baseline"
        axes.set_title(self._title(runs[0], f"filter l1 norms, {what}"))
        axes.legend(loc="upper left")
        caption = f"{self.checkpoint}.pt of network 1 of each run in {self.source}"
        self._keep(figure, *self._experiment_name("filter_norms", runs[0]), caption)

    def alphas(self, run: RunSummary) -> None:
        """Every layer's coefficient over the epochs, one heat map per network, centred at 0.5."""
        from matplotlib.ticker import MaxNLocator

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
        values = [v for _, field, _, records in panels for r in records for v in r[field].values()]
        spread = max([abs(float(v) - 0.5) for v in values if v is not None and math.isfinite(v)] + [0.0])
        spread = max(spread, 0.005)  # all at 0.5 exactly: still a scale
        layers = max(len(keys) for _, _, keys, _ in panels)
        panel_height = min(4.0, max(1.3, 0.09 * layers + 0.6))  # inches
        figure = self.Figure(figsize=(self.width, panel_height * len(panels) + 0.5), layout="constrained")
        label_every = max(1, math.ceil(layers / ((panel_height - 0.6) * 72 / (1.3 * MIN_FONT_PT))))
        for row, (net, field, keys, records) in enumerate(panels, start=1):
            epochs = [r["epoch"] for r in records]
            grid = [[(r.get(field) or {}).get(k, math.nan) for r in records] for k in keys]
            axes = figure.add_subplot(len(panels), 1, row)
            axes.grid(False)
            image = axes.imshow(
                grid,
                aspect="auto",
                cmap="coolwarm",
                vmin=0.5 - spread,
                vmax=0.5 + spread,
                interpolation="nearest",
                extent=(min(epochs) - 0.5, max(epochs) + 0.5, len(keys) - 0.5, -0.5),
            )
            shown = range(0, len(keys), label_every)
            axes.set_yticks(list(shown), [keys[i].removesuffix(".weight") for i in shown])
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.set_xlabel("epoch (grafted)")
            axes.set_title(f"network {net}")
            figure.colorbar(image, ax=axes, label="alpha" if field == "alphas" else "w")
        what = "alpha per layer" if panels[0][1] == "alphas" else "mean filter weight w per conv"
        figure.suptitle(self._title(run, what))
        label = run_label(run, self.source)
        caption = f"run {label}; above 0.5 a network keeps more of its own weights"
        self._keep(figure, f"alpha_{label}", str(Path(os.path.abspath(run.folder))), caption)


def make_figures(
    runs: Sequence[RunSummary],
    *,
    source: str | Path | None = None,
    checkpoint: str = "best",
    width: float = COLUMN_WIDTH_IN,
) -> list[NamedFigure]:
    """Every figure of ``runs`` (see the module's documentation), unsaved; ``source``: the folder the runs
    were found in, which captions name and run labels are relative to."""
    if not runs:
        return []
    if source is None:
        source = os.path.commonpath([os.path.abspath(run.folder) for run in runs])
    plotter = _Plotter(runs, str(source), checkpoint, width)
    experiments: dict[tuple[str, str, bool, str], list[RunSummary]] = {}
    for run in runs:
        experiments.setdefault(run.experiment, []).append(run)
    with _style():
        for _, members in sorted(experiments.items()):
            members.sort(key=lambda r: (r.method != "baseline", r.method, str(r.folder)))
            plotter.accuracy(members)
            plotter.invalid_filters(members)
            plotter.filter_norms(members)
            for run in members:
                plotter.alphas(run)
    return plotter.figures


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        yield


def plot_runs(
    runs: Sequence[RunSummary],
    out: str | Path,
    *,
    source: str | Path | None = None,
    checkpoint: str = "best",
    file_format: str = "png",
    dpi: int = DEFAULT_DPI,
    width: float = COLUMN_WIDTH_IN,
) -> list[Path]:
    """Write every figure of ``runs`` into the folder ``out`` (created) as ``file_format`` files and return
    their paths."""
    if file_format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {file_format!r}")
    out = _output_folder(Path(out))
    written = []
    with _style():
        for item in make_figures(runs, source=source, checkpoint=checkpoint, width=width):
            path = out / f"{item.name}.{file_format}"
            # No creation date in PDF and SVG files: the same runs give the same bytes.
            metadata = {"png": {}, "pdf": {"CreationDate": None}, "svg": {"Date": None}}[file_format]
            item.figure.savefig(path, dpi=dpi, format=file_format, metadata=metadata)
            written.append(path)
    return written


def _output_folder(out: Path) -> Path:
    """``out``, created; a one-line UsageError when a file is in the way or it cannot be created."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder for the figures")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the --out folder {out} ({err.strerror or err}); pass another folder") from None
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of ``graft-plot``."""
    parser = ArgumentParser(
        prog="graft-plot",
        description="Figures of run folders for papers and slides: accuracy, invalid filters, filter-norm "
        "distributions, grafting coefficients.",
    )
    add_folders_argument(parser, "drawn")
    parser.add_argument(
        "--out", default=None, metavar="DIR", help="folder for the figure files (default: <first FOLDER>/plots)"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="png",
        help="png (raster), pdf or svg (vector, for papers) (default: png)",
    )
    parser.add_argument(
        "--dpi",
        type=bounded(int, 50, 1200),
        default=DEFAULT_DPI,
        help=f"resolution of PNG files and of heat maps (default: {DEFAULT_DPI})",
    )
    parser.add_argument(
        "--width",
        type=bounded(float, 2.0, 20.0, "a number of inches"),
        default=COLUMN_WIDTH_IN,
        metavar="INCHES",
        help=f"figure width; fonts stay {MIN_FONT_PT:g} pt (default: {COLUMN_WIDTH_IN:g}, one paper column)",
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
    written = plot_runs(
        runs,
        out,
        source=args.folders[0] if len(args.folders) == 1 else None,
        checkpoint=args.checkpoint,
        file_format=args.format,
        dpi=args.dpi,
        width=args.width,
    )
    for path in written:
        print(path)
    if not written:
        print(f"nothing to draw yet: no run under {', '.join(args.folders)} has finished an epoch")


if __name__ == "__main__":
    main(None)
