"""The paper's published numbers (docs/METHOD.md §8) as data, and the method labels that key them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from grafting.method.weighting import DEFAULT_A, DEFAULT_C

__all__ = [
    "PUBLISHED",
    "PUBLISHED_TOP5",
    "PUBLISHED_INVALID",
    "PUBLISHED_EPOCHS",
    "method_label",
    "published_accuracy",
    "published_invalid_models",
]


def _two_datasets(model: str, method: str, cifar10: float, cifar100: float) -> dict[tuple[str, str, str], float]:
    return {(model, "cifar10", method): cifar10, (model, "cifar100", method): cifar100}


def _published_cifar() -> dict[tuple[str, str, str], float]:
    table: dict[tuple[str, str, str], float] = {}
    main = {  # model: (baseline, slr, dlr), each (CIFAR-10, CIFAR-100); two networks
        "resnet32": ((92.83, 69.82), (93.33, 71.16), (93.94, 71.28)),
        "resnet56": ((93.50, 71.55), (94.28, 73.09), (94.73, 72.83)),
        "resnet110": ((93.81, 73.21), (94.60, 74.70), (94.96, 75.27)),
        "mobilenetv2": ((92.42, 71.44), (93.53, 73.26), (94.20, 74.15)),
    }
    for model, rows in main.items():
        for method, (c10, c100) in zip(("baseline", "slr", "dlr"), rows):
            table.update(_two_datasets(model, method, c10, c100))
    # MobileNetV2 with more networks (dlr; two networks is the main table's dlr row).
    for num, (c10, c100) in {3: (94.55, 76.21), 4: (95.23, 77.08), 6: (95.33, 78.32), 8: (95.20, 77.76)}.items():
        table.update(_two_datasets("mobilenetv2", f"dlr x{num}", c10, c100))
    table.update(_two_datasets("mobilenetv2", "ensemble x6", 94.09, 76.75))
    # Leaky-ReLU ResNets and VGG-16: the paper does not name the schedule, so "grafting" stands for any.
    leaky = {
        "resnet32_leaky": ((93.28, 70.04), (93.6, 70.93)),
        "resnet56_leaky": ((94.03, 72.24), (94.32, 73.14)),
        "resnet110_leaky": ((93.24, 73.34), (93.97, 73.82)),
    }
    for model, (baseline, grafting) in leaky.items():
        table.update(_two_datasets(model, "baseline", *baseline))
        table.update(_two_datasets(model, "grafting", *grafting))
    table.update(_two_datasets("vgg16", "baseline", 93.68, 73.41))
    table.update(_two_datasets("vgg16", "grafting", 94.02, 74.28))
    table.update(_two_datasets("vgg16", "filter grafting", 94.26, 74.63))
    # MobileNetV2, a and c (schedule not named): a = 0.4 with c swept, then c = 100 with a swept.
    for c, (c10, c100) in {
        1: (93.19, 73.3),
        5: (92.76, 72.69),
        10: (93.31, 73.26),
        50: (93.24, 73.05),
        500: (92.79, 72.38),
    }.items():
        table.update(_two_datasets("mobilenetv2", f"grafting a=0.4 c={c}", c10, c100))
    for a, (c10, c100) in {
        0: (93.4, 72.55),
        0.2: (93.61, 72.9),
        0.4: (93.46, 73.13),
        0.6: (92.6, 72.68),
        0.8: (93.03, 71.8),
        1: (92.53, 72.27),
    }.items():
        table.update(_two_datasets("mobilenetv2", f"grafting a={a:g} c=100", c10, c100))
    return table


PUBLISHED: dict[tuple[str, str, str], float] = {
    **_published_cifar(),
    ("resnet18", "imagenet", "baseline"): 69.15,
    ("resnet18", "imagenet", "grafting"): 71.19,
    ("resnet34", "imagenet", "baseline"): 72.60,
    ("resnet34", "imagenet", "grafting"): 74.58,
    ("resnet50", "imagenet", "baseline"): 75.92,
    ("resnet50", "imagenet", "grafting"): 76.76,
}
"""Top-1 test accuracy (%) by (model, dataset, method label)."""

PUBLISHED_TOP5: dict[tuple[str, str, str], float] = {
    ("resnet18", "imagenet", "baseline"): 88.87,
    ("resnet18", "imagenet", "grafting"): 90.01,
    ("resnet34", "imagenet", "baseline"): 90.91,
    ("resnet34", "imagenet", "grafting"): 92.05,
    ("resnet50", "imagenet", "baseline"): 92.81,
    ("resnet50", "imagenet", "grafting"): 93.34,
}
"""ImageNet top-5 accuracy (%), keyed like :data:`PUBLISHED`."""

PUBLISHED_INVALID: dict[tuple[str, str, float], tuple[int, int]] = {
    ("resnet32", "baseline", 0.1): (36, 1136),
    ("resnet32", "grafting", 0.1): (14, 1136),
    ("resnet32", "baseline", 0.01): (35, 1136),
    ("resnet32", "grafting", 0.01): (8, 1136),
    ("mobilenetv2", "baseline", 0.1): (10929, 17088),
    ("mobilenetv2", "grafting", 0.1): (9903, 17088),
    ("mobilenetv2", "baseline", 0.01): (9834, 17088),
    ("mobilenetv2", "grafting", 0.01): (8492, 17088),
}
"""Invalid filters (invalid, total) on CIFAR-10 by (model, baseline/grafting, threshold)."""

PUBLISHED_EPOCHS: dict[str, int] = {"cifar10": 200, "cifar100": 200, "imagenet": 90}
"""The epochs of the paper's recipes by dataset (docs/METHOD.md §6): a shorter run is not comparable."""


