"""Tests for grafting.filters (invalid-filter counting, docs/METHOD.md §1)."""

import pytest
import torch

from grafting.archs import cifar_models as models
from grafting.method.filters import conv_filter_keys, count_invalid_filters, filter_l1_norms


def filters_with_norms(norms: list[float], shape: tuple[int, ...] = (2, 3, 3)) -> torch.Tensor:
    """A conv weight whose filter j has l1 norm ``norms[j]`` (one nonzero entry, sign alternating)."""
    weight = torch.zeros(len(norms), *shape)
    for j, norm in enumerate(norms):
        weight[j].view(-1)[j % weight[j].numel()] = norm if j % 2 == 0 else -norm
    return weight


def hand_built_state() -> dict[str, torch.Tensor]:
    """Seven counted filters (norms 0.005, 0.05, 0.5, 5 and 0, 0.25, 0.0078125) among decoys."""
    return {
        "conv1.weight": filters_with_norms([0.005, 0.05, 0.5, 5.0]),
        "conv1.bias": torch.zeros(4),  # a bias is not a filter
        "bn1.weight": torch.zeros(4),  # no 'conv' in the key
        "bn1.num_batches_tracked": torch.tensor(0),
        "layer1.0.conv2.weight": filters_with_norms([0.0, 0.25, 0.0078125], shape=(4, 1, 1)),
        "layer1.0.shortcut.0.weight": torch.zeros(6, 4, 1, 1),  # the paper's rule leaves it out
        "linear.weight": torch.zeros(10, 3),
        "linear.bias": torch.zeros(10),
    }


def test_filter_l1_norms_per_output_channel() -> None:
    weight = torch.tensor([[[[1.0, -2.0]], [[0.5, 0.0]]], [[[0.0, 0.0]], [[-0.25, 0.0]]]])  # 2x2x1x2
    assert filter_l1_norms(weight).tolist() == [3.5, 0.25]


def test_conv_filter_keys_follow_the_papers_rule() -> None:
    assert conv_filter_keys(hand_built_state()) == ["conv1.weight", "layer1.0.conv2.weight"]


@pytest.mark.parametrize(
    "threshold, invalid",
    [
        (0.0, 0),  # nothing is below 0; the exact zeros are not < 0
        (0.001, 1),  # the 0.0 filter of conv2
        (0.0078125, 2),  # 0.0 and 0.005; strict: the filter with norm exactly t is valid
        (0.01, 3),  # 0.005, 0.0, 0.0078125
        (0.1, 4),  # + 0.05
        (0.25, 4),  # 0.25 is not < 0.25
        (0.3, 5),
        (1.0, 6),
        (100.0, 7),
    ],
)
def test_count_on_hand_built_state(threshold: float, invalid: int) -> None:
    assert count_invalid_filters(hand_built_state(), threshold) == (invalid, 7)


def test_empty_state_counts_nothing() -> None:
    assert count_invalid_filters({"linear.weight": torch.zeros(3, 3)}, 0.1) == (0, 0)


@pytest.mark.parametrize("name, total", [("resnet32", 1136), ("mobilenetv2", 17088)])
def test_published_totals_at_any_threshold(name: str, total: int) -> None:
    torch.manual_seed(0)
    state = models.create(name, num_classes=100).state_dict()
    counts = [count_invalid_filters(state, t) for t in (0.0, 0.01, 0.1, 1.0, 1e9)]
    assert [tot for _, tot in counts] == [total] * 5
    invalid = [inv for inv, _ in counts]
    assert invalid == sorted(invalid) and invalid[0] == 0 and invalid[-1] == total


def test_zeroed_filters_become_invalid() -> None:
    torch.manual_seed(0)
    model = models.create("resnet32")
    state = model.state_dict()
    base_invalid, total = count_invalid_filters(state, 0.01)
    chosen = [
        ("conv1.weight", 3),
        ("layer1.2.conv2.weight", 0),
        ("layer2.0.conv1.weight", 31),
        ("layer3.4.conv2.weight", 7),
        ("layer3.4.conv2.weight", 8),
    ]
    with torch.no_grad():
        for key, j in chosen:
            assert filter_l1_norms(state[key])[j] >= 0.01  # it was valid before
            state[key][j] = 0.0
    assert count_invalid_filters(model.state_dict(), 0.01) == (base_invalid + len(chosen), total)
    # A filter scaled just under the threshold counts too; one just over does not.
    with torch.no_grad():
        weight = state["layer2.1.conv1.weight"]
        weight[5] *= 0.009 / filter_l1_norms(weight)[5]
        weight[6] *= 0.011 / filter_l1_norms(weight)[6]
    assert count_invalid_filters(model.state_dict(), 0.01) == (base_invalid + len(chosen) + 1, total)


def test_mobilenetv2_shortcut_filters_are_not_counted() -> None:
    torch.manual_seed(0)
    state = models.create("mobilenetv2").state_dict()
    shortcut_keys = [k for k in state if "shortcut" in k and k.endswith(".weight") and state[k].dim() == 4]
    assert shortcut_keys  # the CIFAR MobileNetV2 has 1x1 shortcut convs
    before = count_invalid_filters(state, 0.01)
    for key in shortcut_keys:
        state[key].zero_()
    assert count_invalid_filters(state, 0.01) == before
    state["layers.0.conv1.weight"].zero_()  # 32 filters of a counted conv
    assert count_invalid_filters(state, 0.01) == (before[0] + 32, before[1])
