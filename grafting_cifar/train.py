"""Train network --i of --num on CIFAR-10/100 with filter grafting (Meng et al., CVPR 2020).

    python grafting_cifar/train.py --s runs/r32 --num 2 --i 1 --model resnet32 --cifar 10 --difflr --cos &
    python grafting_cifar/train.py --s runs/r32 --num 2 --i 2 --model resnet32 --cifar 10 --difflr --cos &

After every epoch each network saves its weights to --s, waits for its ring predecessor's weights
of the same epoch and grafts them in. --num 1 is the baseline.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import models
from grafting.cli import ArgumentParser, add_grafting_args, check_grafting_args, entry_point
from grafting.data.cifar import cifar_loaders
from grafting.errors import UsageError
from grafting.experiment import run_ring
from grafting.graft import default_rule
from grafting.log import setup_console
from grafting.runtime import choose_device, configure_threads, seed_everything


def parse_args(argv: list[str] | None = None):
    parser = ArgumentParser(prog="graft-cifar", description=__doc__.split("\n")[0])
    parser.add_argument("--lr", type=float, default=0.1, help="initial learning rate")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    parser.add_argument("--data", default="data", help="folder holding cifar-10-batches-py/ or cifar-100-python/")
    parser.add_argument("--download", action="store_true", help="download CIFAR into --data when missing")
    parser.add_argument("--model", default="resnet32", help=f"one of: {', '.join(models.available())}")
    parser.add_argument("--cifar", type=int, default=10, choices=(10, 100), help="CIFAR-10 or CIFAR-100")
    parser.add_argument("--print_frequence", "--print-freq", dest="print_freq", type=int, default=100,
                        help="print a progress line every this many batches")
    parser.add_argument("--cos", action="store_true", help="cosine lr per iteration (default: x0.1 every 60 epochs)")
    parser.add_argument("--difflr", action="store_true",
                        help="different initial lr per network: lr * (1 + cos(pi (num - i) / num)) / 2 ('dlr')")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--test-batch-size", type=int, default=100)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=5e-4)
    parser.add_argument("--step-epochs", type=int, default=60, help="epochs between x0.1 steps without --cos")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers of the torchvision pipeline (default: 2 per network, fewer on small machines)")
    parser.add_argument("--pipeline", choices=("auto", "tensor", "torchvision"), default="auto",
                        help="data path: whole dataset as one tensor on the device with batched augmentation, "
                             "or torchvision transforms in DataLoader workers (auto: the faster one here)")
    add_grafting_args(parser)
    args = parser.parse_args(argv)
    check_grafting_args(args)
    if args.model not in models.available():
        raise UsageError(f"--model: unknown model '{args.model}'; choose one of: {', '.join(models.available())}")
    return args


@entry_point
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_console(f"net {args.i}/{args.num}")
    device = choose_device(args.device)
    threads = configure_threads(args.threads, args.num, device)
    seed = args.seed + args.i  # the networks of a ring must start apart
    seed_everything(seed)
    # channels_last is the same fp32 arithmetic in faster kernels (only the summation order differs), so it
    # is on by default on both devices; on the 2-core CPU it cut a ResNet-32 step by ~18%, MobileNetV2 by ~40%
    # (VGG-16 alone was ~7% slower: --no-channels-last). Fixed shapes let cuDNN pick its fastest kernels.
    channels_last = True if args.channels_last is None else args.channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    workers = args.workers if args.workers is not None else min(2, threads)
    train_loader, test_loader, pipeline = cifar_loaders(
        args.data, args.cifar, args.batch_size, args.test_batch_size, device=device, pipeline=args.pipeline,
        workers=workers, download=args.download, seed=seed, channels_last=channels_last)

    model = models.create(args.model, num_classes=args.cifar).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    rule = args.graft_rule or default_rule(model)
    if args.compile:
        model = torch.compile(model)

    config = {**vars(args), "dataset": f"cifar{args.cifar}", "num_classes": args.cifar, "graft_rule": rule,
              "pipeline": pipeline, "threads": threads, "device": str(device)}
    run_ring(args, model, train_loader, test_loader, config=config, weight_decay=args.weight_decay,
             momentum=args.momentum, step_epochs=args.step_epochs, rule=rule)


if __name__ == "__main__":
    main()
