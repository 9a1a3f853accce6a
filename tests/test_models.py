"""Tests for the CIFAR model zoo and its registry (models/)."""

import ast
import functools
import pathlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from grafting_models.resnet import PadShortcut
from helpers import differing_entries
from helpers.published_code import PublishedCifarResNet

from grafting.archs import cifar_models as models
from grafting.errors import GraftingError

RESNET_DEPTHS = (20, 32, 44, 56, 110, 1202)
EXPECTED_NAMES = (
    ["mobilenetv2", "vgg11", "vgg13", "vgg16", "vgg19"]
    + [f"resnet{d}" for d in RESNET_DEPTHS]
    + [f"resnet{d}_leaky" for d in RESNET_DEPTHS]
)

# Trainable parameters for (10 classes, 100 classes), counted once and pinned.
PARAMETER_COUNTS = {
    "resnet20": (269_722, 275_572),
    "resnet32": (464_154, 470_004),
    "resnet44": (658_586, 664_436),
    "resnet56": (853_018, 858_868),
    "resnet110": (1_727_962, 1_733_812),
    "resnet1202": (19_421_274, 19_427_124),
    "mobilenetv2": (2_296_922, 2_412_212),
    "vgg11": (9_228_362, 9_274_532),
    "vgg13": (9_413_066, 9_459_236),
    "vgg16": (14_724_042, 14_770_212),
    "vgg19": (20_035_018, 20_081_188),
}

# Filters under the paper's rule (keys containing "conv", first dimension of each weight).
FILTER_COUNTS = {
    "resnet20": 688,
    "resnet32": 1136,
    "resnet44": 1584,
    "resnet56": 2032,
    "resnet110": 4048,
    "resnet1202": 44816,
    "mobilenetv2": 17088,
    "vgg11": 2752,
    "vgg13": 2944,
    "vgg16": 4224,
    "vgg19": 5504,
}


def _base_name(name: str) -> str:
    """The plain model a (possibly leaky) name shares its counts with."""
    return name.removesuffix("_leaky")


def _built(name: str, num_classes: int = 10) -> nn.Module:
    """Each model is built once per class count; tests only read it (eval mode, no_grad)."""
    return _built_once(name, num_classes)  # one cache key whether num_classes is given or not


