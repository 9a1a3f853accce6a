"""Tests for the paper's ablations (grafting.method.ablation and the Grafter's ``source`` option,
docs/METHOD.md §9): noise and internal grafting on hand-built layers and against the published loops
(tests/helpers/published_code.py) on whole state_dicts, the l1 criterion against a hand computation, plain
averaging of three networks exchanging real files, and the early code's per-filter entropy grafting
against its published loop, alone and in a ring of three."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from helpers import DEVICES
from helpers.published_code import published_grafting_filter, published_inside, published_noise
from torch import nn

from grafting.archs import cifar_models as models
from grafting.errors import GraftingError, PeerMismatchError, UsageError
from grafting.method.ablation import (
    average_states,
    conv_weights,
    filter_entropy_graft_,
    internal_graft_,
    noise_graft_,
)
from grafting.method.filters import filter_l1_norms
from grafting.method.graft import graft_layers
from grafting.ring.exchange_file import read as read_exchange_file
from grafting.ring.grafter import Grafter
from grafting_cifar.train import parse_args


class TwoConvs(nn.Module):
    """A conv, its BatchNorm, a second conv: keys with and without 'conv' for both rules."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, width, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 4, 1, bias=False)


def layer_with_norms(norms: list[float], fan_in: int = 4) -> torch.Tensor:
    """A conv weight (len(norms), 1, 2, 2) whose filter j has l1 norm norms[j] and a distinct pattern."""
    weight = torch.empty(len(norms), 1, 2, 2)
    for j, norm in enumerate(norms):
        pattern = torch.tensor([1.0, -2.0, 3.0, -4.0]).roll(j)
        weight[j] = (pattern / pattern.abs().sum() * norm).view(1, 2, 2)
    return weight


class OneConv(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2], bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(weight)


# ---------------------------------------------------------------- noise grafting


def test_noise_touches_exactly_the_invalid_filters() -> None:
    torch.manual_seed(0)
    model = TwoConvs()
    with torch.no_grad():
        model.conv1.weight[[1, 4]] *= 1e-4  # invalid at 0.1
        model.conv2.weight[2] *= 1e-5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    invalid1 = filter_l1_norms(before["conv1.weight"]) < 0.1
    invalid2 = filter_l1_norms(before["conv2.weight"]) < 0.1
    assert invalid1.tolist() == [False, True, False, False, True, False]
    assert invalid2.tolist() == [False, False, True, False]

    touched = noise_graft_(model, epoch=3, threshold=0.1, generator=torch.Generator().manual_seed(7))

    assert touched == 3
    after = model.state_dict()
    for key, invalid in (("conv1.weight", invalid1), ("conv2.weight", invalid2)):
        changed = (after[key] != before[key]).flatten(1).any(dim=1)
        assert changed.tolist() == invalid.tolist(), key
    for key in ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):
        assert torch.equal(after[key], before[key])


def test_noise_is_a_unit_gaussian_decaying_from_the_first_epoch() -> None:
    weight = layer_with_norms([0.01, 2.0, 0.02, 3.0, 1.5])
    for epoch in (0, 1, 10, 40):
        model = OneConv(weight)
        assert noise_graft_(model, epoch, threshold=0.1, generator=torch.Generator().manual_seed(3)) == 2
        # By hand: one draw per invalid filter (0, then 2), unit Gaussian times 0.975 ** epoch
        # (epochs counted from 0: the noise after the first epoch is a unit Gaussian).
        generator = torch.Generator().manual_seed(3)
        expected = weight.clone()
        for j in (0, 2):
            expected[j] += torch.randn(1, 2, 2, generator=generator) * 0.975**epoch
        assert torch.equal(model.conv.weight.detach(), expected), epoch


