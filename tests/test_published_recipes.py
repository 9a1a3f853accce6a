"""The published recipes the project reproduces exactly (issue 24), each compared with the published loop or
recipe written out in ``tests/published_code.py``, by ``torch.equal`` on whole state_dicts or schedules:

- filter-level grafting with ``bn_blend="repeated-whole"``: the published VGG ``BN()`` loop;
"""

from __future__ import annotations

import copy

import pytest
import torch
from published_code import BN_PARTS, published_vgg_filter_graft
from torch import nn

from grafting.archs import cifar_models as models
from grafting.errors import UsageError
from grafting.method.graft import graft_filters
from grafting.ring.grafter import Grafter
from grafting_cifar.train import parse_args as parse_cifar_args

torch.set_num_threads(2)


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The keys whose tensors are not ``torch.equal`` (the key lists must agree)."""
    assert list(a) == list(b)
    return [k for k in a if not torch.equal(a[k], b[k])]


# --- VGG filter-level grafting: the published BatchNorm loop ------------------------------------------------


def _vgg16_pair() -> tuple[nn.Module, nn.Module]:
    """Two CIFAR VGG-16s from different seeds, their BatchNorms given random scales, shifts and statistics."""
    pair = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = models.create("vgg16", num_classes=10)
        generator = torch.Generator().manual_seed(seed + 10)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    n = module.num_features
                    module.weight.copy_(torch.rand(n, generator=generator) * 2 - 1)
                    module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                    module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                    module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
        pair.append(model)
    return pair[0], pair[1]


def test_repeated_whole_bn_blend_is_the_published_vgg_loop_bit_for_bit() -> None:
    own, peer = _vgg16_pair()
    expected = copy.deepcopy(own)
    published_vgg_filter_graft(expected, peer)
    graft_filters(own, peer.state_dict(), bn_blend="repeated-whole")
    assert _differing(own.state_dict(), expected.state_dict()) == []


def test_repeated_whole_bn_blend_leaves_each_network_its_peers_batchnorm() -> None:
    """What the published loop amounts to (docs/METHOD.md §10.2): every BatchNorm entry ends as
    ``peer + (own - peer) * prod_j w_j``, i.e. the peer's within float32 rounding; the per-channel blend
    keeps a mixture. The convs are blended per channel either way, identically."""
    own, peer = _vgg16_pair()
    per_channel = copy.deepcopy(own)
    graft_filters(per_channel, peer.state_dict(), bn_blend="per-channel")
    graft_filters(own, peer.state_dict(), bn_blend="repeated-whole")
    theirs, repeated, blended = peer.state_dict(), own.state_dict(), per_channel.state_dict()
    bn_keys = [k for k in repeated if k.endswith(tuple(f".bn.{part}" for part in BN_PARTS))]
    assert bn_keys
    for key in bn_keys:
        assert torch.allclose(repeated[key], theirs[key], rtol=1e-6, atol=1e-7), key
        assert not torch.allclose(blended[key], theirs[key], rtol=1e-3), key
    assert (
        _differing(
            {k: v for k, v in repeated.items() if k not in bn_keys},
            {k: v for k, v in blended.items() if k not in bn_keys},
        )
        == []
    )


def test_unknown_bn_blend_is_a_usage_error() -> None:
    own, peer = _vgg16_pair()
    with pytest.raises(UsageError, match="--filter-bn-blend"):
        graft_filters(own, peer.state_dict(), bn_blend="whole")


def test_filter_bn_blend_flag() -> None:
    assert parse_cifar_args(["--level", "filter"]).filter_bn_blend == "per-channel"
    args = parse_cifar_args(["--level", "filter", "--filter-bn-blend", "repeated-whole", "--num", "2"])
    assert args.filter_bn_blend == "repeated-whole" and "filter_bn_blend" in args.peer_settings()
    with pytest.raises(UsageError, match="--filter-bn-blend repeated-whole only applies with --level filter"):
        parse_cifar_args(["--filter-bn-blend", "repeated-whole"])


def test_the_grafter_blends_batchnorms_as_configured(tmp_path) -> None:
    """Network 1 of a ring grafts network 2's published weights with the published loop."""
    own, peer = (models.vgg.CifarVGG([8, "M", 16, "M", 16, "M", 16, "M", 16, "M"]) for _ in range(2))
    for model, seed in ((own, 1), (peer, 2)):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.weight.copy_(torch.rand(module.num_features, generator=generator) * 2 - 1)
    expected = copy.deepcopy(own)
    published_vgg_filter_graft(expected, peer)
    settings = {"level": "filter", "bn_blend": "repeated-whole", "peer_timeout": 30}
    with Grafter(tmp_path, 2, 2, **settings) as second:
        second.publish(peer, 1)
    with Grafter(tmp_path, 1, 2, **settings) as first:
        report = first.step(own, 1)
    assert report.grafted and report.peer == 2
    assert _differing(own.state_dict(), expected.state_dict()) == []
