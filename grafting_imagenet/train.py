"""Train network --i of --num on an ImageFolder dataset (ImageNet) with filter grafting (Meng et al., CVPR 2020).

One process per network, one GPU each:

    CUDA_VISIBLE_DEVICES=0 python grafting_imagenet/train.py --data /data/imagenet --s runs/r18 --num 2 --i 1 &
    CUDA_VISIBLE_DEVICES=1 python grafting_imagenet/train.py --data /data/imagenet --s runs/r18 --num 2 --i 2 &

Several GPUs for one network (DistributedDataParallel; -b and -j are the network's totals, split
over the K processes as in PyTorch's ImageNet example; rank 0 alone exchanges and grafts). The
``--`` keeps torchrun from reading ``--s`` and ``--num`` as abbreviations of its own options:

    CUDA_VISIBLE_DEVICES=0,1 torchrun --standalone --nproc_per_node 2 -- grafting_imagenet/train.py \
        --data /data/imagenet --s runs/r18 --num 2 --i 1 &

``-e`` validates a checkpoint and writes nothing: ``--checkpoint PATH`` if given, else the
torchvision weights with ``--pretrained``, else this network's ``<s>/net<i>/best.pt``.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import math
import sys
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from grafting.checkpoint import load_state_dict_file, load_weights_into
from grafting.cli import ArgumentParser, add_grafting_args, check_grafting_args, entry_point
from grafting.data.loading import EpochLoader
from grafting.data.imagenet import imagenet_loaders
from grafting.errors import UsageError
from grafting.distributed import Processes, broadcast_from_main, choose_process_device, per_process
from grafting.experiment import amp_dtype_for, run_ring
from grafting.imagenet_models import ARCHS, create_model, model_classes, pretrained_weights
from grafting.graft import default_rule
from grafting.log import setup_console
from grafting.loop import evaluate
from grafting.runtime import configure_threads, seed_everything
from grafting.session import RunFiles

log = logging.getLogger("grafting")

# Other ranks wait in a collective while rank 0 waits for its ring predecessor, which may be a whole
# epoch behind: the process group must not give up before the grafting wait itself does.
PROCESS_GROUP_TIMEOUT = timedelta(days=7)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The ImageNet flags (the original's names and defaults) plus the shared grafting flags; validated."""
    parser = ArgumentParser(prog="graft-imagenet", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="imagenet", metavar="DIR",
                        help="folder holding train/ and val/ class folders")
    parser.add_argument("-a", "--arch", default="resnet18", metavar="ARCH",
                        help=f"torchvision classification model, one of: {', '.join(ARCHS)}")
    parser.add_argument("-j", "--workers", type=int, default=4,
                        help="data loading workers of the network (split over the processes of a torchrun)")
    parser.add_argument("--epochs", type=int, default=90)
    parser.add_argument("--start-epoch", type=int, default=None, metavar="N",
                        help="1-based epoch to start at; with --resume the resumed epoch wins, without it fresh "
                             "weights start at N and the lr schedule skips the epochs before (a warning says so)")
    parser.add_argument("-b", "--batch-size", type=int, default=256,
                        help="batch size of the network (split over the processes of a torchrun)")
    parser.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=0.1, help="initial learning rate")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=1e-4)
    parser.add_argument("-p", "--print-freq", dest="print_freq", type=int, default=10,
                        help="print a progress line every this many batches")
    parser.add_argument("--steplr", action="store_true",
                        help="lr x0.1 every --step-epochs epochs (default: cosine annealing per iteration)")
    parser.add_argument("--step-epochs", type=int, default=30, help="epochs between x0.1 steps with --steplr")
    parser.add_argument("--difflr", action="store_true",
                        help="different initial lr per network: lr * (1 + cos(pi (num - i) / num)) / 2")
    parser.add_argument("--image-size", type=int, default=224,
                        help="training crop; validation resizes to size*256/224 and centre-crops this")
    parser.add_argument("-e", "--evaluate", action="store_true",
                        help="only validate (top-1, top-5) --checkpoint, else the --pretrained weights, "
                             "else <s>/net<i>/best.pt; writes nothing")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="checkpoint for --evaluate (a state_dict or a dict with 'model'/'state_dict'/'net')")
    parser.add_argument("--pretrained", action="store_true",
                        help="start from torchvision's weights; they must already be in the torch hub cache "
                             "(never downloaded here)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    parser.add_argument("--gpu", type=int, default=None, metavar="N", help="use cuda:N (same as --device cuda:N)")
    add_grafting_args(parser)
    args = parser.parse_args(argv)
    check_grafting_args(args)
    check_imagenet_args(args)
    args.cos = not args.steplr  # run_ring's name for the schedule
    return args


def check_imagenet_args(args: argparse.Namespace) -> None:
    """Reject impossible values of the ImageNet flags with one line (raises UsageError)."""
    if args.arch not in ARCHS:
        close = difflib.get_close_matches(args.arch, ARCHS, n=4, cutoff=0.5) or ["resnet18", "resnet50",
                                                                                  "mobilenet_v2", "vgg16_bn"]
        raise UsageError(f"-a/--arch: unknown torchvision model '{args.arch}'; did you mean {', '.join(close)}? "
                         f"(--help lists all {len(ARCHS)})")
    if args.image_size < 16:
        raise UsageError(f"--image-size must be at least 16 pixels, got {args.image_size}")
    if args.start_epoch is not None and not 1 <= args.start_epoch <= args.epochs:
        raise UsageError(f"--start-epoch must lie in 1..--epochs ({args.epochs}), got {args.start_epoch}")
    if args.step_epochs < 1:
        raise UsageError(f"--step-epochs must be at least 1, got {args.step_epochs}")
    if args.print_freq < 0:
        raise UsageError(f"-p/--print-freq must be >= 0 (0: no progress lines), got {args.print_freq}")
    if args.gpu is not None and args.device is not None:
        raise UsageError("--gpu N is short for --device cuda:N; give one of them")
    if args.checkpoint is not None and not args.evaluate:
        raise UsageError("--checkpoint only applies with -e/--evaluate (training resumes with --resume)")


# ----------------------------------------------------------------------------------------------
# Evaluation only


def checkpoint_to_evaluate(args: argparse.Namespace) -> Path | None:
    """The file -e/--evaluate validates: --checkpoint, else None for the --pretrained weights, else
    ``<s>/net<i>/best.pt``. A missing file is a UsageError (raised before any data is read)."""
    if args.checkpoint is None and args.pretrained:
        return None
    path = Path(args.checkpoint) if args.checkpoint else RunFiles(Path(args.s), args.i).best
    if not path.is_file():
        how = "check --checkpoint" if args.checkpoint else "train this network first or pass --checkpoint PATH"
        raise UsageError(f"-e/--evaluate: no checkpoint at {path}; {how}")
    return path


def evaluate_checkpoint(args: argparse.Namespace, model: nn.Module, val_loader: EpochLoader, procs: Processes,
                        device: torch.device, path: Path | None) -> None:
    """Validate ``path`` (from :func:`checkpoint_to_evaluate`; None: the model's own pretrained weights)
    and log top-1 / top-5; writes nothing.

    Under torchrun rank 0 reads the file and hands the weights to the others; the ranks split the
    validation set and sum their counts.
    """
    path = broadcast_from_main(path)
    if path is None:
        source = f"torchvision's pretrained {args.arch}"
    else:
        source = str(path)
        state = broadcast_from_main(load_state_dict_file(path) if procs.is_main else None)
        load_weights_into(model, state, source=source, expected=f"-a {args.arch} with {model_classes(model)} classes",
                          advice="pass the matching --arch and --data")
    stats = evaluate(model, val_loader, amp_dtype=amp_dtype_for(device, args.amp))
    log.info(f"evaluate {source}: top-1 {stats.top1:.2f} top-5 {stats.top5:.2f} loss {stats.loss:.4f}")



# ----------------------------------------------------------------------------------------------


@entry_point
def main(argv: list[str] | None = None) -> None:
    """Parse, set up device(s) and data, build the model, then train the network (or only validate)."""
    args = parse_args(argv)
    procs = Processes.from_environment()
    batch_size = per_process(args.batch_size, procs, "-b/--batch-size")
    workers = math.ceil(args.workers / procs.world_size)
    tag = f"net {args.i}/{args.num}" + (f" rank {procs.rank}" if procs.distributed else "")
    setup_console(tag, level=logging.INFO if procs.is_main else logging.WARNING)  # epoch lines from rank 0 only
    device = choose_process_device(args, procs)
    threads = configure_threads(args.threads, args.num * procs.world_size, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: the fastest kernels, same numerics
    if procs.distributed:
        timeout = timedelta(seconds=args.peer_timeout + 600) if args.peer_timeout else PROCESS_GROUP_TIMEOUT
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    try:
        train(args, procs, device, batch_size=batch_size, workers=workers, threads=threads)
    finally:
        if procs.distributed:
            torch.distributed.destroy_process_group()


def train(args: argparse.Namespace, procs: Processes, device: torch.device, *, batch_size: int, workers: int,
          threads: int) -> None:
    """Everything after process set-up: data, model, then run_ring (or evaluate_checkpoint with -e)."""
    # Fail on missing files before the data is read and anything is started.
    if args.pretrained:
        pretrained_weights(args.arch)
    evaluate_path = checkpoint_to_evaluate(args) if args.evaluate and procs.is_main else None
    seed = args.seed + args.i  # the networks of a ring must start apart; the ranks of one network must not
    seed_everything(seed)
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    train_loader, val_loader, num_classes = imagenet_loaders(
        args.data, image_size=args.image_size, batch_size=batch_size, workers=workers, device=device,
        distributed=procs.distributed, seed=seed, channels_last=channels_last)

    model = create_model(args.arch, num_classes, pretrained=args.pretrained).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.evaluate:
        evaluate_checkpoint(args, model, val_loader, procs, device, evaluate_path)
        return
    rule = args.graft_rule or default_rule(model)
    if procs.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)

    config = {**vars(args), "model": args.arch, "dataset": "imagefolder", "num_classes": num_classes,
              "graft_rule": rule, "threads": threads, "device": str(device), "world_size": procs.world_size,
              "batch_size_per_process": batch_size, "workers_per_process": workers}
    run_ring(args, model, train_loader, val_loader, config=config, weight_decay=args.weight_decay,
             momentum=args.momentum, step_epochs=args.step_epochs, rule=rule, is_main=procs.is_main,
             build_model=lambda name, classes: create_model(name, classes))


if __name__ == "__main__":
    main()