def test_noise_with_another_std() -> None:
    weight = layer_with_norms([0.0, 1.0])
    model = OneConv(weight)
    noise_graft_(model, 4, std=0.5, generator=torch.Generator().manual_seed(1))
    draw = torch.randn(1, 2, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.conv.weight[0].detach(), weight[0] + draw * (0.5 * 0.975**4))
    assert torch.equal(model.conv.weight[1].detach(), weight[1])


def mobilenet_with_weak_layers(seed: int = 0) -> nn.Module:
    """A MobileNetV2 where every fifth conv layer (1x1 or depthwise) has 80 % of its filters invalid at 0.1."""
    torch.manual_seed(seed)
    model = models.create("mobilenetv2", num_classes=10)
    with torch.no_grad():
        for weight in list(conv_weights(model).values())[::5]:
            weak = torch.rand(weight.shape[0]) < 0.8
            weight[weak] *= 1e-3
    return model


@pytest.mark.parametrize("device", DEVICES)
def test_noise_is_the_published_loop(device: str) -> None:
    model = mobilenet_with_weak_layers().to(device)
    published = copy.deepcopy(model)
    torch.manual_seed(5)
    published_noise(published, 7)
    torch.manual_seed(5)
    assert noise_graft_(model, 7) > 500
    state = model.state_dict()
    for key, tensor in published.state_dict().items():
        assert torch.equal(state[key], tensor), key


def test_noise_draws_in_the_standard_layout_whatever_the_memory_format() -> None:
    plain = mobilenet_with_weak_layers()
    channels_last = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    noise_graft_(plain, 2, generator=torch.Generator().manual_seed(8))
    noise_graft_(channels_last, 2, generator=torch.Generator().manual_seed(8))
    state = channels_last.state_dict()
    for key, tensor in plain.state_dict().items():
        assert torch.equal(state[key], tensor), key


def test_the_grafters_first_noise_is_a_unit_gaussian(tmp_path) -> None:
    # The Grafter counts epochs from 1, the published decay from 0: after epoch 1 the noise has scale 1.
    model = OneConv(layer_with_norms([0.01, 2.0, 0.03, 1.0]))
    published = copy.deepcopy(model)
    torch.manual_seed(4)
    published_noise(published, 0)
    torch.manual_seed(4)
    with Grafter(tmp_path, 1, 1, source="noise", invalid_threshold=0.1) as grafter:
        assert grafter.step(model, 1).invalid_touched == 2
    assert torch.equal(model.conv.weight, published.conv.weight)


# ---------------------------------------------------------------- internal grafting


def test_internal_pairs_weakest_with_strongest_until_the_first_valid() -> None:
    norms = [0.01, 5.0, 0.02, 3.0, 0.05, 1.0, 0.5, 2.0]
    weight = layer_with_norms(norms)
    model = OneConv(weight)
    touched = internal_graft_(model, threshold=0.1)
    # Ascending: 0 (0.01), 2 (0.02), 4 (0.05), 6 (0.5, valid: stop) ...; descending: 1 (5), 3 (3), 7 (2).
    expected = weight.clone()
    expected[0] += weight[1]
    expected[2] += weight[3]
    expected[4] += weight[7]
    assert touched == 3
    assert torch.equal(model.conv.weight.detach(), expected)


def test_internal_goes_on_past_the_middle() -> None:
    norms = [0.01, 0.03, 0.02, 0.04, 4.0]  # four invalid of five
    weight = layer_with_norms(norms)
    model = OneConv(weight)
    touched = internal_graft_(model, threshold=0.1)
    # Ascending order 0, 2, 1, 3, 4. j = 0: 0 += 4; j = 1: 2 += 3; j = 2: the middle filter 1 += itself;
    # j = 3: 3 += filter 2 as changed at j = 1; j = 4: filter 4 is valid, stop.
    w = weight
    expected = w.clone()
    expected[0] = w[0] + w[4]
    expected[2] = w[2] + w[3]
    expected[1] = w[1] + w[1]
    expected[3] = w[3] + (w[2] + w[3])
    assert touched == 4
    assert torch.equal(model.conv.weight.detach(), expected)


