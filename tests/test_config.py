"""The run configuration (grafting/train/config.py): one owner of every flag, its default, whether it is
fixed on resume and whether the peers of a ring must agree on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grafting.errors import GraftingError, PeerMismatchError, UsageError
from grafting.method.weighting import DEFAULT_A, DEFAULT_C
from grafting.ring.grafter import Grafter
from grafting.train.cli import build_parser
from grafting.train.config import CifarConfig, ImagenetConfig, RunConfig
from grafting.train.files import prepare_run_files
from grafting_cifar.train import parse_args as parse_cifar
from grafting_imagenet.train import parse_args as parse_imagenet

SCRIPTS = {"cifar": (CifarConfig, "graft-cifar"), "imagenet": (ImagenetConfig, "graft-imagenet")}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_flag_is_fixed_on_resume_or_listed_as_free(script: str) -> None:
    """A new flag cannot be forgotten: each one's field says how --resume treats it."""
    config_cls, prog = SCRIPTS[script]
    parser = build_parser(config_cls, prog, "")
    fields = {f.name: f for f in config_cls.settings()}
    dests = {action.dest for action in parser._actions if action.dest != "help"}
    assert dests, "the parser has no flags"
    for dest in dests:
        assert dest in fields, f"{dest} is a flag without a configuration field"
        assert fields[dest].metadata["resume"] in ("fixed", "free"), dest
    fixed = set(config_cls.fixed_on_resume())
    free = {name for name, f in fields.items() if f.metadata["resume"] == "free"}
    assert fixed | free == set(fields) and not fixed & free
    # Everything that shapes the grafting is fixed, and the peers must agree on it.
    shaping = {
        "a",
        "c",
        "level",
        "graft_rule",
        "criterion",
        "source",
        "invalid_threshold",
        "distill",
        "kd_temperature",
        "kd_weight",
        "kd_soften_teacher",
        "model",
        "num_classes",
        "num",
        "lr",
        "seed",
    }
    assert shaping <= fixed, shaping - fixed
    assert shaping - {"seed"} <= set(config_cls.shared_by_peers())
    assert "epochs" in config_cls.shared_by_peers() and "epochs" not in fixed  # a finished run can be extended


def test_defaults_are_the_authors_and_written_once() -> None:
    cifar, imagenet = parse_cifar([]), parse_imagenet([])
    assert (cifar.a, cifar.c) == (imagenet.a, imagenet.c) == (DEFAULT_A, DEFAULT_C) == (0.4, 500.0)
    assert (cifar.epochs, cifar.lr, cifar.batch_size, cifar.weight_decay, cifar.step_epochs) == (
        200,
        0.1,
        128,
        5e-4,
        60,
    )
    assert (imagenet.epochs, imagenet.batch_size, imagenet.weight_decay, imagenet.step_epochs) == (90, 256, 1e-4, 30)
    assert (cifar.dataset, cifar.num_classes, cifar.cos) == ("cifar10", 10, False)
    assert imagenet.cos and not parse_imagenet(["--steplr"]).cos
    assert CifarConfig() == cifar  # the dataclass defaults are the command line's


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_shows_every_default_and_meaning(script: str) -> None:
    config_cls, prog = SCRIPTS[script]
    text = build_parser(config_cls, prog, "").format_help()
    assert "--epochs EPOCHS" in text and ("(default: 200)" in text or "(default: 90)" in text)
    for action in build_parser(config_cls, prog, "")._actions:
        assert action.help, f"{action.option_strings} has no help line"


def test_config_json_round_trip(tmp_path: Path) -> None:
    config = parse_cifar(["--s", str(tmp_path), "--a", "0.3", "--num", "2", "--i", "2"])
    files = prepare_run_files(config)
    saved = json.loads(files.config.read_text())
    assert saved["a"] == 0.3 and saved["i"] == 2 and saved["format"].startswith("filter-grafting-config/")
    config.check_resume(saved, "config.json")  # the same settings pass


