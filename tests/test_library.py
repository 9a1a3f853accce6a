"""The public ``Grafter`` as safe as the training scripts, in one process:
a fresh start never grafts another run's files, the rule is chosen from the model and checked before
any training, calls in the wrong order fail at once, and every message names the library's arguments
and methods, never the scripts' flags."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import one_line, same_weights
from torch import nn

from grafting import Grafter
from grafting.errors import GraftingError, LockError, PeerTimeoutError, UsageError
from grafting.method.graft import graft_layers
from grafting.ring.exchange import Exchange
from grafting.ring.grafter import check_grafting
from grafting.train.config import SCRIPT_WORDING


def tiny_model(seed: int = 0) -> nn.Module:
    """Keys ``0.weight`` ...: no key says ``conv``, so the published name rule cannot group it."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def copy_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def leave_a_killed_run(root: Path, epochs: int = 2) -> str:
    """What an unfinished first run leaves: both networks published ``epochs`` epochs and never finished
    (closed without finish(), as a crash or Ctrl-C leaves them). Returns that ring's identity."""
    one, two = Grafter(root, 1, 2), Grafter(root, 2, 2)
    one.open()
    two.open()
    models = [tiny_model(1), tiny_model(2)]
    for epoch in range(1, epochs + 1):
        one.publish(models[0], epoch)
        two.publish(models[1], epoch)
        one.graft(models[0], epoch)
        two.graft(models[1], epoch)
    one.close()
    two.close()
    assert one.ring is not None
    return one.ring


# ----------------------------------------------------------------------------------------------
# A fresh Grafter never grafts another run's files