def test_internal_with_13_of_16_filters_invalid() -> None:
    # Filters 0..15; the 13 invalid ones have norms 0.001 * (1..13) in a shuffled order, the three
    # valid ones 2.0, 3.0 and 5.0. Ascending ranks r0..r15 name the filters below.
    invalid_norms = {
        3: 0.001,
        7: 0.002,
        0: 0.003,
        12: 0.004,
        9: 0.005,
        1: 0.006,
        14: 0.007,
        5: 0.008,
        10: 0.009,
        2: 0.010,
        15: 0.011,
        8: 0.012,
        4: 0.013,
    }
    valid_norms = {11: 2.0, 6: 3.0, 13: 5.0}
    norms = [{**invalid_norms, **valid_norms}[j] for j in range(16)]
    weight = layer_with_norms(norms)
    r = list(invalid_norms) + list(valid_norms)  # r[k]: the filter of rank k
    model = OneConv(weight)
    touched = internal_graft_(model, threshold=0.1)
    w, expected = weight, weight.clone()
    # First half, j = 0..7: rank j gets rank 15 - j, unchanged so far (the three valid filters first).
    for j in range(8):
        expected[r[j]] = w[r[j]] + w[r[15 - j]]
    # Past the middle, j = 8..12: rank j (still invalid, unchanged) gets rank 15 - j as changed above.
    for j in range(8, 13):
        expected[r[j]] = w[r[j]] + (w[r[15 - j]] + w[r[j]])
    # j = 13: filter 11 (norm 2.0) is valid, stop; the valid filters keep their weights.
    assert touched == 13
    assert torch.equal(model.conv.weight.detach(), expected)
    assert all(torch.equal(model.conv.weight[j].detach(), w[j]) for j in valid_norms)


@pytest.mark.parametrize("device", DEVICES)
def test_internal_is_the_published_loop(device: str) -> None:
    model = mobilenet_with_weak_layers().to(device)
    published = copy.deepcopy(model)
    published_inside(published)
    assert internal_graft_(model) > 500
    state = model.state_dict()
    for key, tensor in published.state_dict().items():
        assert torch.equal(state[key], tensor), key


def test_internal_leaves_a_healthy_layer_alone() -> None:
    weight = layer_with_norms([1.0, 2.0, 3.0])
    model = OneConv(weight)
    assert internal_graft_(model, threshold=0.1) == 0
    assert torch.equal(model.conv.weight.detach(), weight)


def test_conv_weights_by_rule() -> None:
    model = TwoConvs()
    assert list(conv_weights(model, "name")) == ["conv1.weight", "conv2.weight"]
    mobilenet = models.create("mobilenetv2", num_classes=10)
    by_name, by_module = conv_weights(mobilenet, "name"), conv_weights(mobilenet, "module")
    assert set(by_name) < set(by_module)  # the 1x1 shortcut convs are convs, but not by the key rule
    assert all("shortcut" in k for k in set(by_module) - set(by_name))
    with pytest.raises(GraftingError, match="graft rule"):
        conv_weights(model, "nope")


# ---------------------------------------------------------------- l1 criterion


