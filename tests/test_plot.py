"""graft-plot (grafting/tools/plot.py): figures from run folders written here by hand (config.json,
metrics.jsonl with coefficients and invalid-filter counts, best.pt), checked through matplotlib's own
objects (tick values, font sizes, labels, colour limits), the files in each format, and the one-line
errors."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from grafting.archs import cifar_models as models
from grafting.tools import plot as plot_tool
from grafting.tools.runs import find_runs

CONFIG = {
    "model": "resnet20",
    "dataset": "cifar10",
    "num_classes": 10,
    "epochs": 4,
    "a": 0.4,
    "c": 500.0,
    "level": "layer",
    "criterion": "entropy",
    "source": "external",
    "distill": "none",
    "cos": True,
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_network(
    folder: Path,
    net: int,
    config: dict,
    grafted: bool,
    zeroed: int,
    invalid: bool = True,
    shift: float = 0.0,
    checkpoint: bool = True,
) -> None:
    """net<i>/config.json, metrics.jsonl of 4 epochs (test top-1 20 + 10 * epoch + net + shift), and (with
    ``checkpoint``) best.pt with ``zeroed`` filters of conv1 at 0."""
    sub = folder / f"net{net}"
    sub.mkdir(parents=True)
    (sub / "config.json").write_text(json.dumps({**config, "i": net}))
    records = []
    for epoch in range(1, 5):
        record = {
            "epoch": epoch,
            "epochs": 4,
            "test_acc": 20.0 + 10 * epoch + net + shift,
            "test_acc5": None,
            "invalid_filters": {"0.1": 10 - epoch, "0.01": 5 - epoch} if invalid else {"0.1": 0, "0.01": 0},
            "total_filters": 688,
        }
        if grafted and epoch < 4:  # the last epoch does not graft
            record["alphas"] = {"conv1.weight": 0.3 + 0.1 * epoch, "layer1.0.conv1.weight": 0.6}
        records.append(json.dumps(record))
    (sub / "metrics.jsonl").write_text("\n".join(records) + "\n")
    if not checkpoint:
        return
    torch.manual_seed(net)
    state = models.create("resnet20").state_dict()
    state["conv1.weight"][:zeroed] = 0.0
    torch.save({"model": state, "acc": 60.0, "epoch": 3}, sub / "best.pt")


def _ring(folder: Path, config: dict | None = None, **kwargs) -> Path:
    for net in (1, 2):
        _write_network(folder, net, {**(config or CONFIG), "num": 2}, grafted=True, zeroed=1, **kwargs)
    return folder


def _baseline(folder: Path, config: dict | None = None, **kwargs) -> Path:
    _write_network(folder, 1, {**(config or CONFIG), "num": 1}, grafted=False, zeroed=6, **kwargs)
    return folder


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A baseline and two rings of the same recipe: 4 grafted networks."""
    try:  # an optional dependency of the project, but the test environment must have it (scripts/env.sh)
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.fail("matplotlib is missing from the test environment: python -m pip install matplotlib")
    runs = tmp_path_factory.mktemp("runs")
    _baseline(runs / "base")
    _ring(runs / "graft")
    _ring(runs / "graft2", shift=4.0)
    return runs


@pytest.fixture(scope="module")
def figures(experiment: Path) -> dict[str, object]:
    """The figures of ``experiment`` by name, laid out (ticks and texts final)."""
    made = plot_tool.make_figures(find_runs([experiment]), source=experiment)
    for item in made:
        item.figure.draw_without_rendering()
    return {item.name: item.figure for item in made}


def _texts(figure) -> list:
    from matplotlib.text import Text

    return [t for t in figure.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _caption(figure) -> str:
    return figure._supxlabel.get_text().replace("\n", " ")


def test_one_figure_of_each_kind_per_experiment_and_per_grafted_run(figures):
    assert sorted(figures) == [
        "accuracy_resnet20_cifar10",
        "alpha_graft",
        "alpha_graft2",
        "filter_norms_resnet20_cifar10",
        "invalid_filters_resnet20_cifar10",
    ]


def test_every_text_is_at_least_8_pt_at_a_single_column_width(figures):
    for name, figure in figures.items():
        assert figure.get_figwidth() == pytest.approx(plot_tool.COLUMN_WIDTH_IN), name
        small = [(t.get_text(), t.get_fontsize()) for t in _texts(figure) if t.get_fontsize() < plot_tool.MIN_FONT_PT]
        assert not small, f"{name}: text below {plot_tool.MIN_FONT_PT} pt: {small}"


def test_epoch_axes_have_whole_epoch_ticks(figures):
    checked = 0
    for name, figure in figures.items():
        for axes in figure.axes:
            if not axes.get_xlabel().startswith("epoch"):
                continue
            low, high = axes.get_xlim()
            ticks = [t for t in axes.get_xticks() if low <= t <= high]
            assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)
            labels = [t.get_text() for t in axes.get_xticklabels() if t.get_text()]
            assert all("." not in label for label in labels), (name, labels)
            checked += 1
    assert checked == 1 + 2 + 2 * 2  # accuracy, invalid filters (2 panels), alpha of 2 rings (2 networks each)


