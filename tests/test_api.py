"""The public face of the library: ``help(grafting)`` reads as a short manual, and every public
function, class and method of ``grafting/`` says what it does."""

from __future__ import annotations

import ast
import io
import pydoc
from pathlib import Path

import grafting

LIBRARY = Path(grafting.__file__).resolve().parent


def public_definitions(tree: ast.Module):
    """Top-level public functions and classes, and the public methods of public classes."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield node.name, node
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                        yield f"{node.name}.{item.name}", item


def test_every_public_definition_has_a_docstring() -> None:
    missing = []
    for path in sorted(LIBRARY.rglob("*.py")):
        tree = ast.parse(path.read_text())
        if not ast.get_docstring(tree):
            missing.append(f"{path.relative_to(LIBRARY)} (module)")
        missing += [
            f"{path.relative_to(LIBRARY)}: {name}"
            for name, node in public_definitions(tree)
            if not ast.get_docstring(node)
        ]
    assert not missing, "public definitions without a docstring:\n" + "\n".join(missing)


def test_help_reads_as_a_manual() -> None:
    out = io.StringIO()
    pydoc.Helper(output=out).help(grafting)
    text = out.getvalue()
    # the overview and the example come first, then the pieces, each with its own one-liner
    assert text.index("Filter grafting for deep neural networks") < text.index("Grafter(")
    for name in grafting.__all__:
        assert name in text, f"help(grafting) does not mention {name}"
    for name in ("Grafter", "graft_layers", "graft_filters", "layer_entropy", "count_invalid_filters"):
        assert getattr(grafting, name).__doc__, name


def test_public_names_are_importable() -> None:
    for name in grafting.__all__:
        assert hasattr(grafting, name), name