def test_l1_criterion_alphas_by_hand() -> None:
    torch.manual_seed(1)
    own, peer = TwoConvs(), TwoConvs()
    own_state = {k: v.clone() for k, v in own.state_dict().items()}
    peer_state = {k: v.clone() for k, v in peer.state_dict().items()}
    a, c = 0.4, 0.3  # a small c keeps the arctan away from saturation, so the test sees real values
    records = graft_layers(own, peer_state, a=a, c=c, rule="name", criterion="l1")

    def by_hand(key: str) -> float:
        # The published criterion: each layer's float32 torch.norm(u, p=1).
        l1_self, l1_peer = float(torch.norm(own_state[key], p=1)), float(torch.norm(peer_state[key], p=1))
        assert l1_self == pytest.approx(sum(abs(v) for v in own_state[key].flatten().tolist()), rel=1e-5)
        return round(a / math.pi * math.atan(c * (l1_self - l1_peer)) + 0.5, 2)

    assert [r.key for r in records] == ["conv1.weight", "conv2.weight"]
    alphas = [by_hand("conv1.weight"), by_hand("conv2.weight")]
    assert [r.alpha for r in records] == alphas
    assert len(set(alphas)) == 2 and all(0.3 < x < 0.7 for x in alphas)
    state = own.state_dict()
    for key, alpha in (("conv1.weight", alphas[0]), ("bn1.weight", alphas[0]), ("conv2.weight", alphas[1])):
        torch.testing.assert_close(state[key], alpha * own_state[key] + (1 - alpha) * peer_state[key])


# ---------------------------------------------------------------- the Grafter's sources


def test_grafter_noise_and_internal_need_no_peers(tmp_path) -> None:
    for source in ("noise", "internal"):
        model = OneConv(layer_with_norms([0.01, 2.0, 0.03, 1.0]))
        with Grafter(tmp_path / source, 1, 1, source=source, invalid_threshold=0.1) as grafter:
            assert grafter.publish(model, 1) is None
            report = grafter.step(model, 1)
        assert report.invalid_touched == 2 and report.source == source
        assert "touched 2 invalid filters" in report.summary()
        assert not list((tmp_path / source).glob("*.pt"))  # nothing exchanged


def test_grafter_threshold_decides_what_is_invalid(tmp_path) -> None:
    model = OneConv(layer_with_norms([0.01, 2.0, 0.03, 1.0]))
    with Grafter(tmp_path, 1, 1, source="noise", invalid_threshold=1.5) as grafter:
        assert grafter.graft(model, 1).invalid_touched == 3


def test_grafter_rejects_an_unknown_source(tmp_path) -> None:
    with pytest.raises(GraftingError, match="graft source"):
        Grafter(tmp_path, 1, 2, source="telepathy")