def published_invalid_models() -> list[str]:
    """The models whose invalid filters the paper counted."""
    return sorted({model for model, _, _ in PUBLISHED_INVALID})


# Words of a method label that name a schedule; the tables that do not name one are keyed "grafting".
_SCHEDULES = ("slr", "dlr", "cos", "steplr")


def _schedule(config: Mapping[str, Any]) -> str:
    """slr, dlr or cos. The ImageNet script is cosine unless --steplr; the CIFAR one is stepped unless --cos."""
    if config.get("difflr"):
        return "dlr"
    cosine = config.get("cos")
    if cosine is None and "steplr" in config:
        cosine = not config["steplr"]
    return "cos" if cosine else "slr"


def method_label(config: Mapping[str, Any]) -> str:
    """A short name for how a run trained, from its config.json: the key of the published tables.

    ``baseline`` (one network); ``slr`` / ``dlr`` / ``cos`` (the schedule) for two networks of the CIFAR
    script, ``grafting`` (cosine, the paper's ImageNet recipe) with `` dlr`` and `` steplr`` when they
    apply for the ImageNet script; ``filter`` before it for filter-level grafting (`` repeated-whole``
    after it for the published BatchNorm loop) and `` xN`` after it for N != 2 networks;
    ``noise``/``internal``/``average``/``filter-entropy`` for the ablation sources; then `` a=.. c=..`` when they are
    not the defaults, the criterion when it is not entropy, and `` +distill <mode>`` with distillation.
    """
    num = int(config.get("num", 1))
    source = config.get("source") or "external"
    schedule = _schedule(config)
    if source in ("internal", "noise"):
        label = f"{source} {schedule}"
    elif num == 1:
        label = "baseline"
    else:
        if source in ("average", "filter-entropy"):
            label = f"{source} {schedule}"
        elif "steplr" in config:  # the ImageNet script: the paper's rows are "grafting"
            label = "grafting" + (" dlr" if config.get("difflr") else "") + (" steplr" if config.get("steplr") else "")
        else:
            label = schedule
        if config.get("level") == "filter":
            label = f"filter {label}"
            if config.get("filter_bn_blend", "per-channel") != "per-channel":
                label += f" {config['filter_bn_blend']}"
        if num != 2:
            label += f" x{num}"
    if label != "baseline" and source == "external":
        a, c = float(config.get("a", DEFAULT_A)), float(config.get("c", DEFAULT_C))
        if (a, c) != (DEFAULT_A, DEFAULT_C):
            label += f" a={a:g} c={c:g}"
        if config.get("criterion", "entropy") != "entropy":
            label += f" {config['criterion']}"
    if config.get("distill") not in (None, False, "none"):
        label += f" +distill {config['distill']}"
    return label


def published_accuracy(model: str, dataset: str, method: str, *, top5: bool = False) -> float | None:
    """The paper's number for this row, or None. Tables that do not name the schedule are keyed
    ``grafting``: a ``slr``, ``dlr`` or ``cos`` label falls back to that."""
    table = PUBLISHED_TOP5 if top5 else PUBLISHED
    exact = table.get((model, dataset, method))
    if exact is not None:
        return exact
    words: list[str] = []
    for word in ("grafting" if word in _SCHEDULES else word for word in method.split(" ")):
        if not words or word != words[-1]:  # "grafting steplr" -> "grafting"
            words.append(word)
    return table.get((model, dataset, " ".join(words)))
