"""Command-line pieces both training scripts share: the grafting flags, their validation, and
the top-level error handling (one line on stderr, exit code 2 for bad input, 1 for failures)."""
from __future__ import annotations

import argparse
import functools
import math
import sys
from typing import Callable

from .ablation import SOURCES
from .distill import DISTILL_MODES
from .errors import DatasetNotFoundError, GraftingError, UsageError
from .graft import CRITERIA, RULES
from .grafter import LEVELS

__all__ = ["ArgumentParser", "UsageError", "add_grafting_args", "add_distill_args", "check_grafting_args",
           "check_distill_args", "entry_point"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: message (see --help)`` and exit code 2, no usage dump
    (the same form as every other error of the scripts)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print ``error: message (see --help)`` on stderr and exit with code 2."""
        self.exit(2, f"error: {message} (see --help)\n")


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
    g.add_argument("--graft-source", dest="source", choices=SOURCES, default="external",
                   help="where new weights come from after each epoch: 'external' = the ring predecessor (the "
                        "method); ablations: 'internal' = the layer's own strong filters, 'noise' = Gaussian noise "
                        "on invalid filters (both need no peers), 'average' = plain mean of all --num networks")
    g.add_argument("--invalid-threshold", type=float, default=0.1, metavar="L1",
                   help="a filter is invalid when its l1 norm is below this (internal and noise grafting)")
    g.add_argument("--peer-timeout", type=float, default=None, metavar="SECONDS",
                   help="give up when the predecessor's epoch has not appeared after this long (default: wait forever)")
    g.add_argument("--keep-all", action="store_true", help="keep every exchange file (default: remove those no peer needs)")

    r = parser.add_argument_group("run control")
    r.add_argument("--resume", action="store_true", help="continue this network from <s>/net<i>/last.pt and rejoin the ring")
    r.add_argument("--seed", type=int, default=0, help="base seed; network i uses seed + i")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: cores / --num on the CPU)")
    r.add_argument("--amp", action="store_true",
                   help="mixed precision: autocast to bf16 where supported (the CPU, most GPUs), else fp16 with a "
                        "grad scaler; changes the numerics, so off by default")
    r.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format, same fp32 arithmetic in faster kernels (default: on for the "
                        "CIFAR script, on CUDA only for ImageNet)")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the model (opt-in: compiling takes a minute or more before the first batch)")
    add_distill_args(parser)


def add_distill_args(parser: argparse.ArgumentParser) -> None:
    """The cultivation flags (METHOD.md §7): distillation from a trained teacher or from the peers."""
    d = parser.add_argument_group("distillation (cultivation)")
    d.add_argument("--distill", choices=DISTILL_MODES, default="none",
                   help="add a distillation term: from --teacher checkpoints, or from the ring predecessor's "
                        "weights of the latest exchange ('peers')")
    d.add_argument("--teacher", action="append", default=[], metavar="PATH",
                   help="teacher checkpoint for --distill teacher; repeat it to average several teachers' logits")
    d.add_argument("--teacher-model", default=None, metavar="NAME",
                   help="the teachers' architecture (default: the student's)")
    d.add_argument("--kd-temperature", type=float, default=4.0, metavar="T", help="distillation temperature T")
    d.add_argument("--kd-weight", type=float, default=1.0, metavar="LAMBDA", help="weight lambda of the distillation term")
    d.add_argument("--kd-soften-teacher", action=argparse.BooleanOptionalAction, default=True,
                   help="soften the teacher by T too (textbook KL); --no-kd-soften-teacher is the authors' form: "
                        "cross-entropy against the teacher at T=1, student at T")


def check_grafting_args(args: argparse.Namespace) -> None:
    """Reject impossible values of the shared flags with one clear line (raises UsageError)."""
    if args.num < 1:
        raise UsageError(f"--num must be at least 1 (1 = baseline), got {args.num}")
    if not 1 <= args.i <= args.num:
        raise UsageError(f"--i must be between 1 and --num ({args.num}), got {args.i}")
    if not 0.0 <= args.a <= 1.0:
        raise UsageError(f"--a must lie in [0, 1], got {args.a}")
    if not 0 <= args.c < math.inf:  # also rejects NaN, which every comparison fails
        raise UsageError(f"--c must be a finite number >= 0, got {args.c}")
    if args.peer_timeout is not None and not args.peer_timeout > 0:
        raise UsageError(f"--peer-timeout must be positive seconds, got {args.peer_timeout}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    # Flags only some scripts have are checked when present; the comparisons also reject NaN and inf.
    for flag in ("lr", "epochs", "batch_size", "test_batch_size", "step_epochs"):
        value = getattr(args, flag, None)
        if value is not None and not 0 < value < math.inf:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    for flag in ("momentum", "weight_decay", "workers", "print_freq"):
        value = getattr(args, flag, None)
        if value is not None and not 0 <= value < math.inf:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
    if args.invalid_threshold < 0:
        raise UsageError(f"--invalid-threshold must be >= 0, got {args.invalid_threshold}")
    if args.source == "average" and args.num < 2:
        raise UsageError("--graft-source average needs --num 2 or more networks to average")
    check_distill_args(args)


def check_distill_args(args: argparse.Namespace) -> None:
    """Reject inconsistent distillation flags with one clear line (raises UsageError).

    Teacher files are checked when they are loaded, before training starts, so that scripts can be
    parsed before the runs that produce their teachers exist.
    """
    if args.kd_temperature <= 0:
        raise UsageError(f"--kd-temperature must be positive, got {args.kd_temperature}")
    if args.kd_weight < 0:
        raise UsageError(f"--kd-weight must be >= 0, got {args.kd_weight}")
    if args.distill == "teacher" and not args.teacher:
        raise UsageError("--distill teacher needs --teacher PATH (repeat it for several teachers)")
    if args.distill != "teacher" and (args.teacher or args.teacher_model):
        raise UsageError("--teacher and --teacher-model only apply with --distill teacher")
    if args.distill == "peers" and args.num < 2:
        raise UsageError("--distill peers needs --num 2 or more (the ring predecessor is the teacher)")
    if args.distill == "peers" and args.source not in ("external", "average"):
        raise UsageError(f"--distill peers needs an exchange; --graft-source {args.source} reads no peer weights")


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