def _run_ring(root, nets: list[nn.Module], source: str, epoch: int = 1, threshold: float = 0.1) -> list:
    """Every network's publish + graft of ``epoch`` in its own thread, as separate processes would."""
    reports: list = [None] * len(nets)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with Grafter(
                root,
                i + 1,
                len(nets),
                source=source,
                invalid_threshold=threshold,
                peer_timeout=30,
                meta={"model": "resnet20", "num_classes": 10},
            ) as grafter:
                reports[i] = grafter.step(nets[i], epoch)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(nets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return reports


def test_average_of_three_networks_equals_the_mean_of_their_checkpoints(tmp_path) -> None:
    nets = []
    for seed in range(3):
        torch.manual_seed(seed)
        net = models.create("resnet20", num_classes=10)
        with torch.no_grad():
            net.bn1.num_batches_tracked.fill_(10 * seed + 1)  # 1, 11, 21: the mean is 11
        nets.append(net)
    reports = _run_ring(tmp_path, nets, "average")

    saved = [read_exchange_file(tmp_path / f"net{i}_epoch1.tensors")[0] for i in (1, 2, 3)]
    states = [net.state_dict() for net in nets]
    for key in saved[0]:
        if torch.is_floating_point(saved[0][key]):
            expected = (saved[0][key] + saved[1][key] + saved[2][key]) / 3
            for state in states:
                torch.testing.assert_close(state[key], expected, rtol=1e-6, atol=1e-7)
    for net in nets:
        assert net.bn1.num_batches_tracked.item() == 11
        assert net.bn1.num_batches_tracked.dtype == torch.long
    # Every network sums in the same order, so all three end bit-identical.
    for state in states[1:]:
        for key, value in states[0].items():
            assert torch.equal(state[key], value), key
    assert sorted(reports[0].peers) == [2, 3] and reports[0].peer == 3
    assert torch.equal(reports[1].peer_state["conv1.weight"], saved[0]["conv1.weight"])  # predecessor of 2 is 1
    assert "averaged with networks 2, 3" in reports[0].summary()


def test_external_grafting_with_the_source_in_the_meta_of_each_file(tmp_path) -> None:
    torch.manual_seed(0)
    nets = [models.create("resnet20", num_classes=10) for _ in range(2)]
    reports = _run_ring(tmp_path, nets, "external")
    assert [r.peer for r in reports] == [2, 1] and reports[0].layers
    assert read_exchange_file(tmp_path / "net1_epoch1.tensors")[1]["source"] == "external"


def test_a_ring_with_mixed_sources_fails_clearly(tmp_path) -> None:
    torch.manual_seed(0)
    nets = [models.create("resnet20", num_classes=10) for _ in range(2)]
    errors: list[BaseException] = []

    def one(i: int, source: str) -> None:
        try:
            with Grafter(
                tmp_path, i, 2, source=source, peer_timeout=20, meta={"model": "resnet20", "num_classes": 10}
            ) as grafter:
                grafter.step(nets[i - 1], 1)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=one, args=(1, "external")), threading.Thread(target=one, args=(2, "average"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors and all(isinstance(e, PeerMismatchError) for e in errors)
    assert any("source=" in str(e) for e in errors)


def test_average_states_checks_shapes_and_needs_states() -> None:
    with pytest.raises(GraftingError, match="nothing to average"):
        average_states([])
    with pytest.raises(PeerMismatchError, match="'w'"):
        average_states([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])
    with pytest.raises(PeerMismatchError, match="no entry 'w'"):
        average_states([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}])
    mean = average_states([{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}])
    assert mean["w"].tolist() == [2.0, 4.0]


# ---------------------------------------------------------------- flags


def parse(*argv: str):
    """The CIFAR script's configuration of ``argv`` (the grafting flags are shared by both scripts)."""
    return parse_args(list(argv))


def test_flags_of_the_ablations() -> None:
    args = parse("--num", "1", "--graft-source", "noise")
    assert args.source == "noise" and args.criterion == "entropy" and args.invalid_threshold == 0.1
    assert parse("--num", "2", "--criterion", "l1").criterion == "l1"
    assert parse("--num", "3", "--graft-source", "average").source == "average"
    with pytest.raises(UsageError, match="average needs --num 2"):
        parse("--num", "1", "--graft-source", "average")
    with pytest.raises(UsageError, match="--invalid-threshold"):
        parse("--invalid-threshold", "-1")


# ---------------------------------------------------------------- per-filter entropy grafting (grafting_filter)


def resnet20_with_low_entropy_filters(seed: int) -> nn.Module:
    """A ResNet-20 whose every third filter of every conv has (nearly) all its values equal: one constant
    filter per layer (entropy 0), the others equal but for one larger value (entropy ~0.007 to 0.04)."""
    torch.manual_seed(seed)
    model = models.create("resnet20", num_classes=10)
    with torch.no_grad():
        for weight in conv_weights(model).values():
            for j in range(0, weight.shape[0], 3):
                weight[j] = weight[j].mean()
                if j:
                    weight[j].view(-1)[j % weight[j].numel()] += 1.0
    return model


# Filters 0, 3, 6, ... of ResNet-20's convs: 6 of the stem's 16, 6, 11 or 22 of each stage's 16, 32 or 64.
LOW_ENTROPY_FILTERS = 6 + 6 * (6 + 11 + 22)


def filter_entropy_ring(seeds: tuple[int, ...]) -> list[nn.Module]:
    """Networks of one ring with low-entropy filters at the same places. A nearly constant filter's entropy
    depends only on its size, so the peers tie on every such filter and the order in which a network lists
    its peers decides which one's filter it adds."""
    return [resnet20_with_low_entropy_filters(seed) for seed in seeds]


@pytest.mark.parametrize("device", DEVICES)
def test_filter_entropy_is_the_published_loop(device: str) -> None:
    own, *peers = [net.to(device) for net in filter_entropy_ring((0, 1, 2))]
    peer_states = [copy.deepcopy(p.state_dict()) for p in peers]
    published = copy.deepcopy(own)
    published_grafting_filter(published, peer_states)
    touched = filter_entropy_graft_(own, peer_states)
    assert touched == LOW_ENTROPY_FILTERS
    state = own.state_dict()
    for key, tensor in published.state_dict().items():
        assert torch.equal(state[key], tensor), key


def test_filter_entropy_adds_the_peer_filter_of_highest_entropy_first_of_equals() -> None:
    generator = torch.Generator().manual_seed(3)
    random = torch.randn(3, 4, 3, 3, generator=generator)
    nearly_constant = torch.full((4, 3, 3), 0.2)
    nearly_constant[1, 1, 1] = 0.9  # 35 of 36 values in the lowest bin: entropy 0.027
    own = torch.stack([nearly_constant, random[0], torch.full((4, 3, 3), -0.3)])  # low, ordinary, constant (0)
    first = torch.stack([random[1], random[2], nearly_constant])
    second = torch.stack([random[1].flip(0), random[0], random[2]])  # filter 0: first's reversed, equal entropy
    for peers, donor_of_0 in (((first, second), first[0]), ((second, first), second[0])):
        model = OneConv(own)
        touched = filter_entropy_graft_(model, [{"conv.weight": p} for p in peers])
        assert touched == 2
        grafted = model.conv.weight.detach()
        assert torch.equal(grafted[0], own[0] + donor_of_0), "equal entropies: the first peer listed"
        assert torch.equal(grafted[1], own[1]), "a filter of ordinary entropy is left alone"
        assert torch.equal(grafted[2], own[2] + random[2]), "the peer whose filter has the higher entropy"


def test_filter_entropy_ring_of_three_grafts_from_all_others_in_the_published_order(tmp_path) -> None:
    nets = filter_entropy_ring((0, 1, 2))
    before = [copy.deepcopy(net.state_dict()) for net in nets]
    reports = _run_ring(tmp_path, nets, "filter-entropy")
    for i, (net, report) in enumerate(zip(nets, reports)):
        order = [(i + k) % 3 for k in (1, 2)]  # the successor first, as the published loop read them
        expected = models.create("resnet20", num_classes=10)
        expected.load_state_dict(before[i])
        published_grafting_filter(expected, [before[n] for n in order])
        state = net.state_dict()
        for key, tensor in expected.state_dict().items():
            assert torch.equal(state[key], tensor), (i, key)
        assert report.source == "filter-entropy" and report.peers == tuple(n + 1 for n in sorted(order))
        assert report.invalid_touched == LOW_ENTROPY_FILTERS
        assert f"touched {LOW_ENTROPY_FILTERS}" in report.summary()


def test_filter_entropy_flags() -> None:
    args = parse("--num", "3", "--graft-source", "filter-entropy", "--invalid-threshold", "0.05")
    assert (args.source, args.invalid_threshold) == ("filter-entropy", 0.05)
    with pytest.raises(UsageError, match="filter-entropy needs --num 2"):
        parse("--num", "1", "--graft-source", "filter-entropy")
    with pytest.raises(GraftingError, match="at least one other network"):
        filter_entropy_graft_(OneConv(torch.ones(2, 1, 2, 2)), [])


def test_filter_entropy_runs_have_their_own_label() -> None:
    from grafting.tools.published import method_label

    assert method_label({"num": 3, "source": "filter-entropy"}) == "filter-entropy slr x3"
    assert method_label({"num": 2, "source": "filter-entropy", "difflr": True, "cos": True}) == "filter-entropy dlr"