CHANGED_ON_RESUME = [
    (["--a", "0.3"], "--a was 0.4", "is 0.3"),
    (["--c", "100"], "--c was 500.0", "is 100.0"),
    (["--wd", "1e-3"], "--wd/--weight-decay was 0.0005", "is 0.001"),
    (["--level", "filter"], "--level was 'layer'", "is 'filter'"),
    (["--criterion", "l1"], "--criterion was 'entropy'", "is 'l1'"),
    (["--graft-source", "noise"], "--graft-source was 'external'", "is 'noise'"),
    (["--lr", "0.05"], "--lr was 0.1", "is 0.05"),
]


@pytest.mark.parametrize("changed, before, after", CHANGED_ON_RESUME, ids=[c[0][0] for c in CHANGED_ON_RESUME])
def test_resume_with_a_changed_grafting_setting_is_one_line_naming_both_values(
    tmp_path: Path, changed, before, after
) -> None:
    base = ["--s", str(tmp_path), "--num", "2", "--i", "1"]
    prepare_run_files(parse_cifar(base))
    with pytest.raises(GraftingError) as caught:
        prepare_run_files(parse_cifar([*base, *changed, "--resume"]))
    message = str(caught.value)
    assert "\n" not in message and before in message and after in message, message


def test_resume_may_change_what_does_not_shape_the_run(tmp_path: Path) -> None:
    base = ["--s", str(tmp_path), "--num", "2", "--i", "1"]
    prepare_run_files(parse_cifar(base))
    prepare_run_files(
        parse_cifar(
            [
                *base,
                "--resume",
                "--epochs",
                "300",
                "--threads",
                "1",
                "--peer-timeout",
                "60",
                "--data",
                "/elsewhere",
                "--no-channels-last",
            ]
        )
    )


def test_peers_with_different_a_stop_before_any_weights_are_mixed(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    peer = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    one = parse_cifar(["--s", str(tmp_path), "--num", "2", "--i", "1", "--a", "0.4"])
    two = parse_cifar(["--s", str(tmp_path), "--num", "2", "--i", "2", "--a", "0.2"])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with (
        Grafter(tmp_path, 1, 2, a=one.a, meta=one.peer_settings()) as mine,
        Grafter(tmp_path, 2, 2, a=two.a, meta=two.peer_settings()) as theirs,
    ):
        mine.publish(net, 1)
        theirs.publish(peer, 1)
        with pytest.raises(PeerMismatchError) as caught:
            mine.graft(net, 1)
    message = str(caught.value)
    assert "\n" not in message and "a=0.2" in message and "a=0.4" in message, message
    state = net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--s", ""], "--s is empty"),
        (["--seed", "99999999999999999999999"], "--seed must lie in"),
        (["--seed", "-1"], "--seed must lie in"),
        (["--kd-weight", "nan"], "--kd-weight"),
        (["--kd-temperature", "inf"], "--kd-temperature"),
        (["--invalid-threshold", "nan"], "--invalid-threshold"),
        (["--lr", "1e39"], r"--lr must be at most 3\.4e\+38 \(the largest float32, the weights' type\), got 1e\+39"),
        (["--wd", "1e39"], r"--wd/--weight-decay must be at most 3\.4e\+38"),
        (["--momentum", "1e39"], r"--momentum must be at most 3\.4e\+38"),
    ],
)
def test_bad_values_are_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_cifar(argv)


def test_a_subclass_field_keeps_the_base_fields_meaning() -> None:
    fields = {f.name: f for f in RunConfig.settings()}
    assert fields["epochs"].metadata["help"] == {f.name: f for f in CifarConfig.settings()}["epochs"].metadata["help"]
    assert CifarConfig.flag_of("print_freq") == "--print_frequence/--print-freq"
    assert ImagenetConfig.flag_of("model") == "--arch"
