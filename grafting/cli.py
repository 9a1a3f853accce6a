"""Command-line pieces both training scripts share: the grafting flags, their validation, and
the top-level error handling (one line on stderr, exit code 2 for bad input, 1 for failures)."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable

from .errors import DatasetNotFoundError, GraftingError, UsageError
from .graft import CRITERIA, RULES
from .grafter import LEVELS

__all__ = ["ArgumentParser", "UsageError", "add_grafting_args", "check_grafting_args", "entry_point"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: message`` and exit code 2, no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_grafting_args(parser: argparse.ArgumentParser) -> None:
    """The ring and grafting flags (the original's names: --s --num --i --a --c) and run control."""
    g = parser.add_argument_group("grafting")
    g.add_argument("--s", default="checkpoint", metavar="DIR",
                   help="shared folder of the ring: exchange files, each network's checkpoints, TensorBoard")
    g.add_argument("--num", type=int, default=1, help="number of networks in the ring (1 = baseline, no grafting)")
    g.add_argument("--i", type=int, default=1, help="which network of the ring this process trains (1..num)")
    g.add_argument("--a", type=float, default=0.4, help="weighting hyper-parameter a, in [0, 1]")
    g.add_argument("--c", type=float, default=500.0, help="weighting hyper-parameter c (>= 0)")
    g.add_argument("--level", choices=LEVELS, default="layer", help="graft whole layers (entropy) or filters (BN scale)")
    g.add_argument("--graft-rule", choices=RULES, default=None,
                   help="layer grouping: 'name' = keys containing 'conv' (published), 'module' = by module type; "
                        "default: name when the model's first entry is a conv, else module")
    g.add_argument("--criterion", choices=CRITERIA, default="entropy", help="layer information measure")
    g.add_argument("--peer-timeout", type=float, default=None, metavar="SECONDS",
                   help="give up when the predecessor's epoch has not appeared after this long (default: wait forever)")
    g.add_argument("--keep-all", action="store_true", help="keep every exchange file (default: remove those no peer needs)")

    r = parser.add_argument_group("run control")
    r.add_argument("--resume", action="store_true", help="continue this network from <s>/net<i>/last.pt and rejoin the ring")
    r.add_argument("--seed", type=int, default=0, help="base seed; network i uses seed + i")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: cores / --num on the CPU)")
    r.add_argument("--amp", action="store_true", help="mixed precision on CUDA (bf16 where supported, else fp16 + grad scaler)")
    r.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for CUDA, off on the CPU)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")


def check_grafting_args(args: argparse.Namespace) -> None:
    """Reject impossible values of the shared flags with one clear line (raises UsageError)."""
    if args.num < 1:
        raise UsageError(f"--num must be at least 1 (1 = baseline), got {args.num}")
    if not 1 <= args.i <= args.num:
        raise UsageError(f"--i must be between 1 and --num ({args.num}), got {args.i}")
    if not 0.0 <= args.a <= 1.0:
        raise UsageError(f"--a must lie in [0, 1], got {args.a}")
    if args.c < 0:
        raise UsageError(f"--c must be >= 0, got {args.c}")
    if args.peer_timeout is not None and args.peer_timeout <= 0:
        raise UsageError(f"--peer-timeout must be positive seconds, got {args.peer_timeout}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    for flag in ("lr", "epochs", "batch_size"):
        value = getattr(args, flag, None)
        if value is not None and value <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    workers = getattr(args, "workers", None)
    if workers is not None and workers < 0:
        raise UsageError(f"--workers must be >= 0, got {workers}")


def entry_point(main: Callable[[list[str] | None], None]) -> Callable[[list[str] | None], None]:
    """Wrap a script's main: a GraftingError becomes one line on stderr and an exit code
    (2 for bad flags or a missing dataset, 1 for failures during the run); Ctrl-C exits 130."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> None:
        try:
            main(argv)
        except (UsageError, DatasetNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        except GraftingError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted; restart with --resume to continue from the last finished epoch", file=sys.stderr)
            sys.exit(130)

    return wrapper