def test_legends_name_methods_and_the_caption_names_the_folder(figures, experiment):
    accuracy = figures["accuracy_resnet20_cifar10"]
    [axes] = accuracy.axes
    labels = [t.get_text() for t in axes.get_legend().get_texts()]
    assert labels == ["baseline", "cos (n=4)"]  # 4 networks of two rings, one line
    assert str(experiment) not in axes.get_title() and "graft" not in " ".join(labels)
    assert axes.get_title() == "resnet20, cifar10: test accuracy"
    caption = _caption(accuracy)
    assert caption.startswith(f"runs in {experiment}") and "± 1 std" in caption
    for name, figure in figures.items():
        legend_texts = [t.get_text() for a in figure.axes if a.get_legend() for t in a.get_legend().get_texts()]
        assert all(len(text) <= 40 for text in legend_texts), (name, legend_texts)
        assert str(experiment) not in " ".join(legend_texts)


def test_a_method_with_several_networks_is_its_mean_with_a_band_of_one_std(figures):
    import numpy as np
    from matplotlib.collections import PolyCollection

    [axes] = figures["accuracy_resnet20_cifar10"].axes
    lines = {line.get_label(): line for line in axes.get_lines()}
    epochs = [1, 2, 3, 4]
    # networks 1 and 2 of two rings, the second shifted by 4: 20 + 10e + {1, 2, 5, 6}
    values = np.array([[20 + 10 * e + k for k in (1, 2, 5, 6)] for e in epochs])
    assert list(lines["cos (n=4)"].get_xdata()) == epochs
    assert np.allclose(lines["cos (n=4)"].get_ydata(), values.mean(axis=1))
    assert list(lines["baseline"].get_ydata()) == [20 + 10 * e + 1 for e in epochs]
    assert lines["baseline"].get_linestyle() == "--"
    [band] = [c for c in axes.collections if isinstance(c, PolyCollection)]  # no band for the lone baseline
    outline = band.get_paths()[0].vertices
    std = values.std(axis=1, ddof=1)
    assert np.isclose(outline[:, 1].max(), (values.mean(axis=1) + std).max())
    assert np.isclose(outline[:, 1].min(), (values.mean(axis=1) - std).min())


def test_alpha_scale_is_centred_at_one_half_and_spans_the_data(figures):
    figure = figures["alpha_graft"]
    images = [image for axes in figure.axes for image in axes.get_images()]
    assert len(images) == 2  # a heat map per network
    for image in images:
        low, high = image.get_clim()
        # alphas 0.4, 0.5, 0.6 and 0.6: the scale is 0.5 ± 0.1, not 0 to 1
        assert (low, high) == pytest.approx((0.4, 0.6))
    heat_maps = [axes for axes in figure.axes if axes.get_images()]
    assert [t.get_text() for t in heat_maps[0].get_yticklabels()] == ["conv1", "layer1.0.conv1"]
    assert "above 0.5 a network keeps more of its own" in _caption(figure)


def test_titles_say_only_what_the_folder_holds(tmp_path):
    grafted_only = _ring(tmp_path / "only" / "graft")
    [norms] = [
        f for f in plot_tool.make_figures(find_runs([grafted_only]), source=grafted_only) if f.name.startswith("filter")
    ]
    title = norms.figure.axes[0].get_title()
    assert "baseline" not in title and title.endswith("filter l1 norms, grafted"), title
    legend = [t.get_text() for t in norms.figure.axes[0].get_legend().get_texts()]
    assert legend == ["cos: 1/688 < 0.1"]


def test_all_zero_invalid_filters_get_an_axis_that_makes_sense(tmp_path):
    root = tmp_path / "clean"
    _baseline(root / "base", invalid=False, checkpoint=False)
    _ring(root / "graft", invalid=False, checkpoint=False)
    [figure] = [
        f.figure for f in plot_tool.make_figures(find_runs([root]), source=root) if f.name.startswith("invalid")
    ]
    figure.draw_without_rendering()
    for axes in figure.axes:
        low, high = axes.get_ylim()
        assert low <= 0 and high >= 1, (low, high)  # not -0.04 .. 0.04
        ticks = [t for t in axes.get_yticks() if low <= t <= high]
        assert all(float(t).is_integer() for t in ticks) and 0 in ticks, ticks
        assert any("0 in every epoch" in t.get_text() for t in axes.texts)
        # the two methods' lines lie on each other: they differ in style and marker
        styles = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in axes.get_lines()}
        assert len(styles) == 2