def test_a_fresh_start_refuses_a_killed_runs_files_and_says_both_ways_on(tmp_path: Path) -> None:
    """Network 2 started alone in the folder of a run that never finished refuses that run's files before
    anything is trained or written (it used to graft the dead run's network 1 at once)."""
    ring = leave_a_killed_run(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    fresh = Grafter(tmp_path, 2, 2)
    with pytest.raises(GraftingError) as caught:
        fresh.open()
    message = one_line(str(caught.value))
    assert message == (
        f"{tmp_path} holds exchange files this Grafter did not write: net1_epoch1.tensors, net1_epoch2.tensors "
        f"(network 1 is not running); net2_epoch1.tensors, net2_epoch2.tensors (network 2 has published nothing "
        f"since it started); they are another run's (ring {ring}): start this run in a new root folder, or "
        f"continue that run: restart this network from its last checkpoint with Grafter(..., ring='{ring}')"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a refused start changes nothing"
    with pytest.raises(UsageError, match=r"Grafter.step\(\) before open\(\)"):
        fresh.step(tiny_model(), 1)

    # Both ways on work as written: continuing that ring with ring= ...
    with Grafter(tmp_path, 2, 2, ring=ring) as resumed:
        assert resumed.ring == ring
    # ... or a new folder.
    with Grafter(tmp_path / "new", 2, 2) as elsewhere:
        assert elsewhere.ring != ring


def test_a_late_network_joins_a_running_ring_but_not_its_stopped_networks(tmp_path: Path) -> None:
    early = Grafter(tmp_path, 1, 3)
    early.open()
    model = tiny_model(1)
    early.publish(model, 1)  # network 1 of 3 is one epoch along; networks 2 and 3 start late
    with Grafter(tmp_path, 3, 3) as late:
        assert late.ring == early.ring
    # The same file left by a network that is not running any more is another run's.
    early.close()  # a close() without finish(): its heartbeat stays fresh for minutes, its owner is gone
    with pytest.raises(GraftingError, match=r"net1_epoch1\.tensors \(network 1 is not running\)"):
        Grafter(tmp_path, 2, 3).open()


def test_a_fresh_heartbeat_of_a_dead_process_is_not_a_running_network(tmp_path: Path) -> None:
    """Killed seconds ago, a network's heartbeat still looks fresh: its lock names a process of this machine
    that is gone."""
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process has it
    with Exchange(tmp_path, 1, 2) as exchange:
        exchange.publish(1, tiny_model().state_dict(), {})
    (tmp_path / "net1.alive").write_text(f"{time.time()}\n")
    (tmp_path / "net1.lock").write_text(f"{dead} {socket.gethostname()} 2026-01-01T00:00:00\n")
    with pytest.raises(GraftingError, match=r"net1_epoch1\.tensors \(network 1 is not running\)"):
        Grafter(tmp_path, 2, 2).open()
    # On another machine only the heartbeat can tell: fresh, so network 1 counts as running.
    (tmp_path / "net1.lock").write_text("4242 another-host 2026-01-01T00:00:00\n")
    with Grafter(tmp_path, 2, 2):
        pass


def test_files_without_a_ring_json_are_another_runs(tmp_path: Path) -> None:
    leave_a_killed_run(tmp_path, epochs=1)
    (tmp_path / "ring.json").unlink()
    with pytest.raises(GraftingError, match=r"net1_epoch1\.tensors \(no ring\.json names their ring\)"):
        Grafter(tmp_path, 2, 2).open()


def test_a_finished_ring_leaves_nothing_a_new_run_could_graft(tmp_path: Path) -> None:
    """After finish() only ring.json stays: a second run in the folder starts, and grafts its own files only."""
    with Grafter(tmp_path, 1, 2) as one, Grafter(tmp_path, 2, 2) as two:  # the first run, to its end
        models = [tiny_model(1), tiny_model(2)]
        one.publish(models[0], 1)
        two.publish(models[1], 1)
        one.graft(models[0], 1)
        two.graft(models[1], 1)
        one.finish()
        two.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ring.json"]
    with Grafter(tmp_path, 1, 2) as one, Grafter(tmp_path, 2, 2) as two:
        models = [tiny_model(3), tiny_model(4)]
        expected = copy_of(models[0])
        one.publish(models[0], 1)
        two.publish(models[1], 1)
        peer = copy_of(models[1])
        one.graft(models[0], 1)
    reference = tiny_model(0)
    reference.load_state_dict(expected)
    graft_layers(reference, peer, rule="module")
    assert same_weights(models[0], reference.state_dict())


# ----------------------------------------------------------------------------------------------
# The rule from the model, checked before any training


def test_the_rule_is_chosen_from_the_model(tmp_path: Path) -> None:
    """torchvision's MobileNetV3 has no key that says conv: the published name rule cannot group it, and
    the default (chosen from the model, as the scripts do) is the module rule."""
    models = [torchvision.models.mobilenet_v3_small(num_classes=10) for _ in range(2)]
    with Grafter(tmp_path / "mobilenet", 1, 2, model=models[0]) as one, Grafter(tmp_path / "mobilenet", 2, 2) as two:
        assert one.rule == "module"
        one.publish(models[0], 1)
        two.publish(models[1], 1)
        report = one.graft(models[0], 1)
    assert report.grafted and len(report.layers) > 50
    resnet = torchvision.models.resnet18(num_classes=10)
    assert Grafter(tmp_path, 1, 2, model=resnet).rule == "name"
    # Without model= it is chosen at the first publish, and travels in the exchange file's meta.
    with Grafter(tmp_path / "late", 1, 2) as one, Grafter(tmp_path / "late", 2, 2) as two:
        assert one.rule is None
        one.publish(tiny_model(1), 1)
        two.publish(tiny_model(2), 1)
        assert one.rule == "module" and one.graft(tiny_model(1), 1).grafted


def test_a_wrong_explicit_rule_or_level_fails_before_any_training(tmp_path: Path) -> None:
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    with pytest.raises(UsageError) as caught:
        Grafter(tmp_path, 1, 2, model=model, rule="name")
    assert one_line(str(caught.value)) == (
        "the name rule needs the first state_dict entry to be a conv (a key containing 'conv'), but it is "
        "'features.0.0.weight'; use rule='module'"
    )
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(
        UsageError, match=r"filter-level grafting needs convolutions followed by BatchNorm; use level='layer'"
    ):
        Grafter(tmp_path, 1, 2, model=mlp, level="filter")
    # The same check at the first sight of the model, before any file is written or waited for.
    with Grafter(tmp_path, 1, 2, rule="name") as grafter:
        with pytest.raises(UsageError, match="use rule='module'"):
            grafter.publish(tiny_model(), 1)
    assert not list(tmp_path.glob("*.tensors"))
    # The scripts' words for the same check name their flags.
    with pytest.raises(UsageError, match="use --graft-rule module$"):
        Grafter(tmp_path, 1, 2, model=model, rule="name", wording=SCRIPT_WORDING)


# ----------------------------------------------------------------------------------------------
# Calls in the wrong order


def test_graft_before_publish_fails_at_once_instead_of_waiting_for_ever(tmp_path: Path) -> None:
    """Every network of a ring calling graft(model, e) before publish(model, e) deadlocked until the timeout
    while the messages said the peer was running."""
    with Grafter(tmp_path, 1, 2, peer_timeout=600) as one, Grafter(tmp_path, 2, 2, peer_timeout=600):
        started = time.monotonic()
        with pytest.raises(UsageError) as caught:
            one.graft(tiny_model(), 1)
        assert time.monotonic() - started < 1
    assert one_line(str(caught.value)) == (
        "graft(model, 1) before publish(model, 1): every network publishes an epoch before it waits for its "
        "peers' (else the ring waits for ever); call publish(model, 1) first, or step(model, 1)"
    )


def test_every_call_out_of_order_is_one_clear_error(tmp_path: Path) -> None:
    model = tiny_model()
    grafter = Grafter(tmp_path, 1, 2, peer_timeout=0.2)
    for call in (lambda: grafter.step(model, 1), lambda: grafter.publish(model, 1), lambda: grafter.graft(model, 1)):
        with pytest.raises(UsageError, match=r"^Grafter\.(step|publish|graft)\(\) before open\(\): use `with "):
            call()
    with pytest.raises(UsageError, match=r"Grafter.finish\(\) before open\(\)"):
        grafter.finish()
    with grafter, Grafter(tmp_path, 2, 2) as peer:
        grafter.publish(model, 1)
        with pytest.raises(UsageError, match=r"publish\(model, 2\) before graft\(model, 1\)"):
            grafter.publish(model, 2)
        with pytest.raises(PeerTimeoutError):
            grafter.graft(model, 1)  # network 2 has not published: waited for, as it should be
        with pytest.raises(UsageError, match=r"publish\(model, 1\) after epoch 1: each epoch is published once"):
            grafter.publish(model, 1)
        with pytest.raises(UsageError, match=r"graft\(model, 2\) before publish\(model, 2\)"):
            grafter.graft(model, 2)
        peer.publish(tiny_model(1), 1)
        assert grafter.graft(model, 1).grafted
        with pytest.raises(UsageError, match=r"graft\(model, 1\) after graft\(model, 1\): each epoch is grafted once"):
            grafter.graft(model, 1)
        with pytest.raises(UsageError, match=r"a model with 9 state_dict entries, not this one with 2"):
            grafter.publish(nn.Linear(2, 2), 2)
        grafter.finish()
        grafter.finish()  # a second call does nothing
        for call in (lambda: grafter.publish(model, 2), lambda: grafter.graft(model, 2), grafter.open):
            with pytest.raises(UsageError, match=r"after finish\(\): this network's run is over; a new run needs"):
                call()


def test_one_grafter_per_network_and_folder(tmp_path: Path) -> None:
    """A second Grafter of the same network in the same folder is refused, in this process and in another
    one; without open() it could publish and graft with no lock at all."""
    with Grafter(tmp_path, 1, 2):
        second = Grafter(tmp_path, 1, 2)
        with pytest.raises(UsageError) as caught:
            second.open()
        assert one_line(str(caught.value)) == (
            f"another Grafter of network 1 in {tmp_path} is open in this process: use that one, or close() it "
            f"first (one Grafter per network and folder)"
        )
        with pytest.raises(UsageError, match="before open"):
            second.publish(tiny_model(), 1)
        # Another process is kept out by the lock itself (tests/test_exchange.py starts one); its message:
        with pytest.raises(
            LockError, match=r"already being trained by .*; stop that process or use another root folder"
        ):
            Exchange(tmp_path, 1, 2).acquire()
    with Grafter(tmp_path, 1, 2):  # closed, the network is free again
        pass


# ----------------------------------------------------------------------------------------------
# The library's words


LIBRARY_MISUSE = {
    "a": lambda p: Grafter(p, 1, 2, a=5),
    "c": lambda p: Grafter(p, 1, 2, c=-1),
    "net": lambda p: Grafter(p, 3, 2),
    "num": lambda p: Grafter(p, 1, 0),
    "level": lambda p: Grafter(p, 1, 2, level="kernel"),
    "rule": lambda p: Grafter(p, 1, 2, rule="key"),
    "criterion": lambda p: Grafter(p, 1, 2, criterion="l2"),
    "source": lambda p: Grafter(p, 1, 2, source="telepathy"),
    "average": lambda p: Grafter(p, 1, 1, source="average"),
    "bn_blend": lambda p: Grafter(p, 1, 2, bn_blend="whole"),
    "bn_blend at layer level": lambda p: Grafter(p, 1, 2, bn_blend="repeated-whole"),
    "invalid_threshold": lambda p: Grafter(p, 1, 2, invalid_threshold=-1),
    "peer_timeout": lambda p: Grafter(p, 1, 2, peer_timeout=0),
    "root a file": lambda p: (p.write_text("x"), Grafter(p, 1, 2).open()),
    "peer timeout": lambda p: _timed_out(p),
    "ring of another run": lambda p: _joined_by_another_ring(p),
}


def _joined_by_another_ring(root: Path) -> None:
    with Grafter(root, 1, 2):
        pass
    Grafter(root, 2, 2, ring="0123456789ab").open()


def _timed_out(root: Path) -> None:
    with Grafter(root, 1, 2, peer_timeout=0.1) as grafter:
        (root / "net2").mkdir()  # network 2 ran once: "not running", with the advice to restart it
        grafter.step(tiny_model(), 1)


@pytest.mark.parametrize("case", list(LIBRARY_MISUSE))
def test_library_messages_name_its_arguments_never_the_scripts_flags(tmp_path: Path, case: str) -> None:
    with pytest.raises(GraftingError) as caught:
        LIBRARY_MISUSE[case](tmp_path / "root")
    message = one_line(str(caught.value))
    assert "--" not in message, message
    if case in (
        "a",
        "c",
        "net",
        "num",
        "level",
        "rule",
        "criterion",
        "source",
        "invalid_threshold",
        "peer_timeout",
        "bn_blend",
    ):
        assert message.split()[0].strip("'") in (case, "unknown") and (case in message), message
    if case == "average":
        assert message == "source='average' needs num=2 or more networks"
    if case == "bn_blend at layer level":
        assert message == "bn_blend='repeated-whole' only applies with level='filter'"
    if case == "peer timeout":
        assert "restart it from its last checkpoint with Grafter(..., ring='" in message, message
    if case == "ring of another run":
        assert "(the Grafter's ring=)" in message and "give each network's Grafter ring='0123456789ab'" in message


def test_the_scripts_get_the_same_messages_in_their_flags() -> None:
    settings = {"net": 1, "num": 1, "a": 0.4, "c": 500.0, "level": "layer", "rule": None, "criterion": "entropy"}
    with pytest.raises(UsageError, match=r"^--graft-source average needs --num 2 or more networks$"):
        check_grafting(**settings, source="average", invalid_threshold=0.1, peer_timeout=None, words=SCRIPT_WORDING)
    with pytest.raises(UsageError, match=r"^--peer-timeout must be positive seconds"):
        check_grafting(**settings, source="external", invalid_threshold=0.1, peer_timeout=-1, words=SCRIPT_WORDING)


def test_a_file_published_again_after_its_reader_finished_goes_when_the_ring_finishes(tmp_path: Path) -> None:
    """Network 1 stopped after publishing its last exchanged epoch; network 2 read it and finished; network 1,
    resumed, published the epoch again: its finish() removes that file, the last one of the ring."""
    models = [tiny_model(1), tiny_model(2)]
    one, two = Grafter(tmp_path, 1, 2), Grafter(tmp_path, 2, 2)
    one.open()
    with two:
        one.publish(models[0], 1)
        two.step(models[1], 1)
        two.finish()
    one.close()  # stopped before its graft
    with Grafter(tmp_path, 1, 2, ring=one.ring) as resumed:
        resumed.discard_from(1)
        resumed.step(models[0], 1)
        resumed.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ring.json"]


def test_under_torch_distributed_open_shares_its_outcome_and_the_ring(tmp_path: Path) -> None:
    """Every rank calls open(); rank 0's refusal or ring identity reaches all of them (one rank here; the
    two-rank case runs in tests/test_lightning.py)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        leave_a_killed_run(tmp_path / "old", epochs=1)
        with pytest.raises(GraftingError, match="holds exchange files this Grafter did not write"):
            Grafter(tmp_path / "old", 2, 2).open()
        with Grafter(tmp_path / "new", 1, 2) as grafter:
            assert grafter.ring is not None and (tmp_path / "new" / "ring.json").read_text().count(grafter.ring) == 1
    finally:
        torch.distributed.destroy_process_group()
