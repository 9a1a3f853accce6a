"""graft-plot (grafting/tools/plot.py): PNG figures from run folders written here by hand (config.json,
metrics.jsonl with coefficients and invalid-filter counts, best.pt), and its one-line error without
matplotlib."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from grafting.archs import cifar_models as models
from grafting.tools import plot as plot_tool

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


def _write_network(folder: Path, net: int, config: dict, grafted: bool, zeroed: int) -> None:
    """net<i>/config.json, metrics.jsonl of 4 epochs, and best.pt with ``zeroed`` filters of conv1 at 0."""
    sub = folder / f"net{net}"
    sub.mkdir(parents=True)
    (sub / "config.json").write_text(json.dumps({**config, "i": net}))
    records = []
    for epoch in range(1, 5):
        record = {
            "epoch": epoch,
            "epochs": 4,
            "test_acc": 20.0 + 10 * epoch + net,
            "test_acc5": None,
            "invalid_filters": {"0.1": 10 - epoch, "0.01": 5 - epoch},
            "total_filters": 688,
        }
        if grafted and epoch < 4:  # the last epoch does not graft
            record["alphas"] = {"conv1.weight": 0.3 + 0.1 * epoch, "layer1.0.conv1.weight": 0.6}
        records.append(json.dumps(record))
    (sub / "metrics.jsonl").write_text("\n".join(records) + "\n")
    torch.manual_seed(net)
    state = models.create("resnet20").state_dict()
    state["conv1.weight"][:zeroed] = 0.0
    torch.save({"model": state, "acc": 60.0, "epoch": 3}, sub / "best.pt")


@pytest.fixture(scope="module")
def plotted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Two runs of one experiment (a baseline and a 2-network ring) drawn once; returns the output folder and
    the printed lines."""
    try:  # an optional dependency of the project, but the test environment must have it (scripts/env.sh)
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.fail("matplotlib is missing from the test environment: python -m pip install matplotlib")
    runs = tmp_path_factory.mktemp("runs")
    _write_network(runs / "base", 1, {**CONFIG, "num": 1}, grafted=False, zeroed=6)
    for net in (1, 2):
        _write_network(runs / "graft", net, {**CONFIG, "num": 2}, grafted=True, zeroed=1)
    out = runs / "figures"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        plot_tool.main([str(runs), "--out", str(out)])
    return out, printed.getvalue().splitlines()


def test_the_figures_are_written_as_png_files(plotted):
    out, printed = plotted
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "accuracy_resnet20_cifar10.png",
        "alpha_graft.png",
        "filter_norms_resnet20_cifar10.png",
        "invalid_filters_resnet20_cifar10.png",
    ]
    assert sorted(Path(line).name for line in printed) == names
    for name in names:
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            width, height = image.size
            assert width >= 600 and height >= 300
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is not None and len(colours) > 20, f"{name} looks empty"


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
