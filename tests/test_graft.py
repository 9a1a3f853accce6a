"""Tests for grafting.method.graft against docs/METHOD.md §3-§4.

The expected results come from deliberately naive re-implementations written here from the description:
they reuse only ``layer_entropy`` and ``graft_coefficient`` and do their own grouping and blending, and
the published loops (the CIFAR script's key loop, the VGG script's module loops) are written out with
their own arithmetic and compared with ``torch.equal`` on whole state_dicts.
"""

import copy
import functools

import pytest
import torch
from helpers import DEVICES
from helpers.frozen_graft import frozen_graft_layers
from helpers.published_code import (
    published_key_graft,
    published_l1,
    published_vgg_layer_graft,
    vgg_filter_graft_per_channel,
)
from torch import nn

from grafting.archs import cifar_models as models
from grafting.errors import GraftingError, PeerMismatchError
from grafting.method import entropy as entropy_module
from grafting.method.entropy import layer_entropy
from grafting.method.graft import (
    FilterRecord,
    LayerRecord,
    _blend_,
    _copy_views,
    graft_filters,
    graft_layers,
    kept_entries,
)
from grafting.method.weighting import graft_coefficient
from grafting.ring import exchange_file

LAYER_MODELS = ("resnet32", "mobilenetv2")  # the CIFAR VGGs keep their classifier: tested on their own below
# A narrow CIFAR VGG (the class of vgg11..vgg19, 0.1 M weights instead of 15 M): the same rules, fast tests.
SMALL_VGG = "vgg-small"
SMALL_VGG_CONFIG = [16, 16, "M", 32, 32, "M", 32, "M", 64, "M", 64, "M"]


def build(name: str) -> nn.Module:
    """A registered CIFAR model for 10 classes, or the narrow VGG."""
    if name == SMALL_VGG:
        return models.vgg.CifarVGG(SMALL_VGG_CONFIG, num_classes=10)
    return models.create(name, num_classes=10)


# --- building differing networks -----------------------------------------------------------------


def perturb_batchnorms(model: nn.Module, seed: int) -> None:
    """Give every BatchNorm random scales, shifts, running statistics and batch counter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) * 2.0 - 1.0)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(int(torch.randint(0, 5000, (), generator=generator)))


@functools.cache
def _reference_pair(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(own model, peer state_dict): the same architecture from two seeds, BatchNorms perturbed."""
    torch.manual_seed(1)
    own = build(name)
    perturb_batchnorms(own, seed=11)
    torch.manual_seed(2)
    peer = build(name)
    perturb_batchnorms(peer, seed=22)
    return own, {k: v.clone() for k, v in peer.state_dict().items()}


