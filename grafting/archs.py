"""The CIFAR architectures of the repository's ``models/`` folder, as the module :data:`cifar_models`.

Installed, that folder is the package ``grafting_models`` (a generic top-level ``models`` would shadow
or be shadowed by a user's own). Run from a checkout that is not installed, it is loaded from the
folder under the same name, so both ways give one module and one registry::

    from grafting.archs import cifar_models
    net = cifar_models.create("resnet32", num_classes=10)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["cifar_models", "PACKAGE"]

PACKAGE = "grafting_models"


def _load() -> ModuleType:
    try:
        return importlib.import_module(PACKAGE)
    except ModuleNotFoundError as err:
        if err.name != PACKAGE:
            raise
    folder = Path(__file__).resolve().parent.parent / "models"
    spec = importlib.util.spec_from_file_location(
        PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"neither the package {PACKAGE} nor the folder {folder} is there; reinstall the project (pip install .)",
            name=PACKAGE,
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module


cifar_models = _load()