@functools.cache
def _built_once(name: str, num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return models.create(name, num_classes=num_classes).eval()


def _paper_filter_count(model: nn.Module) -> int:
    """Count filters as the paper does: every state_dict entry whose key contains 'conv'."""
    return sum(tensor.shape[0] for key, tensor in model.state_dict().items() if "conv" in key)


def test_available_is_sorted_and_complete() -> None:
    names = models.available()
    assert names == sorted(names)
    assert set(names) == set(EXPECTED_NAMES)
    assert len(names) == len(EXPECTED_NAMES)


def test_create_unknown_model_names_the_choices() -> None:
    with pytest.raises(GraftingError) as excinfo:
        models.create("resnet33")
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith("unknown model 'resnet33'; choose one of: ")
    listed = message.split("choose one of: ", 1)[1].split(", ")
    assert listed == models.available()


def test_register_rejects_a_duplicate_name() -> None:
    with pytest.raises(ValueError, match="resnet32"):
        models.register("resnet32")(lambda num_classes=10: nn.Identity())
    assert isinstance(models.create("resnet32"), models.resnet.CifarResNet)


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_parameter_count_and_output_shape(name: str, num_classes: int) -> None:
    model = _built(name, num_classes)
    expected = PARAMETER_COUNTS[_base_name(name)][0 if num_classes == 10 else 1]
    assert sum(p.numel() for p in model.parameters()) == expected
    if name.startswith("resnet1202"):
        return  # too slow to run on two CPU cores; its blocks are the ones tested at other depths
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_paper_filter_count(name: str) -> None:
    assert _paper_filter_count(_built(name)) == FILTER_COUNTS[_base_name(name)]


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_conv_keys_are_exactly_the_conv_weights(name: str) -> None:
    model = _built(name)
    conv_weights = {
        f"{module_name}.weight" for module_name, module in model.named_modules() if isinstance(module, nn.Conv2d)
    }
    # MobileNetV2's 1x1 shortcut convolutions are the one documented exception.
    shortcut_convs = {key for key in conv_weights if ".shortcut." in key}
    keys_with_conv = {key for key in model.state_dict() if "conv" in key}
    assert keys_with_conv == conv_weights - shortcut_convs
    if name == "mobilenetv2":
        assert len(shortcut_convs) == 4
    else:
        assert not shortcut_convs
    first_key, first_tensor = next(iter(model.state_dict().items()))
    assert first_key in conv_weights and "conv" in first_key
    assert first_tensor.dim() == 4


def test_resnet_state_dict_order() -> None:
    keys = list(_built("resnet32").state_dict())
    assert keys[:8] == [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer1.0.conv1.weight",
        "layer1.0.bn1.weight",
    ]
    assert keys[-2:] == ["linear.weight", "linear.bias"]
    assert "layer3.4.conv2.weight" in keys and "layer3.5.conv1.weight" not in keys


def test_resnet_option_a_shortcut_subsamples_and_zero_pads() -> None:
    model = _built("resnet32")
    downsample = model.layer2[0]
    assert isinstance(downsample.shortcut, PadShortcut)
    assert not any(".shortcut." in key for key in model.state_dict())
    x = torch.randn(2, 16, 32, 32)
    out = downsample.shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_resnet_uses_kaiming_normal_init() -> None:
    model = _built("resnet56")
    conv = model.layer3[0].conv2.weight  # fan_in = 64 * 3 * 3
    assert conv.std().item() == pytest.approx((2.0 / 576) ** 0.5, rel=0.05)
    assert abs(conv.mean().item()) < 0.005
    # PyTorch's default Linear init has std 1/sqrt(3 * 64), far from Kaiming's sqrt(2 / 64).
    assert model.linear.weight.std().item() == pytest.approx((2.0 / 64) ** 0.5, rel=0.15)


@pytest.mark.parametrize("depth", RESNET_DEPTHS)
def test_leaky_variant_swaps_only_the_activation(depth: int) -> None:
    plain, leaky = _built(f"resnet{depth}"), _built(f"resnet{depth}_leaky")
    plain_state, leaky_state = plain.state_dict(), leaky.state_dict()
    assert list(plain_state) == list(leaky_state)
    assert all(plain_state[key].shape == leaky_state[key].shape for key in plain_state)
    leaky_acts = [m for m in leaky.modules() if isinstance(m, nn.LeakyReLU)]
    assert leaky_acts and all(m.negative_slope == 0.01 for m in leaky_acts)
    assert not any(type(m) is nn.ReLU for m in leaky.modules())
    assert any(type(m) is nn.ReLU for m in plain.modules())
    assert not any(isinstance(m, nn.LeakyReLU) for m in plain.modules())


def test_leaky_activation_changes_the_output() -> None:
    plain = models.create("resnet20").eval()
    leaky = models.create("resnet20_leaky").eval()
    leaky.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(plain(x), leaky(x))


def test_mobilenetv2_structure() -> None:
    model = _built("mobilenetv2")
    assert len(model.layers) == 17
    with_shortcut_conv = [i for i, block in enumerate(model.layers) if len(block.shortcut) == 2]
    # Stride-1 blocks that change width: 32->16, 16->24, 64->96, 160->320.
    assert with_shortcut_conv == [0, 1, 10, 16]
    strides = [block.stride for block in model.layers]
    assert [i for i, s in enumerate(strides) if s == 2] == [3, 6, 13]
    depthwise = model.layers[5].conv2
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == 192


def test_mobilenetv2_residual_only_at_stride_one() -> None:
    model = models.create("mobilenetv2").eval()
    identity_block, shortcut_block, strided_block = model.layers[2], model.layers[1], model.layers[3]
    for block in (identity_block, shortcut_block, strided_block):
        # With the projection's BN silenced the main branch outputs zeros.
        nn.init.zeros_(block.bn3.weight)
        nn.init.zeros_(block.bn3.bias)
    with torch.no_grad():
        x24 = torch.randn(2, 24, 32, 32)
        assert torch.equal(identity_block(x24), x24)
        x16 = torch.randn(2, 16, 32, 32)
        assert torch.allclose(shortcut_block(x16), shortcut_block.shortcut(x16))
        assert not strided_block(x24).any()


@pytest.mark.parametrize("name,num_convs", [("vgg11", 8), ("vgg13", 10), ("vgg16", 13), ("vgg19", 16)])
def test_vgg_features_layout(name: str, num_convs: int) -> None:
    model = _built(name)
    stages = [m for m in model.features if isinstance(m, models.vgg.ConvBNReLU)]
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert len(stages) == num_convs and len(pools) == 5
    assert len(model.features) == num_convs + 5
    assert all(stage.conv.kernel_size == (3, 3) and stage.conv.padding == (1, 1) for stage in stages)
    keys = list(model.state_dict())
    assert keys[:3] == ["features.0.conv.weight", "features.0.bn.weight", "features.0.bn.bias"]
    assert model.classifier.in_features == 512


def test_models_import_only_errors_from_grafting() -> None:
    # Arrows point scripts -> grafting -> models; grafting.errors is the one allowed exception.
    package = pathlib.Path(models.__file__).parent
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for imported in names:
                if imported == "grafting" or imported.startswith("grafting."):
                    assert imported == "grafting.errors", f"{path.name} imports {imported}"


# --- the published model definition ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet20", "resnet20_leaky"])
def test_resnet_trains_bit_identically_to_the_published_definition(name: str) -> None:
    """Same seed, same initial weights; then 12 SGD steps (the CIFAR recipe's optimizer) on the same batches
    leave every tensor of the state_dict equal, on the CPU (docs/METHOD.md §6)."""
    torch.manual_seed(3)
    ours = models.create(name, num_classes=10)
    torch.manual_seed(3)
    theirs = PublishedCifarResNet(20, num_classes=10, leaky=name.endswith("_leaky"))
    assert differing_entries(ours.state_dict(), theirs.state_dict()) == [], "the same seed must build the same weights"
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for m in (ours, theirs)]
    generator = torch.Generator().manual_seed(4)
    for _ in range(12):
        images = torch.randn(8, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 10, (8,), generator=generator)
        for model, optimizer in zip((ours, theirs), optimizers):
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    assert differing_entries(ours.state_dict(), theirs.state_dict()) == []


def test_resnet_pools_the_whole_feature_map_of_any_input_size() -> None:
    """A square input pools exactly as the published window (as wide as the map); a non-square one is
    averaged over all of it, where the published window would cover only its top square or nothing."""
    model = _built("resnet20")
    features: list[torch.Tensor] = []
    hook = model.layer3.register_forward_hook(lambda module, args, out: features.append(out))
    try:
        with torch.no_grad():
            for height, width in ((32, 32), (48, 32), (32, 48)):
                features.clear()
                logits = model(torch.randn(2, 3, height, width))
                expected = model.linear(features[0].mean(dim=(2, 3)))
                assert torch.allclose(logits, expected, atol=1e-6), (height, width)
    finally:
        hook.remove()
