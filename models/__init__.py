"""CIFAR architectures and a tiny name -> constructor registry.

Model files register their constructors with ``@register("resnet32")``; callers build
networks with ``create("resnet32", num_classes=100)`` and list them with ``available()``.

Key names are part of the contract: the paper's grafting rule and its invalid-filter count
select state_dict entries whose key contains ``conv``. Every convolution weight here has
``conv`` in its key (MobileNetV2's 1x1 shortcut convolutions excepted, as in the paper) and
no other entry does.
"""

from typing import Callable

import torch.nn as nn

from grafting.errors import GraftingError

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Return a decorator that records ``factory`` under ``name`` and returns it unchanged."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            # Two files claiming one name is a programming error, not a user error.
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def create(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with a classifier for ``num_classes`` classes.

    Extra keyword arguments go to the model's constructor. An unknown name raises
    ``GraftingError`` listing the valid choices.
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        raise GraftingError(f"unknown model {name!r}; choose one of: {', '.join(available())}")
    return factory(num_classes=num_classes, **kwargs)


# Imported last so that the model files find ``register`` already defined.
from . import mobilenetv2, resnet, vgg  # noqa: E402,F401
