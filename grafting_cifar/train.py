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

from grafting.archs import cifar_models
from grafting.data.cifar import cifar_loaders
from grafting.data.fake import is_generated_stand_in, stand_in_description
from grafting.method.graft import default_rule
from grafting.train.cli import entry_point, parse_config
from grafting.train.config import CifarConfig
from grafting.train.log import setup_console
from grafting.train.run import run_ring
from grafting.train.runtime import choose_device, configure_threads, seed_everything


def parse_args(argv: list[str] | None = None) -> CifarConfig:
    """The checked configuration of ``argv`` (the authors' flags and defaults)."""
    description = f"{__doc__.splitlines()[0]} Models (--model): {', '.join(cifar_models.available())}."
    return parse_config(CifarConfig, argv, prog="graft-cifar", description=description)


@entry_point
def main(argv: list[str] | None = None) -> None:
    """Parse, set up the device and data, build the model, then train the network."""
    config = parse_args(argv)
    setup_console(f"net {config.i}/{config.num}")
    device = choose_device(config.device)
    threads = configure_threads(config.threads, config.num, device)
    seed = config.seed + config.i  # the networks of a ring must start apart
    seed_everything(seed)
    # channels_last is the same fp32 arithmetic in faster kernels (only the summation order differs), so it
    # is on by default on both devices; on the 2-core CPU it cut a ResNet-32 step by ~18%, MobileNetV2 by ~40%
    # (VGG-16 alone was ~7% slower: --no-channels-last). Fixed shapes let cuDNN pick its fastest kernels.
    channels_last = True if config.channels_last is None else config.channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    workers = config.workers if config.workers is not None else min(2, threads)
    train_loader, test_loader, pipeline = cifar_loaders(
        config.data,
        config.cifar,
        config.batch_size,
        config.test_batch_size,
        device=device,
        pipeline=config.pipeline,
        workers=workers,
        download=config.download,
        seed=seed,
        channels_last=channels_last,
    )

    model = cifar_models.create(config.model, num_classes=config.num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    rule = config.graft_rule or default_rule(model)
    if config.compile:
        model = torch.compile(model)

    config = config.replace(
        graft_rule=rule,
        pipeline=pipeline,
        threads=threads,
        workers=workers,
        device=str(device),
        channels_last=channels_last,
        generated_data=is_generated_stand_in(config.data),
        stand_in=stand_in_description(config.data) or "",
    )
    run_ring(
        config,
        model,
        train_loader,
        test_loader,
        build_model=lambda name, classes: cifar_models.create(name, num_classes=classes),
    )


if __name__ == "__main__":
    main()