def test_generated_stand_ins_say_so_and_two_of_them_are_two_experiments(tmp_path):
    root = tmp_path / "stand-ins"
    small = {**CONFIG, "generated_data": True, "stand_in": "CIFAR-10 layout, 1000 train and 200 test images, seed 0"}
    large = {**small, "stand_in": "CIFAR-10 layout, 2000 train and 500 test images, seed 0"}
    _ring(root / "small", small, checkpoint=False)
    _ring(root / "large", large, checkpoint=False)
    made = plot_tool.make_figures(find_runs([root]), source=root)
    accuracy = [f for f in made if f.name.startswith("accuracy")]
    assert len(accuracy) == 2 and len({f.name for f in made}) == len(made)
    titles = sorted(f.figure.axes[0].get_title().replace("\n", " ") for f in accuracy)
    assert all("GENERATED stand-in" in title for title in titles)
    assert "1000 train" in titles[0] and "2000 train" in titles[1]


def test_runs_whose_names_read_alike_get_files_of_their_own(tmp_path, capsys):
    root = tmp_path / "runs"
    _ring(root / "x" / "y_z", checkpoint=False)
    _ring(root / "x_y" / "z", shift=3.0, checkpoint=False)
    plot_tool.main([str(root), "--out", str(tmp_path / "figures"), "--dpi", "50"])
    printed = capsys.readouterr().out.split()
    alphas = [Path(p).name for p in printed if Path(p).name.startswith("alpha_")]
    assert len(alphas) == 2 and len(set(alphas)) == 2, printed  # today: alpha_x_y_z.png twice, one overwritten
    assert len(set(printed)) == len(printed) and all(Path(p).is_file() for p in printed)


@pytest.mark.parametrize("file_format", plot_tool.FORMATS)
def test_each_format_and_resolution(file_format, experiment, tmp_path):
    out = tmp_path / "figures"
    written = plot_tool.plot_runs(
        find_runs([experiment / "graft"]), out, source=experiment, file_format=file_format, dpi=100
    )
    names = ("accuracy_resnet20_cifar10", "invalid_filters_resnet20_cifar10", "filter_norms_resnet20_cifar10")
    assert [p.name for p in written] == [f"{name}.{file_format}" for name in (*names, "alpha_graft")]
    start = written[0].read_bytes()[:8]
    if file_format == "png":
        assert start == PNG_SIGNATURE
        with Image.open(written[0]) as image:
            assert image.size[0] == pytest.approx(plot_tool.COLUMN_WIDTH_IN * 100, abs=2)  # width x dpi
    elif file_format == "pdf":
        assert start.startswith(b"%PDF")
    else:
        assert b"<svg" in written[0].read_bytes()[:1000]


def test_the_command_line_writes_and_lists_the_figures(experiment, tmp_path):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        plot_tool.main([str(experiment / "base"), "--out", str(tmp_path / "f"), "--format", "svg", "--width", "7"])
    paths = printed.getvalue().split()
    assert [Path(p).name for p in paths] == [
        "accuracy_resnet20_cifar10.svg",
        "invalid_filters_resnet20_cifar10.svg",
        "filter_norms_resnet20_cifar10.svg",
    ]
    assert 'width="504pt"' in Path(paths[0]).read_text()  # 7 inches


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "{file}"], "--out {file} is a file; pass a folder"),
        (["--format", "jpg"], "argument --format: invalid choice"),
        (["--dpi", "0"], "argument --dpi: 0 must lie in 50..1200"),
        (["--width", "x"], "argument --width: 'x' is not a number of inches"),
    ],
)
def test_bad_flags_are_one_line_with_exit_code_2(argv, message, experiment, tmp_path, capsys):
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    argv = [a.replace("{file}", str(in_the_way)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        plot_tool.main([str(experiment / "base"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.replace("{file}", str(in_the_way)) in err, err


def test_without_matplotlib_graft_plot_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as exit_info:
        plot_tool.main([str(tmp_path), "--out", str(tmp_path / "figures")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err == f"error: {plot_tool.MATPLOTLIB_MISSING}\n"
    assert "python -m pip install matplotlib" in err
    assert not (tmp_path / "figures").exists()


def test_the_plot_extra_names_matplotlib():
    setup = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    assert '"plot": ["matplotlib"]' in setup and "graft-plot=grafting.tools.plot:main" in setup