def weight_entropies(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """layer_entropy of every weight matrix or kernel of ``state`` (the tensors that can score a group)."""
    return {k: layer_entropy(t) for k, t in state.items() if t.is_floating_point() and t.dim() > 1}


@functools.cache
def reference_entropies(name: str) -> tuple[dict[str, float], dict[str, float]]:
    """Entropies of the reference pair's weights, own and peer, computed once per model."""
    own, peer_state = _reference_pair(name)
    return weight_entropies(own.state_dict()), weight_entropies(peer_state)


def fresh_pair(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A private copy of the reference pair that a test may graft in place."""
    own, peer_state = _reference_pair(name)
    return copy.deepcopy(own), {k: v.clone() for k, v in peer_state.items()}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state_dict."""
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- naive reference implementations -------------------------------------------------------------


def naive_name_rule(
    own: dict[str, torch.Tensor], h_own: dict[str, float], h_peer: dict[str, float], a: float, c: float
) -> list[tuple[str, float, list[str]]]:
    """docs/METHOD.md §4, layer level by key name: (conv key, alpha, keys blended with it) in order.

    ``h_own`` and ``h_peer`` map weight keys to their layer_entropy in each network.
    """
    groups: list[tuple[str, float, list[str]]] = []
    for key in own:
        if "conv" in key:
            alpha = graft_coefficient(h_own[key], h_peer[key], a=a, c=c)
            groups.append((key, alpha, [key]))
        else:
            groups[-1][2].append(key)  # the most recent conv's alpha
    return groups


def _leaf_state_keys(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """Each leaf module that holds state, with its state_dict keys, in registration order."""
    leaves = []
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue
        keys = list(module.state_dict(prefix=f"{name}." if name else "").keys())
        if keys:
            leaves.append((module, keys))
    return leaves


def naive_module_rule(
    model: nn.Module, h_own: dict[str, float], h_peer: dict[str, float], a: float, c: float
) -> list[tuple[str, float, list[str]]]:
    """docs/METHOD.md §4, layer level by module type: each Conv2d/Linear weight its own alpha, shared by
    its bias and by the BatchNorm that comes right after it."""
    groups: list[tuple[str, float, list[str]]] = []
    bn_may_join = False
    for module, keys in _leaf_state_keys(model):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight_key = next(k for k in keys if k.endswith(".weight") or k == "weight")
            alpha = graft_coefficient(h_own[weight_key], h_peer[weight_key], a=a, c=c)
            groups.append((weight_key, alpha, keys))
            bn_may_join = True
        elif isinstance(module, nn.BatchNorm2d) and bn_may_join:
            groups[-1][2].extend(keys)
            bn_may_join = False
        else:
            raise AssertionError(f"the naive module rule does not cover {type(module).__name__}")
    assert sorted(k for _, _, keys in groups for k in keys) == sorted(model.state_dict())
    return groups


def naive_blend(w1: torch.Tensor, w2: torch.Tensor, alpha: float) -> torch.Tensor:
    """own * alpha + peer * (1 - alpha) as the published code computed it: in the tensors' float dtype;
    an int64 counter times a Python float is float32, truncated toward zero when loaded back."""
    mixed = w1 * alpha + w2 * (1 - alpha)
    return mixed if w1.is_floating_point() else mixed.trunc().to(w1.dtype)


def assert_grafted_as(
    model: nn.Module,
    before: dict[str, torch.Tensor],
    peer: dict[str, torch.Tensor],
    groups: list[tuple[str, float, list[str]]],
) -> None:
    """Every entry of ``model`` equals the naive blend with its group's alpha, bit for bit."""
    after = model.state_dict()
    for _, alpha, keys in groups:
        for key in keys:
            expected = naive_blend(before[key], peer[key], alpha)
            actual = after[key]
            assert actual.dtype == before[key].dtype, key
            assert torch.equal(actual, expected), f"{key}: {actual.flatten()[:3]} != {expected.flatten()[:3]}"


# --- layer level: equality with the naive rules -------------------------------------------------


@pytest.mark.parametrize("name", LAYER_MODELS)
def test_name_rule_matches_naive(name: str) -> None:
    model, peer = fresh_pair(name)
    before = snapshot(model)
    expected = naive_name_rule(before, *reference_entropies(name), a=0.4, c=500.0)

    records = graft_layers(model, peer, a=0.4, c=500.0, rule="name")

    assert all(isinstance(r, LayerRecord) for r in records)
    assert [(r.key, r.alpha, list(r.keys)) for r in records] == expected
    h_own, h_peer = reference_entropies(name)
    for r in records:
        assert r.h_self == h_own[r.key] and r.h_peer == h_peer[r.key]
    assert len({alpha for _, alpha, _ in expected}) > 1  # the groups really get different alphas
    assert_grafted_as(model, before, peer, expected)


@pytest.mark.parametrize("name", LAYER_MODELS)
def test_module_rule_matches_naive(name: str) -> None:
    model, peer = fresh_pair(name)
    before = snapshot(model)
    expected = naive_module_rule(model, *reference_entropies(name), a=0.4, c=500.0)

    records = graft_layers(model, peer, a=0.4, c=500.0, rule="module")

    assert [(r.key, r.alpha, sorted(r.keys)) for r in records] == [(k, al, sorted(ks)) for k, al, ks in expected]
    assert len({alpha for _, alpha, _ in expected}) > 1
    assert_grafted_as(model, before, peer, expected)


def test_name_rule_published_grouping_on_resnet32() -> None:
    # Spot checks of the published rule: BN entries and the final linear layer take the alpha of the
    # conv before them.
    model, peer = fresh_pair("resnet32")
    records = {r.key: r for r in graft_layers(model, peer, rule="name")}
    assert len(records) == 31  # 1 stem conv + 15 blocks x 2 convs
    assert "bn1.num_batches_tracked" in records["conv1.weight"].keys
    assert {"linear.weight", "linear.bias", "layer3.4.bn2.running_var"} <= set(records["layer3.4.conv2.weight"].keys)


def test_counters_are_truncated_as_the_published_float32_blend() -> None:
    # Both networks counted 7 batches; alpha 0.41. The published blend 7 * 0.41 + 7 * 0.59 is float32
    # (an int64 tensor times a Python float): fl32(2.87) + fl32(4.13) = 6.9999995, and loading it into
    # the int64 buffer truncates it to 6. Rounding would give 7.
    own, peer = torch.tensor(7), torch.tensor(7)
    assert (own * 0.41 + peer * (1 - 0.41)).dtype == torch.float32
    _blend_([own], [peer], [0.41])
    assert own.dtype == torch.int64 and int(own) == 6
    own, peer = torch.tensor([1000, 9]), torch.tensor([10, 3])
    _blend_([own], [peer], [0.5])
    assert own.tolist() == [505, 6]


def test_counters_stay_integers() -> None:
    model, peer = fresh_pair("resnet32")
    graft_layers(model, peer, rule="name")
    counters = {k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    assert counters and all(v.dtype == torch.int64 for v in counters.values())
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.num_batches_tracked.dtype == torch.int64


@pytest.mark.parametrize("rule", ["name", "module"])
def test_identical_networks_are_unchanged(rule: str) -> None:
    model, _ = fresh_pair("resnet32")
    before = snapshot(model)
    records = graft_layers(model, snapshot(model), rule=rule)
    assert all(r.alpha == 0.5 for r in records)
    after = model.state_dict()
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key


def test_grafting_updates_the_live_parameters() -> None:
    # The blend must land in the model's own parameters, not in a detached copy of them.
    model, peer = fresh_pair("resnet32")
    before = model.conv1.weight.detach().clone()
    graft_layers(model, peer, rule="name")
    assert not torch.equal(model.conv1.weight, before)


def test_wrapped_model_is_grafted_like_the_plain_one() -> None:
    plain, peer = fresh_pair("resnet32")
    wrapped_inner = copy.deepcopy(plain)
    graft_layers(plain, peer, rule="name")
    graft_layers(nn.DataParallel(wrapped_inner), peer, rule="name")
    state = wrapped_inner.state_dict()
    for key, tensor in plain.state_dict().items():
        assert torch.equal(state[key], tensor), key


def test_hyper_parameters_reach_the_coefficient() -> None:
    model, peer = fresh_pair("resnet32")
    before = snapshot(model)
    expected = naive_name_rule(before, *reference_entropies("resnet32"), a=0.8, c=50.0)
    records = graft_layers(model, peer, a=0.8, c=50.0, rule="name")
    assert [r.alpha for r in records] == [alpha for _, alpha, _ in expected]
    assert_grafted_as(model, before, peer, expected)


def test_l1_criterion_uses_l1_norms() -> None:
    model, peer = fresh_pair("resnet32")
    before = snapshot(model)
    # c small enough that the l1 norms (tens to hundreds) do not saturate the arctan.
    a, c = 0.4, 0.05
    records = graft_layers(model, peer, a=a, c=c, rule="name", criterion="l1")
    groups = []
    for record in records:
        # The published l1 criterion: float(torch.norm(u, p=1)), a float32 sum.
        l1_self = float(torch.norm(before[record.key], p=1))
        l1_peer = float(torch.norm(peer[record.key], p=1))
        assert record.h_self == l1_self and record.h_peer == l1_peer
        assert l1_self == pytest.approx(float(before[record.key].double().abs().sum()), rel=1e-5)
        assert record.alpha == graft_coefficient(record.h_self, record.h_peer, a=a, c=c)
        assert record.alpha == graft_coefficient(l1_self, l1_peer, a=a, c=c)
        groups.append((record.key, record.alpha, list(record.keys)))
    assert len({alpha for _, alpha, _ in groups}) > 1
    naive_groups = naive_name_rule(before, *reference_entropies("resnet32"), a, c)
    assert [(k, ks) for k, _, ks in groups] == [(k, ks) for k, _, ks in naive_groups]
    assert_grafted_as(model, before, peer, groups)


def test_graft_layers_reads_back_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model, peer = fresh_pair("resnet32")
    monkeypatch.setattr(entropy_module, "HOST_COUNTED", ())  # a GPU's path: numpy never sees a value
    calls: list[str] = []
    for name in ("item", "tolist", "numpy", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    graft_layers(model, peer, rule="name")
    assert len(calls) == 1  # all scores of the model fetched together


# --- layer level: the frozen reference, tests/helpers/frozen_graft.py -------------------------------

FROZEN_CASES = [
    ("resnet110", "name", "entropy"),  # the benchmark's model: 109 coefficients, 656 entries
    ("resnet32", "module", "entropy"),
    ("mobilenetv2", "module", "entropy"),
    ("resnet32", "name", "l1"),
    (SMALL_VGG, "module", "entropy"),  # keeps its classifier and counters
    (SMALL_VGG, "name", "entropy"),
]


@pytest.mark.parametrize("name, rule, criterion", FROZEN_CASES)
def test_graft_layers_leaves_every_entry_as_the_frozen_code_did(name: str, rule: str, criterion: str) -> None:
    model, peer = fresh_pair(name) if name != "resnet110" else (build(name), build(name).state_dict())
    frozen = copy.deepcopy(model)
    records = graft_layers(model, peer, a=0.3, c=400.0, rule=rule, criterion=criterion)
    expected = frozen_graft_layers(frozen, peer, a=0.3, c=400.0, rule=rule, criterion=criterion)
    assert [(r.key, r.h_self, r.h_peer, r.alpha) for r in records] == expected
    assert len({r.alpha for r in records}) > 1
    assert_same_state(model, frozen.state_dict())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_graft_layers_of_other_float_dtypes_is_the_frozen_code(dtype: torch.dtype) -> None:
    model, peer = fresh_pair("resnet32")
    model, peer = model.to(dtype), {k: v.to(dtype) if v.is_floating_point() else v for k, v in peer.items()}
    frozen = copy.deepcopy(model)
    graft_layers(model, peer)
    frozen_graft_layers(frozen, peer)
    assert_same_state(model, frozen.state_dict())


def test_a_peer_in_one_buffer_is_copied_across_once_and_grafted_alike(tmp_path) -> None:
    """The peer as an exchange file gives it (views of one buffer), moved with one copy of the buffer
    (what a GPU gets; here CPU to CPU) and viewed again: the same tensors, the same graft."""
    model, peer = fresh_pair("resnet32")
    exchange_file.pack(peer, {}).write(tmp_path / "peer.tensors")
    from_file, _ = exchange_file.read(tmp_path / "peer.tensors")
    moved = _copy_views(list(from_file.values()), torch.device("cpu"))
    assert len({t.untyped_storage().data_ptr() for t in moved}) == 1
    assert moved[0].untyped_storage().data_ptr() != next(iter(from_file.values())).untyped_storage().data_ptr()
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(moved, peer.values()))
    frozen = copy.deepcopy(model)
    graft_layers(model, dict(zip(from_file, moved)))
    frozen_graft_layers(frozen, peer)
    assert_same_state(model, frozen.state_dict())


# --- layer level: the published loops on whole state_dicts ---------------------------------------


def assert_same_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Every entry of ``model`` equals ``expected`` in dtype and value (torch.equal)."""
    after = model.state_dict()
    assert list(after) == list(expected)
    for key, tensor in expected.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", LAYER_MODELS)
def test_name_rule_is_the_published_cifar_loop(name: str, device: str) -> None:
    model, peer = fresh_pair(name)
    model, peer = model.to(device), {k: v.to(device) for k, v in peer.items()}
    published = copy.deepcopy(model)
    published_key_graft(published, peer)
    graft_layers(model, peer, rule="name")
    assert_same_state(model, published.state_dict())


@pytest.mark.parametrize("device", DEVICES)
def test_l1_criterion_is_the_published_norm_loop(device: str) -> None:
    model, peer = fresh_pair("resnet32")
    model, peer = model.to(device), {k: v.to(device) for k, v in peer.items()}
    published = copy.deepcopy(model)
    published_key_graft(published, peer, c=0.05, score=published_l1)
    records = graft_layers(model, peer, c=0.05, rule="name", criterion="l1")
    assert len({r.alpha for r in records}) > 3
    assert_same_state(model, published.state_dict())


def test_the_cifar_vggs_keep_their_classifier_and_counters() -> None:
    vgg = models.create("vgg16", num_classes=10)
    kept = kept_entries(vgg)
    assert kept[-2:] == ["classifier.weight", "classifier.bias"]
    assert set(kept[:-2]) == {k for k in vgg.state_dict() if k.endswith("num_batches_tracked")}
    assert kept_entries(nn.DataParallel(vgg)) == kept
    assert kept_entries(models.create("resnet32", num_classes=10)) == []
    assert kept_entries(models.create("mobilenetv2", num_classes=10)) == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", ["name", "module"])
def test_vgg_layer_grafting_is_the_published_vgg_loop(rule: str, device: str) -> None:
    model, peer_state = fresh_pair(SMALL_VGG)
    model, peer_state = model.to(device), {k: v.to(device) for k, v in peer_state.items()}
    peer = copy.deepcopy(model)
    peer.load_state_dict(peer_state)
    before = snapshot(model)
    published = copy.deepcopy(model)
    published_vgg_layer_graft(published, peer)

    records = graft_layers(model, peer_state, rule=rule)

    assert_same_state(model, published.state_dict())
    assert [r.key for r in records] == [k for k in before if k.endswith("conv.weight")]
    assert len({r.alpha for r in records}) > 1
    state = model.state_dict()
    for key in kept_entries(model):  # the classifier and the counters keep their own values
        assert torch.equal(state[key], before[key]) and not torch.equal(before[key], peer_state[key])
    assert not any(k in r.keys for r in records for k in kept_entries(model))


def test_a_model_that_keeps_every_entry_is_left_alone() -> None:
    class Kept(nn.Module):
        layer_grafting_keeps = ("*",)

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 1)

    model = Kept()
    before = snapshot(model)
    peer = {k: v + 1 for k, v in before.items()}
    assert graft_layers(model, peer, rule="name") == [] and graft_layers(model, peer, criterion="l1") == []
    assert_same_state(model, before)


# --- layer level: errors and torchvision-style keys ----------------------------------------------


def test_missing_peer_key_is_named() -> None:
    model, peer = fresh_pair("resnet32")
    before = snapshot(model)
    del peer["layer2.3.bn1.running_mean"]
    with pytest.raises(PeerMismatchError, match=r"layer2\.3\.bn1\.running_mean"):
        graft_layers(model, peer, rule="name")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())  # nothing half-done


def test_wrong_peer_shape_is_named() -> None:
    model, peer = fresh_pair("resnet32")
    peer["linear.weight"] = torch.zeros(100, 64)  # a CIFAR-100 peer
    with pytest.raises(PeerMismatchError, match=r"linear\.weight"):
        graft_layers(model, peer, rule="module")
    with pytest.raises(PeerMismatchError, match=r"linear\.weight"):
        graft_filters(model, peer)


def test_name_rule_without_leading_conv_points_to_module_rule() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    peer = {k: v + 1 for k, v in model.state_dict().items()}
    with pytest.raises(GraftingError, match="module rule"):
        graft_layers(model, peer, rule="name")


def test_unknown_rule_and_criterion_are_rejected() -> None:
    model, peer = fresh_pair("resnet32")
    with pytest.raises(GraftingError, match="rule"):
        graft_layers(model, peer, rule="names")
    with pytest.raises(GraftingError, match="criterion"):
        graft_layers(model, peer, criterion="entropy2")


def torchvision_style_net() -> nn.Sequential:
    """Keys like ``0.weight``, ``1.running_mean``: no key says ``conv``."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


def test_module_rule_blends_every_entry_of_torchvision_style_keys() -> None:
    torch.manual_seed(5)
    model = torchvision_style_net()
    perturb_batchnorms(model, seed=1)
    before = snapshot(model)
    assert not any("conv" in key for key in before)
    torch.manual_seed(6)
    peer_model = torchvision_style_net()
    perturb_batchnorms(peer_model, seed=2)
    peer = snapshot(peer_model)
    peer["1.num_batches_tracked"] = before["1.num_batches_tracked"] + 1000
    peer["4.num_batches_tracked"] = before["4.num_batches_tracked"] + 1000
    assert all(not torch.equal(before[k], peer[k]) for k in before)  # the peer differs everywhere

    expected = naive_module_rule(model, weight_entropies(before), weight_entropies(peer), a=0.4, c=500.0)
    records = graft_layers(model, peer, rule="module")

    assert [(r.key, r.alpha) for r in records] == [(k, alpha) for k, alpha, _ in expected]
    assert [sorted(r.keys) for r in records] == [sorted(ks) for _, _, ks in expected]
    after = model.state_dict()
    unchanged = [k for k in before if torch.equal(after[k], before[k])]
    assert unchanged == []
    assert_grafted_as(model, before, peer, expected)


# --- filter level --------------------------------------------------------------------------------


class ConvBnConvBn(nn.Module):
    """conv(1->2, 1x1) - bn(2) - conv(2->1, 1x1) - bn(1) - linear: the smallest chain with a consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(2)
        self.conv2 = nn.Conv2d(2, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1)
        self.fc = nn.Linear(1, 2)


def test_filter_graft_by_hand() -> None:
    model = ConvBnConvBn()
    own = model.state_dict()
    with torch.no_grad():
        for _key, tensor in own.items():
            if tensor.is_floating_point():
                tensor.fill_(1.0)  # own = 1, peer = 0: every blended value equals its coefficient
        own["bn1.weight"].copy_(torch.tensor([3.0, 0.0]))
        own["bn2.weight"].copy_(torch.tensor([1.0]))
    peer = {k: torch.zeros_like(v) for k, v in own.items()}
    peer["bn1.weight"] = torch.tensor([1.0, 0.0])
    peer["bn2.weight"] = torch.tensor([-3.0])  # |gamma| is what counts
    peer["bn1.num_batches_tracked"] = torch.tensor(7)
    fc_before = (own["fc.weight"].clone(), own["fc.bias"].clone())

    records = graft_filters(model, peer)

    # bn1: w = 3/(3+1) = 0.75 for channel 0; 0/0 guarded to 0.5 for channel 1.
    # bn2: w = 1/(1+3) = 0.25. conv2 is bn2's filter and bn1's consumer: coefficient 0.25 * w1[m].
    after = model.state_dict()
    assert torch.equal(after["conv1.weight"].flatten(), torch.tensor([0.75, 0.5]))
    assert torch.equal(after["conv2.weight"].flatten(), torch.tensor([0.25 * 0.75, 0.25 * 0.5]))
    assert torch.equal(after["bn1.weight"], torch.tensor([0.75 * 3.0 + 0.25 * 1.0, 0.0]))
    assert torch.equal(after["bn1.bias"], torch.tensor([0.75, 0.5]))
    assert torch.equal(after["bn1.running_mean"], torch.tensor([0.75, 0.5]))
    assert torch.equal(after["bn1.running_var"], torch.tensor([0.75, 0.5]))
    assert torch.equal(after["bn2.weight"], torch.tensor([0.25 * 1.0 + 0.75 * -3.0]))
    assert torch.equal(after["bn2.bias"], torch.tensor([0.25]))
    assert torch.equal(after["bn2.running_mean"], torch.tensor([0.25]))
    assert torch.equal(after["bn2.running_var"], torch.tensor([0.25]))
    assert torch.equal(after["fc.weight"], fc_before[0]) and torch.equal(after["fc.bias"], fc_before[1])
    assert after["bn1.num_batches_tracked"].dtype == torch.int64
    assert all(torch.isfinite(t).all() for t in after.values() if t.is_floating_point())

    assert all(isinstance(r, FilterRecord) for r in records)
    assert [r.key for r in records] == ["conv1.weight", "conv2.weight"]
    assert (records[0].mean_w, records[0].min_w, records[0].max_w) == pytest.approx((0.625, 0.5, 0.75))
    assert (records[1].mean_w, records[1].min_w, records[1].max_w) == pytest.approx((0.25, 0.25, 0.25))


@pytest.mark.parametrize("device", DEVICES)
def test_filter_graft_vgg_is_the_per_channel_loop(device: str) -> None:
    model, peer_state = fresh_pair(SMALL_VGG)
    with torch.no_grad():
        # The 0/0 guard and the one-sided zeros, on the first and a middle layer.
        for bn in ("features.0.bn", "features.4.bn"):
            model.get_submodule(bn).weight[:3] = torch.tensor([0.0, 0.0, 0.7])
            peer_state[f"{bn}.weight"][:3] = torch.tensor([0.0, 0.4, 0.0])
    model, peer_state = model.to(device), {k: v.to(device) for k, v in peer_state.items()}
    peer = copy.deepcopy(model)
    peer.load_state_dict(peer_state)
    expected = copy.deepcopy(model)
    vgg_filter_graft_per_channel(expected, peer)
    before = snapshot(model)

    records = graft_filters(model, peer_state)

    assert_same_state(model, expected.state_dict())
    state = model.state_dict()
    for key in ("classifier.weight", "classifier.bias", "features.0.bn.num_batches_tracked"):
        assert torch.equal(state[key], before[key])
    assert [r.key for r in records] == [k for k in before if k.endswith("conv.weight")]
    first = records[0]
    g1, g2 = before["features.0.bn.weight"].abs(), peer_state["features.0.bn.weight"].abs()
    w = torch.where(g1 + g2 > 0, g1 / (g1 + g2), 0.5)
    assert w[:3].tolist() == [0.5, 0.0, 1.0]
    assert (first.mean_w, first.min_w, first.max_w) == (w.mean().item(), w.min().item(), w.max().item())


def test_filter_graft_identical_networks_change_nothing() -> None:
    model, _ = fresh_pair(SMALL_VGG)
    before = snapshot(model)
    records = graft_filters(model, snapshot(model))
    assert records and all(r.min_w == r.max_w == r.mean_w == 0.5 for r in records)
    assert_same_state(model, before)  # x * 0.5 + x * 0.5 is exactly x


def test_filter_graft_needs_conv_bn_pairs() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(GraftingError):
        graft_filters(model, {k: v.clone() for k, v in model.state_dict().items()})
