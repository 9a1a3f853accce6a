"""Parsing the shared grafting flags the way both training scripts do, for the flag tests."""
from __future__ import annotations

import argparse

from grafting.cli import ArgumentParser, add_grafting_args, check_grafting_args


def parse_grafting_flags(*argv: str) -> argparse.Namespace:
    """The namespace ``add_grafting_args`` + ``check_grafting_args`` make of ``argv``."""
    parser = ArgumentParser(prog="t")
    add_grafting_args(parser)
    args = parser.parse_args(list(argv))
    check_grafting_args(args)
    return args
